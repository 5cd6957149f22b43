"""A small DeiT-style anchor family for Fashion-MNIST (28x28 grey images, patch 4) and its stitched network.

The anchors scale width and heads like DeiT-Ti/S/B (2x per step, 16-dim heads) at depth 6. The stitched network
``snnet_vit_fmnist_tsb`` uses the official DeiT settings (kernel 2, stride 1, nearest): 3 + 2 x 16 = 35 routes.
``benchmarks/fmnist_pipeline.py --ship`` trains it end to end and writes fp16 weights and the route card into
the package (``SHIPPED_DIR``), from where ``pretrained=True`` loads them with no network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..data.fashion_mnist import FASHION_MNIST_CLASSES
from ..model import StitchedNet
from ._factory import create_snnet, snnet_cfg

__all__ = ['FMNIST_MEAN', 'FMNIST_STD', 'FMNIST_ANCHORS', 'SHIPPED_DIR']

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
#: (name, embed_dim, num_heads)
FMNIST_ANCHORS = (('vit_fmnist_tiny', 32, 2), ('vit_fmnist_small', 64, 4), ('vit_fmnist_base', 128, 8))
SHIPPED_DIR = Path(__file__).resolve().parents[1] / 'data' / 'snnet_vit_fmnist_tsb'

def _shipped_source() -> dict[str, str]:
    weights = SHIPPED_DIR / 'model.safetensors'
    return dict(file=str(weights)) if weights.is_file() else {}


_DATA_CFG = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation='bilinear',
                 mean=FMNIST_MEAN, std=FMNIST_STD, fixed_input_size=True, license='apache-2.0',
                 label_names=FASHION_MNIST_CLASSES)

default_cfgs = generate_default_cfgs({
    **{name: dict(url='', pool_size=None, first_conv='patch_embed.proj', classifier='head', **_DATA_CFG)
       for name, _, _ in FMNIST_ANCHORS},
    # weights ship at SHIPPED_DIR once benchmarks/fmnist_pipeline.py --ship has run; until then none are offered
    'snnet_vit_fmnist_tsb': snnet_cfg(3, **_shipped_source(), **_DATA_CFG),
})


def _create_anchor(variant: str, embed_dim: int, num_heads: int, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=embed_dim, depth=6, num_heads=num_heads,
                mlp_ratio=4.0, num_classes=10)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **dict(args, **kwargs))


@register_model
def vit_fmnist_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Fashion-MNIST anchor like DeiT-Ti: width 32, 2 heads, depth 6, patch 4."""
    return _create_anchor('vit_fmnist_tiny', 32, 2, pretrained, **kwargs)


@register_model
def vit_fmnist_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Fashion-MNIST anchor like DeiT-S: width 64, 4 heads, depth 6, patch 4."""
    return _create_anchor('vit_fmnist_small', 64, 4, pretrained, **kwargs)


@register_model
def vit_fmnist_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Fashion-MNIST anchor like DeiT-B: width 128, 8 heads, depth 6, patch 4."""
    return _create_anchor('vit_fmnist_base', 128, 8, pretrained, **kwargs)


@register_model
def snnet_vit_fmnist_tsb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """The Fashion-MNIST anchors stitched Ti->S and S->B: 35 routes; ``pretrained=True`` loads the shipped weights."""
    kwargs.setdefault('in_chans', 1)
    return create_snnet('snnet_vit_fmnist_tsb', [name for name, _, _ in FMNIST_ANCHORS], pretrained, **kwargs)
