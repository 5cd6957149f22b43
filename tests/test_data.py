"""Fashion-MNIST IDX reading and timm dataset layout, on small IDX files written here."""
import gzip

import numpy as np
import pytest
import timm.data

import timm_stitch.data
from timm_stitch.data import (
    GreyImageDataset,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    prepare_fashion_mnist,
    read_idx,
)


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'idx'
    folder.mkdir()
    for prefix, n in (('train', 12), ('t10k', 5)):
        write_idx(folder / f'{prefix}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(folder / f'{prefix}-labels-idx1-ubyte', rng.integers(0, 10, n))
    return folder


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24).reshape(2, 3, 4)
    write_idx(tmp_path / 'a', array)
    np.testing.assert_array_equal(read_idx(tmp_path / 'a'), array)


def test_library_idx_writer_matches_the_format(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / 'expected', array)
    timm_stitch.data.write_idx(tmp_path / 'plain', array)
    timm_stitch.data.write_idx(tmp_path / 'packed.gz', array)
    assert (tmp_path / 'plain').read_bytes() == (tmp_path / 'expected').read_bytes()
    assert gzip.decompress((tmp_path / 'packed.gz').read_bytes()) == (tmp_path / 'expected').read_bytes()


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / 'bad').write_bytes(b'\x01\x02\x03\x04')
    with pytest.raises(ValueError, match='not an IDX file'):
        read_idx(tmp_path / 'bad')
    write_idx(tmp_path / 'short', np.zeros((4, 4)))
    (tmp_path / 'short').write_bytes((tmp_path / 'short').read_bytes()[:-3])
    with pytest.raises(ValueError, match='truncated'):
        read_idx(tmp_path / 'short')


def test_load_and_timm_dataset(source, tmp_path):
    images, labels = load_fashion_mnist('test', source)
    assert images.shape == (5, 28, 28) and labels.dtype == np.int64
    root = prepare_fashion_mnist(tmp_path / 'root', source)
    assert prepare_fashion_mnist(root, source) == root  # idempotent
    dataset = timm.data.create_dataset('torch/fashion_mnist', root=str(root), split='train')
    image, label = dataset[3]
    assert len(dataset) == 12 and image.size == (28, 28) and image.mode == 'L'
    np.testing.assert_array_equal(np.asarray(image), load_fashion_mnist('train', source)[0][3])


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        load_fashion_mnist('train', tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist('val', tmp_path)


def test_shipped_sample_and_grey_dataset():
    images, labels = load_fashion_mnist_sample()
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [107, 105, 111, 93, 115, 87, 97, 95, 95, 95]  # the test split's first 1k
    dataset = GreyImageDataset(images, labels, transform=np.asarray)
    image, label = dataset[7]
    np.testing.assert_array_equal(image, images[7])
    assert label == labels[7] and len(dataset) == 1000
    with pytest.raises(ValueError, match='need images'):
        GreyImageDataset(images, labels[:10])
