"""Stitched DeiT-3 pairs of SN-Netv2 ("Stitched ViTs are Flexible Vision Backbones", Pan et al.): two anchors
stitched both ways (small->large, large->small, and the three-segment routes through both) by stitching layers
with a low-rank update, 135 routes in the official ids. Every route ends with its last anchor's final norm and
head, as the official code runs them (the default ``final_norm_on_stitched_routes=True``)."""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

from ..convert import OfficialFormat, deit_stitch_key, register_release
from ..model import StitchedNet
from ._factory import create_snnet, release_cfg

__all__ = ['DEIT3_SMALL', 'DEIT3_BASE', 'DEIT3_LARGE', 'SNNETV2_LORA_RANK', 'deit3_filter']

#: the DeiT-3 weights SN-Netv2 stitched: ImageNet-21k pretrained, fine-tuned on ImageNet-1k at 224
#: (``deit_3_{small,base,large}_224_21k.pth``, which timm publishes under these tags)
DEIT3_SMALL = 'deit3_small_patch16_224.fb_in22k_ft_in1k'
DEIT3_BASE = 'deit3_base_patch16_224.fb_in22k_ft_in1k'
DEIT3_LARGE = 'deit3_large_patch16_224.fb_in22k_ft_in1k'
#: the stitching layers' low-rank update of every official SN-Netv2 classification config
SNNETV2_LORA_RANK = 64


#: where the SN-Netv2 releases are published (also in the authors' Hub repos, loaded from there first)
RELEASE_URL_V2 = 'https://github.com/ziplab/SN-Netv2/releases/download/'

#: DeiT-3 (FB ``vit_models``) keys to timm's: ``blocks.N.gamma_{1,2}`` become ``blocks.N.ls{1,2}.gamma``
deit3_filter = partial(vit_filter, adapt_layer_scale=True)


def _snnetv2_deit3(arch: str, pair: str) -> OfficialFormat:
    """Register the SN-Netv2 DeiT-3 release of ``pair`` (``s_l``...) as ``arch``'s: two anchors,
    ``stitch_layers.{0,1}.{layer}`` for the small->large and large->small layers (our pairs 0 and 1 of the one token
    stage)."""
    name = f'snnetv2_deit3_{pair}'
    return register_release(arch, OfficialFormat(
        f'ziplab/SN-Netv2 1.0 {name}.pth', f'{RELEASE_URL_V2}1.0/{name}.pth', {}, deit_stitch_key,
        {i: deit3_filter for i in range(2)}, hf_hub=(f'ziplab/{name}_imagenet_1k', f'{name}.pth')))


def _v2_cfg(arch: str, pair: str) -> dict[str, Any]:
    # the official evaluation resizes to 224 and crops all of it (crop ratio 1.0)
    return release_cfg(_snnetv2_deit3(arch, pair), 2, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                       crop_pct=1.0, origin_url='https://github.com/ziplab/SN-Netv2', paper_ids='arXiv:2307.00154',
                       paper_name='Stitched ViTs are Flexible Vision Backbones')


default_cfgs = generate_default_cfgs({
    # the authors' SN-Netv2 releases (Hub repos ziplab/snnetv2_deit3_{s_b,s_l,b_l}_imagenet_1k), converted on load
    'snnet_deit3_sb.in1k': _v2_cfg('snnet_deit3_sb', 's_b'),
    'snnet_deit3_sl.in1k': _v2_cfg('snnet_deit3_sl', 's_l'),
    'snnet_deit3_bl.in1k': _v2_cfg('snnet_deit3_bl', 'b_l'),
})


def _create_v2(variant: str, anchors: list[str], pretrained: bool, **kwargs: Any) -> StitchedNet:
    """The SN-Netv2 settings (two-way routes, rank-64 low-rank stitching layers) unless the caller sets them."""
    kwargs.setdefault('route_space', 'two_way')
    kwargs.setdefault('stitch_lora_rank', SNNETV2_LORA_RANK)
    return create_snnet(variant, anchors, pretrained, **kwargs)


@register_model
def snnet_deit3_sb(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-3 S/B (12 and 12 blocks) stitched both ways: 135 routes in the official SN-Netv2 ids.

    ``pretrained=True`` loads the authors' release (Hub ``ziplab/snnetv2_deit3_s_b_imagenet_1k``, file
    ``snnetv2_deit3_s_b.pth``), converted on first load. The authors published no per-route results for it.
    """
    return _create_v2('snnet_deit3_sb', [DEIT3_SMALL, DEIT3_BASE], pretrained, **kwargs)


@register_model
def snnet_deit3_sl(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-3 S/L (12 and 24 blocks) stitched both ways: 135 routes in the official SN-Netv2 ids.

    ``pretrained=True`` loads the authors' release (Hub ``ziplab/snnetv2_deit3_s_l_imagenet_1k``, file
    ``snnetv2_deit3_s_l.pth``), converted on first load, with the authors' reported route card (ImageNet-1k top-1
    of 134 routes; route 13, every small block then the large anchor's head, was never trained nor evaluated).
    """
    return _create_v2('snnet_deit3_sl', [DEIT3_SMALL, DEIT3_LARGE], pretrained, **kwargs)


@register_model
def snnet_deit3_bl(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
    """DeiT-3 B/L (12 and 24 blocks) stitched both ways: 135 routes in the official SN-Netv2 ids.

    ``pretrained=True`` loads the authors' release (Hub ``ziplab/snnetv2_deit3_b_l_imagenet_1k``, file
    ``snnetv2_deit3_b_l.pth``), converted on first load. The authors published no per-route results for it.
    """
    return _create_v2('snnet_deit3_bl', [DEIT3_BASE, DEIT3_LARGE], pretrained, **kwargs)
