"""Fashion-MNIST from local IDX files (Debian's ``dataset-fashion-mnist`` or any folder), for timm's loaders.

``prepare_fashion_mnist(root)`` lays the files out as torchvision's ``FashionMNIST`` expects them, so timm's own
``create_dataset('torch/fashion_mnist', root=root)`` (and the trainer's ``--dataset torch/fashion_mnist``) reads
them without any download.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .._io import atomic_dir

__all__ = ['FASHION_MNIST_CLASSES', 'DEFAULT_SOURCES', 'SAMPLE_FILE', 'read_idx', 'write_idx', 'find_source',
           'prepare_fashion_mnist', 'load_fashion_mnist', 'load_fashion_mnist_sample', 'GreyImageDataset']

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
#: where Debian's ``dataset-fashion-mnist`` package installs the IDX files
DEFAULT_SOURCES = (Path('/usr/share/datasets/fashion-mnist'),)
#: the first 1,000 test images and labels, shipped so that tests and the demo run without the full dataset
SAMPLE_FILE = Path(__file__).resolve().parent / 'fashion_mnist_test_1k.npz'
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}

PathLike = Union[str, os.PathLike]


def _open(path: Path):
    return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def _locate(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the MNIST family."""
    path = Path(path)
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file (bad magic number {data[:4].hex()})')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f'{path} is truncated: header says {shape}, found {array.size} values')
    return array.reshape(shape)


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``), as :func:`read_idx` reads it."""
    path = Path(path)
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == '.gz' else data)


def find_source(source: Optional[PathLike] = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (plain or .gz)."""
    folders = [Path(source)] if source is not None else list(DEFAULT_SOURCES)
    for folder in folders:
        if all(_locate(folder, name) for names in _FILES.values() for name in names):
            return folder
    where = ', '.join(str(f) for f in folders)
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found in {where}: install Debian\'s dataset-fashion-mnist '
        '(apt-get install dataset-fashion-mnist) or pass the folder holding train-images-idx3-ubyte[.gz] etc.')


def load_fashion_mnist(split: str = 'test', source: Optional[PathLike] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the 'train' or 'test' split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_source(source)
    images_name, labels_name = _FILES[split]
    images, labels = read_idx(_locate(folder, images_name)), read_idx(_locate(folder, labels_name))
    if len(images) != len(labels):
        raise ValueError(f'{split} split has {len(images)} images but {len(labels)} labels')
    return images, labels.astype(np.int64)


def load_fashion_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """The first 1,000 test images and labels, shipped with the package (the test split's first rows)."""
    with np.load(SAMPLE_FILE) as sample:
        return sample['images'], sample['labels'].astype(np.int64)


class GreyImageDataset(torch.utils.data.Dataset):
    """``(PIL image, label)`` pairs from uint8 arrays, like torchvision's ``FashionMNIST``, for timm's transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f'need images (N, H, W) and N labels, got {images.shape} and {labels.shape}')
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def prepare_fashion_mnist(root: PathLike, source: Optional[PathLike] = None) -> Path:
    """Lay the IDX files out under ``root/FashionMNIST/raw`` (torchvision's layout) and return ``root``.

    Idempotent; written to a temporary folder and renamed, so an interrupted run leaves nothing half-written. A
    ``raw`` folder holding other files than these is left alone (``ForeignFilesError``).
    """
    root = Path(root)
    raw = root / 'FashionMNIST' / 'raw'
    names = [name for pair in _FILES.values() for name in pair]
    if all((raw / name).is_file() for name in names):
        return root
    folder = find_source(source)
    with atomic_dir(raw, names, what='prepare_fashion_mnist') as tmp:
        for name in names:
            read_idx(_locate(folder, name))  # validate before publishing
            with _open(_locate(folder, name)) as src, open(tmp / name, 'wb') as dst:
                shutil.copyfileobj(src, dst)
    return root
