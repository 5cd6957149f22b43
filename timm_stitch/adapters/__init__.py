"""Per-family adapters: how a stitched network runs each family's anchors block by block.

Any timm family is driven by :class:`GenericAdapter`, derived from the model's own ``feature_info`` and traced
``forward_features`` and verified against its own output when built. A family module here registers a hand-written
adapter with :func:`register_adapter` only where the generic one cannot express it or the official releases need
its unit layout (the most specific registered class wins, so :class:`GenericAdapter` is the fallback).
"""
from .base import ADAPTERS, AnchorAdapter, adapter_for, params_of, register_adapter
from .convnext import ConvNeXtAdapter
from .eva import EvaAdapter
from .generic import GenericAdapter
from .levit import LevitAdapter
from .resnet import ResNetAdapter
from .staged import StagedAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

__all__ = [
    'AnchorAdapter', 'StagedAdapter', 'ViTAdapter', 'EvaAdapter', 'SwinAdapter', 'ResNetAdapter', 'ConvNeXtAdapter',
    'LevitAdapter', 'GenericAdapter', 'adapter_for', 'register_adapter', 'params_of', 'ADAPTERS',
]
