"""Per-family adapters: how a stitched network runs each family's anchors block by block."""
from __future__ import annotations

from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.levit import Levit
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .base import AnchorAdapter
from .convnext import ConvNeXtAdapter
from .eva import EvaAdapter
from .levit import LevitAdapter
from .resnet import ResNetAdapter
from .staged import StagedAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

__all__ = [
    'AnchorAdapter', 'StagedAdapter', 'ViTAdapter', 'EvaAdapter', 'SwinAdapter', 'ResNetAdapter', 'ConvNeXtAdapter',
    'LevitAdapter', 'adapter_for', 'ADAPTERS',
]

#: (timm model class, adapter class), checked in order; later families append here.
ADAPTERS: list[tuple[type, type[AnchorAdapter]]] = [
    (VisionTransformer, ViTAdapter),
    (Eva, EvaAdapter),
    (SwinTransformer, SwinAdapter),
    (ResNet, ResNetAdapter),
    (ConvNeXt, ConvNeXtAdapter),
    (Levit, LevitAdapter),
]


def adapter_for(model: nn.Module) -> AnchorAdapter:
    """The adapter that drives ``model``; raises ``TypeError`` for a family timm-stitch cannot stitch."""
    for model_cls, adapter_cls in ADAPTERS:
        if isinstance(model, model_cls):
            return adapter_cls(model)
    known = ', '.join(cls.__name__ for cls, _ in ADAPTERS)
    raise TypeError(f'cannot stitch a {type(model).__name__}: supported anchor families are {known}')
