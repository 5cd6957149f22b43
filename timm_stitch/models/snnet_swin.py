"""Stitched Swin-Ti/S/B (SN-Net, Pan et al., CVPR 2023): 41 routes with the official settings."""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

from ..convert import OfficialFormat, register_release, staged_stitch_key
from ..model import StitchedNet
from ._factory import RELEASE_URL, create_snnet, release_cfg

__all__ = ['SWIN_TSB_ANCHORS', 'SWIN_STAGES', 'SNNET_SWIN_TSB', 'swin_filter']

#: the ImageNet-22k -> 1k weights SN-Net stitched (timm's default Swin tags are other weights)
SWIN_TSB_ANCHORS = (
    'swin_tiny_patch4_window7_224.ms_in22k_ft_in1k',
    'swin_small_patch4_window7_224.ms_in22k_ft_in1k',
    'swin_base_patch4_window7_224.ms_in22k_ft_in1k',
)
#: stages stitched inside (the last stage is never stitched)
SWIN_STAGES = (0, 1, 2)

#: the official SN-Net release, trained with the official stitching-layer sharing; anchors through timm's Swin filter
SNNET_SWIN_TSB = register_release('snnet_swin_tsb', OfficialFormat(
    'ziplab/SN-Net v1.0 snnet_swin.pth', RELEASE_URL + 'v1.0/snnet_swin.pth', dict(layer_mapping='official'),
    staged_stitch_key(0), {i: swin_filter for i in range(3)}))

default_cfgs = generate_default_cfgs({
    # the official SN-Net release (ziplab/SN-Net v1.0 snnet_swin.pth), converted on first load
    'snnet_swin_tsb.in1k': release_cfg(
        SNNET_SWIN_TSB, 3, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.9,
        classifier=tuple(f'anchors.{i}.head.fc' for i in range(3))),
})


@register_model
def snnet_swin_tsb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """Swin-Ti/S/B stitched Ti->S and S->B inside stages 0-2 (kernel 2, stride 1, nearest): 41 routes in the
    official order.

    ``pretrained=True`` loads the official release (ziplab/SN-Net v1.0 ``snnet_swin.pth``) with the authors'
    reported route card, and defaults to ``layer_mapping='official'``: the released code shares stitching layers
    between unequal-depth stages by its own index mapping, which its weights were trained with."""
    kwargs.setdefault('stages', SWIN_STAGES)
    return create_snnet('snnet_swin_tsb', SWIN_TSB_ANCHORS, pretrained, **kwargs)
