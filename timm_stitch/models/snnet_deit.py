"""Stitched DeiT-Ti/S/B (SN-Net, Pan et al., CVPR 2023): 71 routes with the official settings."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..model import StitchedNet
from ._factory import create_snnet, snnet_cfg

__all__: list[str] = []

DEIT_TINY, DEIT_SMALL, DEIT_BASE = 'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224'


def _cfg(num_anchors: int, **kwargs: Any) -> dict[str, Any]:
    return snnet_cfg(num_anchors, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, **kwargs)


#: Hub org of the published checkpoints (``timm-stitch/{architecture}.{tag}``)
HUB_ORG = 'timm-stitch'

default_cfgs = generate_default_cfgs({
    # the official SN-Net release (ziplab/SN-Net v1.0 snnet_deit.pth), converted with `timm-stitch convert`
    'snnet_deit_tsb.in1k': _cfg(3, hf_hub_id=f'{HUB_ORG}/snnet_deit_tsb.in1k'),
    'snnet_deit_ts': _cfg(2),
    'snnet_deit_sb': _cfg(2),
})


@register_model
def snnet_deit_tsb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-Ti/S/B stitched Ti->S and S->B (kernel 2, stride 1, nearest): 71 routes in the official order.

    The pretrained weights are the official release, whose stitched routes skip the final norm (SPEC §2.4): with
    ``pretrained=True`` that is the default; pass ``final_norm_on_stitched_routes=True`` for weights trained with it.
    """
    if pretrained:
        kwargs.setdefault('final_norm_on_stitched_routes', False)
    return create_snnet('snnet_deit_tsb', [DEIT_TINY, DEIT_SMALL, DEIT_BASE], pretrained, **kwargs)


@register_model
def snnet_deit_ts(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-Ti/S stitched Ti->S: 36 routes."""
    return create_snnet('snnet_deit_ts', [DEIT_TINY, DEIT_SMALL], pretrained, **kwargs)


@register_model
def snnet_deit_sb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-S/B stitched S->B: 36 routes."""
    return create_snnet('snnet_deit_sb', [DEIT_SMALL, DEIT_BASE], pretrained, **kwargs)
