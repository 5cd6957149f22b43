"""Stitched networks over modern timm families, started from each anchor's own timm weights.

No SN-Net weights are published for these: ``timm.create_model('snnet_dinov2_sbl', pretrained_anchors=True)``
builds the network from its anchors' timm pretrained tags (each downloaded through timm's usual Hub path, so
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the Hub cache apply), ready for least-squares stitch initialisation and SN-Net
training; ``pretrained_anchors=False`` builds it with random anchors. Each architecture is one row of
:data:`ZOO_ARCHS`: its anchors (smallest first, timm ``name.tag``), route count and what to say about them. Its
default cfg is derived from those tags' own cfgs: the smallest anchor's data settings (input size, mean/std,
interpolation, crop), ``num_classes`` (0 where the anchors are feature models: pass ``num_classes`` for new heads),
the anchors' classifier names, their license, and the anchors named in ``description``. Anchors share a mean/std
and, where their input size is fixed (token models), an input size; a CNN anchor trained at another size is built
for the smallest anchor's (:func:`anchor_specs`) and says so in its row.

Route counts are for the default options (kernel 2, stride 1, nearest anchors, every stage whose spatial sizes
match but the last). CNN families hold BatchNorm: see :mod:`timm_stitch.bn` for ``model.recalibrate_bn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from ..model import AnchorSpec, StitchedNet
from ._factory import SNNET_PAPER, anchor_cfg_fields, create_snnet, has_weight_source, snnet_cfg

__all__ = ['ZooArch', 'ZOO_ARCHS', 'anchor_specs', 'zoo_cfg']


@dataclass(frozen=True)
class ZooArch:
    """A registered stitched architecture over timm-pretrained anchors.

    Args:
        anchors: The anchors' timm names with their pretrained tags (``name.tag``), smallest first.
        routes: Its number of routes at full size with the default options.
        about: What it stitches, for its docstring.
        note: What else its docstring says.
    """
    anchors: tuple[str, ...]
    routes: int
    about: str
    note: str = ''

    @property
    def doc(self) -> str:
        """The entry point's docstring."""
        return f'{self.about}: {self.routes} routes.{" " + self.note if self.note else ""}'


def _tags(pattern: str, *sizes: str) -> tuple[str, ...]:
    return tuple(pattern.format(size) for size in sizes)


_FEATURES = 'The anchors are feature models (num_classes=0, as pretrained): pass num_classes for new heads.'
_IN_STAGES = 'inside the stages whose maps match'

#: architecture name -> its anchors, route count and docstring
ZOO_ARCHS: dict[str, ZooArch] = {
    'snnet_dinov2_sbl': ZooArch(
        _tags('vit_{}_patch14_dinov2.lvd142m', 'small', 'base', 'large'), 60,
        'DINOv2 ViT-S/14, B/14, L/14 (LVD-142M, 518 px) stitched S->B and B->L', _FEATURES),
    'snnet_eva02_tsb': ZooArch(
        _tags('eva02_{}_patch14_224.mim_in22k', 'tiny', 'small', 'base'), 71,
        'EVA-02 Ti/14, S/14, B/14 (MIM on ImageNet-22k, 224 px, CLIP mean/std) stitched Ti->S and S->B', _FEATURES),
    'snnet_convnextv2_ntb': ZooArch(
        _tags('convnextv2_{}.fcmae_ft_in22k_in1k', 'nano', 'tiny', 'base'), 45,
        f'ConvNeXt-V2 N, T, B (FCMAE, fine-tuned on ImageNet-22k then 1k, 224 px) stitched N->T and T->B {_IN_STAGES}'),
    'snnet_efficientnet_b0_b2': ZooArch(
        ('efficientnet_b0.ra_in1k', 'efficientnet_b1.ft_in1k', 'efficientnet_b2.ra_in1k'), 33,
        f'EfficientNet-B0, B1, B2 (ImageNet-1k, one mean/std, 224 px) stitched B0->B1 and B1->B2 {_IN_STAGES}',
        "B2's weights were trained at 256 px: it is built for B0's 224 px (its cfg's input size)."),
    'snnet_mobilenetv4_mhl': ZooArch(
        ('mobilenetv4_conv_medium.e500_r256_in1k', 'mobilenetv4_hybrid_medium.ix_e550_r256_in1k',
         'mobilenetv4_conv_large.e500_r256_in1k'), 30,
        f'MobileNetV4 conv M, hybrid M, conv L (ImageNet-1k, 256 px) stitched M->hybrid M->L {_IN_STAGES}',
        'Conv S is not among them: it splits into six stages of blocks, the others five.'),
    'snnet_regnety_004_032': ZooArch(
        _tags('regnety_{}.tv2_in1k', '004', '016', '032'), 47,
        f'RegNetY-400MF, 1.6GF, 3.2GF (torchvision v2 recipe, 224 px) stitched in size order {_IN_STAGES}'),
    'snnet_fastvit_sa12_sa36': ZooArch(
        _tags('fastvit_{}.apple_in1k', 'sa12', 'sa24', 'sa36'), 47,
        f'FastViT-SA12, SA24, SA36 (Apple, ImageNet-1k, 256 px) stitched in size order {_IN_STAGES}'),
    'snnet_swinv2_tsb': ZooArch(
        _tags('swinv2_{}_window8_256.ms_in1k', 'tiny', 'small', 'base'), 41,
        f'Swin V2 T, S, B (window 8, ImageNet-1k, 256 px) stitched T->S and S->B {_IN_STAGES}'),
}


def zoo_cfg(arch: ZooArch) -> dict[str, Any]:
    """The default pretrained cfg of ``arch``, from its anchors' own timm cfgs (see the module docstring)."""
    cfgs = [get_pretrained_cfg(tag).to_dict() for tag in arch.anchors]
    licenses = sorted({cfg['license'] for cfg in cfgs if cfg.get('license')})
    return snnet_cfg(len(cfgs), **anchor_cfg_fields(cfgs), num_classes=cfgs[0]['num_classes'],
                     license=', '.join(licenses) or None, **SNNET_PAPER,
                     description='SN-Net over ' + ', '.join(arch.anchors) + ' (pretrained_anchors=True loads them)')


default_cfgs = generate_default_cfgs({name: zoo_cfg(arch) for name, arch in ZOO_ARCHS.items()})


#: the entry-point kwargs that can name saved weights (``hf-hub:``, ``local-dir:``, a file in the overlay)
_WEIGHT_CFGS = ('pretrained_cfg', 'pretrained_cfg_overlay')


def anchor_specs(arch: ZooArch) -> list[AnchorSpec]:
    """``arch``'s anchors as they are built: a CNN anchor whose weights were trained at another input size than the
    smallest anchor's is built with that size in its cfg (``pretrained_cfg_overlay``), so that its maps are checked
    against the others' at the one input size the network takes."""
    size = get_pretrained_cfg(arch.anchors[0]).input_size
    return [tag if get_pretrained_cfg(tag).input_size == size else
            dict(model_name=tag, pretrained_cfg_overlay=dict(input_size=size)) for tag in arch.anchors]


def _entry_point(name: str, arch: ZooArch) -> Callable[..., StitchedNet]:
    """The registered entry point ``name`` of ``arch``, a module-level function as timm's registry expects."""
    def entry(pretrained: bool = False, **kwargs: Any) -> StitchedNet:
        if pretrained and not any(has_weight_source(kwargs.get(k)) for k in _WEIGHT_CFGS):
            raise ValueError(
                f"{name} has no SN-Net weights of its own: pass pretrained_anchors=True to start from its anchors' "
                f"timm weights ({', '.join(arch.anchors)}), or load saved ones with 'hf-hub:ORG/REPO', "
                "'local-dir:PATH' or pretrained_cfg_overlay=dict(file=...)")
        return create_snnet(name, anchor_specs(arch), pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = arch.doc
    return entry


for _name, _arch in ZOO_ARCHS.items():
    globals()[_name] = register_model(_entry_point(_name, _arch))
