"""Stitched DeiT-Ti/S/B (SN-Net, Pan et al., CVPR 2023): 71 routes with the official settings."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..convert import OfficialFormat, deit_stitch_key, register_release
from ..model import StitchedNet
from ._factory import RELEASE_URL, create_snnet, release_cfg, snnet_cfg

__all__ = ['SNNET_DEIT_TSB']

DEIT_TINY, DEIT_SMALL, DEIT_BASE = 'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224'


_DATA = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

#: the official SN-Net release: its stitched routes skip the last anchor's final norm, as the official code does
SNNET_DEIT_TSB = register_release('snnet_deit_tsb', OfficialFormat(
    'ziplab/SN-Net v1.0 snnet_deit.pth', RELEASE_URL + 'v1.0/snnet_deit.pth',
    dict(final_norm_on_stitched_routes=False), deit_stitch_key))

default_cfgs = generate_default_cfgs({
    # the official SN-Net release (ziplab/SN-Net v1.0 snnet_deit.pth), converted on first load
    'snnet_deit_tsb.in1k': release_cfg(SNNET_DEIT_TSB, 3, **_DATA),
    'snnet_deit_ts': snnet_cfg(2, **_DATA),
    'snnet_deit_sb': snnet_cfg(2, **_DATA),
})


@register_model
def snnet_deit_tsb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-Ti/S/B stitched Ti->S and S->B (kernel 2, stride 1, nearest): 71 routes in the official order.

    ``pretrained=True`` loads the official release (ziplab/SN-Net v1.0 ``snnet_deit.pth``) with the authors'
    reported route card. Its stitched routes skip the last anchor's final norm, as the official code does: with
    ``pretrained=True`` that is the default; pass ``final_norm_on_stitched_routes=True`` for weights trained with it.
    """
    return create_snnet('snnet_deit_tsb', [DEIT_TINY, DEIT_SMALL, DEIT_BASE], pretrained, **kwargs)


@register_model
def snnet_deit_ts(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-Ti/S stitched Ti->S: 36 routes."""
    return create_snnet('snnet_deit_ts', [DEIT_TINY, DEIT_SMALL], pretrained, **kwargs)


@register_model
def snnet_deit_sb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-S/B stitched S->B: 36 routes."""
    return create_snnet('snnet_deit_sb', [DEIT_SMALL, DEIT_BASE], pretrained, **kwargs)
