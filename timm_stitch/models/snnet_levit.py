"""Stitched LeViT-192 -> LeViT-256 (SN-Net, Pan et al., CVPR 2023): 8 routes with the official settings.

The anchors are timm's distilled LeViTs: a route's output is the mean of ``head`` and ``head_dist`` at eval and
the pair in distilled training, as the anchors do. They have BatchNorm: see :mod:`timm_stitch.bn` for
``model.recalibrate_bn`` on stitched routes.
"""
from __future__ import annotations

import re
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..convert import OfficialFormat, StateDict, register_release, staged_stitch_key
from ..model import StitchedNet
from ._factory import RELEASE_URL, create_snnet, release_cfg

__all__ = ['LEVIT_192_256_ANCHORS', 'LEVIT_STAGES', 'SNNET_LEVIT_192_256', 'levit_filter']

LEVIT_192_256_ANCHORS = ('levit_192.fb_dist_in1k', 'levit_256.fb_dist_in1k')
#: stages stitched inside (stage 2 is not)
LEVIT_STAGES = (0, 1)

_LEVIT_UNIT = {  # official (FB LeViT) child -> timm child, inside one flat ``blocks`` entry
    'attn': {'m.qkv': 'qkv', 'm.proj.1': 'proj.ln', 'm.attention_biases': 'attention_biases'},
    'mlp': {'m.0': 'ln1', 'm.2': 'ln2'},
    'attn_downsample': {'kv': 'kv', 'q.1': 'q.ln', 'proj.1': 'proj.ln', 'attention_biases': 'attention_biases'},
}
#: Conv2d_BN / Linear_BN / BN_Linear children -> ConvNorm / LinearNorm / NormLinear children
_LEVIT_PARTS = {'c': 'linear', 'bn': 'bn', 'l': 'linear'}


def levit_filter(state: StateDict, model: nn.Module) -> StateDict:
    """Facebook LeViT keys (``patch_embed.{0,2,4,6}``, one flat ``blocks`` Sequential, ``head{,_dist}.{bn,l}``) to
    timm's (``stem.conv{1-4}``, ``stages.{s}.[downsample.]``, ``head{,_dist}.{bn,linear}``).

    The flat block index is mapped by walking timm's stages in order: a stage's downsample (AttentionSubsample +
    Residual(MLP), 2 entries) comes first, then 2 entries (attention, MLP) per block. A key that fits none of
    the patterns is passed through unchanged, so that the caller reports it as unmatched; shapes are checked there.
    """
    units: list[tuple[str, str]] = []  # flat official index -> (timm prefix, unit kind)
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            units += [(f'stages.{s}.downsample.attn_downsample.', 'attn_downsample'),
                      (f'stages.{s}.downsample.mlp.', 'mlp')]
        for b in range(len(stage.blocks)):
            units += [(f'stages.{s}.blocks.{b}.attn.', 'attn'), (f'stages.{s}.blocks.{b}.mlp.', 'mlp')]
    out: StateDict = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r'patch_embed\.([0246])\.(c|bn)\.(.+)', key):
            new = f'stem.conv{int(m.group(1)) // 2 + 1}.{_LEVIT_PARTS[m.group(2)]}.{m.group(3)}'
        elif m := re.fullmatch(r'(head|head_dist)\.(bn|l)\.(.+)', key):
            new = f'{m.group(1)}.{_LEVIT_PARTS[m.group(2)]}.{m.group(3)}'
        elif (m := re.fullmatch(r'blocks\.(\d+)\.(.+)', key)) and int(m.group(1)) < len(units):
            prefix, kind = units[int(m.group(1))]
            rest = m.group(2)
            for src, dst in _LEVIT_UNIT[kind].items():
                if rest == src:
                    new = prefix + dst
                elif rest.startswith(src + '.') and (p := re.fullmatch(r'(c|bn)\.(.+)', rest[len(src) + 1:])):
                    new = f'{prefix}{dst}.{_LEVIT_PARTS[p.group(1)]}.{p.group(2)}'
        out[new] = value
    return out


#: the official SN-Net release, its anchors in Facebook LeViT's layout
SNNET_LEVIT_192_256 = register_release('snnet_levit_192_256', OfficialFormat(
    'ziplab/SN-Net v1.2 levit_192_256_release.pth', RELEASE_URL + 'v1.2/levit_192_256_release.pth', {},
    staged_stitch_key(0), {i: levit_filter for i in range(2)}))

default_cfgs = generate_default_cfgs({
    # the official SN-Net release (ziplab/SN-Net v1.2 levit_192_256_release.pth), converted on first load
    'snnet_levit_192_256.in1k': release_cfg(
        SNNET_LEVIT_192_256, 2, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.9,
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
