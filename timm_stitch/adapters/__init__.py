"""Per-family adapters: how a stitched network runs each family's anchors block by block.

Each family module registers its adapter with :func:`register_adapter`; importing it here is what makes the family
stitchable. Adding a family = one new module here (an ``AnchorAdapter`` subclass under ``@register_adapter``) and
its import below.
"""
from .base import ADAPTERS, AnchorAdapter, adapter_for, params_of, register_adapter
from .convnext import ConvNeXtAdapter
from .eva import EvaAdapter
from .levit import LevitAdapter
from .resnet import ResNetAdapter
from .staged import StagedAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

__all__ = [
    'AnchorAdapter', 'StagedAdapter', 'ViTAdapter', 'EvaAdapter', 'SwinAdapter', 'ResNetAdapter', 'ConvNeXtAdapter',
    'LevitAdapter', 'adapter_for', 'register_adapter', 'params_of', 'ADAPTERS',
]
