"""Stitched ResNet-18 -> ResNet-50 and ResNet-18 -> Swin-Ti (SN-Net, Pan et al., CVPR 2023): 10 and 8 routes.

Both stitch inside stages 1 and 2 with 1x1-convolution stitching layers. Into Swin (channels-last maps in current
timm) the layer's output is permuted to NHWC as a view. The anchors have BatchNorm: see :mod:`timm_stitch.bn` for
``model.recalibrate_bn`` on stitched routes.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..convert import OfficialFormat, register_release, staged_stitch_key
from ..model import StitchedNet
from ._factory import RELEASE_URL, create_snnet, release_cfg
from .snnet_swin import SWIN_TSB_ANCHORS, swin_filter

__all__ = ['RESNET_18_50_ANCHORS', 'RESNET18_SWIN_TI_ANCHORS', 'RESNET_STAGES', 'SNNET_RESNET_18_50',
           'SNNET_RESNET18_SWIN_TI']

RESNET_18_50_ANCHORS = ('resnet18.tv_in1k', 'resnet50.a1_in1k')
RESNET18_SWIN_TI_ANCHORS = ('resnet18.tv_in1k', SWIN_TSB_ANCHORS[0])
#: stages stitched inside (ResNet ``layer2``, ``layer3``; Swin ``layers[1]``, ``layers[2]``)
RESNET_STAGES = (1, 2)

#: the official SN-Net releases (stages counted from ResNet's stem: their stitching layers' stage 0 is our stage 1),
#: trained with the official stitching-layer sharing
SNNET_RESNET_18_50 = register_release('snnet_resnet_18_50', OfficialFormat(
    'ziplab/SN-Net v1.1 resnet_18_50.pth', RELEASE_URL + 'v1.1/resnet_18_50.pth', dict(layer_mapping='official'),
    staged_stitch_key(1)))
SNNET_RESNET18_SWIN_TI = register_release('snnet_resnet18_swin_ti', OfficialFormat(
    'ziplab/SN-Net v1.1 resnet18_swin_ti.pth', RELEASE_URL + 'v1.1/resnet18_swin_ti.pth',
    dict(layer_mapping='official'), staged_stitch_key(1), {1: swin_filter}))


def _cfg(release: OfficialFormat, classifiers: tuple[str, ...], **kwargs: Any) -> dict[str, Any]:
    # ResNet anchors take no img_size: the input size is not a model argument here
    return release_cfg(release, len(classifiers), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     fixed_input_size=False, first_conv='anchors.0.conv1', classifier=classifiers, **kwargs)


default_cfgs = generate_default_cfgs({
    # the official SN-Net releases (ziplab/SN-Net v1.1 resnet_18_50.pth, resnet18_swin_ti.pth), converted on first load
    'snnet_resnet_18_50.in1k': _cfg(SNNET_RESNET_18_50, ('anchors.0.fc', 'anchors.1.fc')),
    'snnet_resnet18_swin_ti.in1k': _cfg(SNNET_RESNET18_SWIN_TI, ('anchors.0.fc', 'anchors.1.head.fc'),
                                        crop_pct=0.9),
})


@register_model
def snnet_resnet_18_50(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """ResNet-18 -> ResNet-50 stitched inside stages 1-2 with 1x1 convolutions: 10 routes in the official order.

    ``pretrained=True`` loads the official release (ziplab/SN-Net v1.1 ``resnet_18_50.pth``) with the authors'
    reported route card, and defaults to ``layer_mapping='official'``, the stitching-layer sharing it was trained
    with."""
    kwargs.setdefault('stages', RESNET_STAGES)
    return create_snnet('snnet_resnet_18_50', RESNET_18_50_ANCHORS, pretrained, **kwargs)


@register_model
def snnet_resnet18_swin_ti(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """ResNet-18 front, Swin-Ti back, stitched inside stages 1-2 (NCHW -> NHWC): 8 routes in the official order.
    ``img_size`` applies to the Swin anchor only (ResNet takes any size).

    ``pretrained=True`` loads the official release (ziplab/SN-Net v1.1 ``resnet18_swin_ti.pth``) with the authors'
    reported route card, and defaults to ``layer_mapping='official'``, the stitching-layer sharing it was trained
    with."""
    kwargs.setdefault('stages', RESNET_STAGES)
    anchors: list[Any] = list(RESNET18_SWIN_TI_ANCHORS)
    if kwargs.get('img_size') is not None:
        anchors[1] = dict(model_name=anchors[1], img_size=kwargs.pop('img_size'))
    return create_snnet('snnet_resnet18_swin_ti', anchors, pretrained, **kwargs)
