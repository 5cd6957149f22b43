"""Stitched LeViT-192 -> LeViT-256 (SN-Net, Pan et al., CVPR 2023): 8 routes with the official settings.

The anchors are timm's distilled LeViTs: a route's output is the mean of ``head`` and ``head_dist`` at eval and
the pair in distilled training, as the anchors do. They have BatchNorm: see :mod:`timm_stitch.bn` for
``model.recalibrate_bn`` on stitched routes.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..model import StitchedNet
from ._factory import create_snnet, release_cfg

__all__ = ['LEVIT_192_256_ANCHORS', 'LEVIT_STAGES']

LEVIT_192_256_ANCHORS = ('levit_192.fb_dist_in1k', 'levit_256.fb_dist_in1k')
#: stages stitched inside (stage 2 is not)
LEVIT_STAGES = (0, 1)

default_cfgs = generate_default_cfgs({
    # the official SN-Net release (ziplab/SN-Net v1.2 levit_192_256_release.pth), converted on first load
    'snnet_levit_192_256.in1k': release_cfg(
        'snnet_levit_192_256', 2, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.9,
        first_conv='anchors.0.stem.conv1.linear',
        classifier=tuple(f'anchors.{i}.{h}.linear' for i in range(2) for h in ('head', 'head_dist'))),
})


@register_model
def snnet_levit_192_256(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """LeViT-192 -> LeViT-256 stitched inside stages 0-1 (kernel 2, stride 1): 8 routes in the official order.

    ``pretrained=True`` loads the official release (ziplab/SN-Net v1.2 ``levit_192_256_release.pth``) with the
    authors' reported route card."""
    kwargs.setdefault('stages', LEVIT_STAGES)
    return create_snnet('snnet_levit_192_256', LEVIT_192_256_ANCHORS, pretrained, **kwargs)
