"""Generated ImageFolders, the tiny anchors and the trainer config the training and validation tests share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tiny_models import tiny_vit_args

ANCHORS = [tiny_vit_args(d, 2, depth=2, num_classes=None) for d in (16, 32)]
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 50))


def make_image_folder(root: Path, per_class=(40, 10), size: int = 32, seed: int = 0, mode: str = 'RGB') -> Path:
    """``train/`` and ``validation/`` ImageFolders of 4 classes told apart by colour (and stripes on odd classes),
    saved as PNGs of Pillow ``mode`` ('RGB', or 'L' for grey files)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(('train', 'validation'), per_class):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.array(colour, dtype=np.float64) * rng.uniform(0.6, 1.0) + rng.normal(0, 30, (size, size, 3))
                if c % 2:
                    img[::4] *= 0.3
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).convert(mode).save(folder / f'{i}.png')
    return root


def write_config(path: Path, **overrides) -> Path:
    """A trainer config file for the tiny anchors on a generated ImageFolder; ``overrides`` replace its entries."""
    config = dict(model='snnet', model_kwargs=dict(anchors=ANCHORS), num_classes=4, img_size=32, crop_pct=1.0,
                  batch_size=16, epochs=3, opt='adamw', lr=3e-3, weight_decay=0.05, warmup_epochs=0, workers=0,
                  log_interval=5, no_progress=True)
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path
