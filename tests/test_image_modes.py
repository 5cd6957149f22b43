"""Images are read in the mode the model takes (1 channel: L, 3: RGB), whatever mode the files are in, by both
``timm_stitch.validate`` and ``timm_stitch.train``; ``--input-img-mode`` overrides it."""
import json
from pathlib import Path

import numpy as np
import pytest
from image_folders import ANCHORS, make_image_folder

from timm_stitch.data import prepare_fashion_mnist, write_idx
from timm_stitch.evaluation import image_mode
from timm_stitch.train import main as train_main
from timm_stitch.validate import main as validate_main

FMNIST = ['--model', 'snnet_vit_fmnist_tsb', '--pretrained']
TINY_RGB = ['--model', 'snnet', '--model-kwargs', f'anchors={ANCHORS!r}', '--num-classes', '4', '--img-size', '32',
            '--crop-pct', '1.0']
COMMON = ['-b', '8', '-j', '0', '--no-progress']


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """The same images as grey PNGs and as RGB PNGs (three equal bands), 28x28 and 32x32."""
    root = tmp_path_factory.mktemp('modes')
    return {(mode, size): make_image_folder(root / f'{mode}{size}', per_class=(4, 3), size=size, mode=mode)
            for mode in ('L', 'RGB') for size in (28, 32)}


def _validate(tmp_path: Path, data: Path, model_args: list, *extra: str) -> dict:
    out = tmp_path / f'out-{data.name}'
    assert validate_main([*model_args, *COMMON, '--data-dir', str(data), '--routes', '0,34' if
                          model_args is FMNIST else '0,2', '--out', str(out), *extra]) == 0
    return {r['stitch_id']: r for r in map(json.loads, (out / 'routes.jsonl').read_text().splitlines())}


def test_validate_reads_grey_and_rgb_files_in_the_models_mode(tmp_path, folders):
    grey = _validate(tmp_path, folders['L', 28], FMNIST)
    grey_in_rgb_files = _validate(tmp_path, folders['RGB', 28], FMNIST)
    assert {k: r['count'] for k, r in grey.items()} == {0: 12, 34: 12}
    # an RGB file of equal bands converts to the same grey image: the same loss to the last digit
    assert {k: r['loss'] for k, r in grey.items()} == {k: r['loss'] for k, r in grey_in_rgb_files.items()}
    rgb_model_on_grey_files = _validate(tmp_path, folders['L', 32], TINY_RGB)
    assert [r['count'] for r in rgb_model_on_grey_files.values()] == [12, 12]


def test_input_img_mode_overrides_and_is_checked(tmp_path, folders):
    with pytest.raises(ValueError, match="'RGB' gives 3-channel images, the model takes 1"):
        _validate(tmp_path, folders['L', 28], FMNIST, '--input-img-mode', 'RGB')
    with pytest.raises(ValueError, match="'XYZ' is not a Pillow image mode"):
        _validate(tmp_path, folders['L', 28], FMNIST, '--input-img-mode', 'XYZ')
    assert image_mode(1) == 'L' and image_mode(3) == 'RGB' and image_mode(3, 'YCbCr') == 'YCbCr'
    with pytest.raises(ValueError, match='4 input channels'):
        image_mode(4)
    assert _validate(tmp_path, folders['L', 28], FMNIST, '--input-img-mode', 'L')[0]['count'] == 12


@pytest.mark.parametrize('model_args, data_key', [
    (FMNIST + ['--epochs', '1', '--opt', 'sgd', '--lr', '1e-4', '--val-routes', '34'], ('RGB', 28)),
    (TINY_RGB + ['--epochs', '1', '--opt', 'sgd', '--lr', '1e-4', '--val-routes', '0'], ('L', 32)),
])
def test_train_reads_files_in_the_models_mode(tmp_path, folders, model_args, data_key):
    assert train_main([*model_args, *COMMON, '--warmup-epochs', '0', '--data-dir', str(folders[data_key]),
                       '--out', str(tmp_path), '--experiment', 'run', '--stitch-init-samples', '8']) == 0
    assert (tmp_path / 'run' / 'last.safetensors').is_file()


def test_torchvision_datasets_are_converted_too(tmp_path):
    """timm's ``torch/`` datasets ignore ``input_img_mode``: Fashion-MNIST's grey images reach an RGB model as RGB."""
    source = tmp_path / 'idx'
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 8), ('t10k', 8)):
        write_idx(source / f'{prefix}-images-idx3-ubyte', rng.integers(0, 255, (n, 32, 32), dtype=np.uint8))
        write_idx(source / f'{prefix}-labels-idx1-ubyte', np.arange(n, dtype=np.uint8) % 4)
    root = prepare_fashion_mnist(tmp_path / 'fmnist', source)
    out = tmp_path / 'out'
    assert validate_main([*TINY_RGB, *COMMON, '--dataset', 'torch/fashion_mnist', '--data-dir', str(root),
                          '--split', 'test', '--routes', '0', '--out', str(out)]) == 0
    assert json.loads((out / 'routes.jsonl').read_text())['count'] == 8

    # a split timm would silently read as the test split, and IDX files not in torchvision's layout
    with pytest.raises(ValueError, match="split 'bogus' is not a split of torch/fashion_mnist: expected one of train"):
        validate_main([*TINY_RGB, *COMMON, '--dataset', 'torch/fashion_mnist', '--data-dir', str(root),
                       '--split', 'bogus', '--out', str(out)])
    with pytest.raises(FileNotFoundError, match=r'not in --data-dir .*idx.* prepare_fashion_mnist'):
        validate_main([*TINY_RGB, *COMMON, '--dataset', 'torch/fashion_mnist', '--data-dir', str(source),
                       '--split', 'test', '--out', str(tmp_path / 'out2')])
    assert not (tmp_path / 'out2').exists()
