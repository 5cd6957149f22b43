"""Small offline datasets for the shipped stitched networks."""
from .fashion_mnist import (
                            FASHION_MNIST_CLASSES,
                            GreyImageDataset,
                            load_fashion_mnist,
                            load_fashion_mnist_sample,
                            prepare_fashion_mnist,
                            read_idx,
                            write_idx,
)

__all__ = ['FASHION_MNIST_CLASSES', 'GreyImageDataset', 'load_fashion_mnist', 'load_fashion_mnist_sample',
           'prepare_fashion_mnist', 'read_idx', 'write_idx']
