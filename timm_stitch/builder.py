"""Stitch any compatible timm family: ``timm_stitch.stitch(['convnext_atto', 'convnext_femto'], ...)``.

The builder builds the anchors and sorts them by size, then returns a :class:`~timm_stitch.model.StitchedNet` over
them, which checks that they can be stitched (:mod:`timm_stitch.anchor_checks`) and picks the stitch positions.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from .adapters import adapter_for
from .anchor_checks import stitchable_stages
from .anchors import AnchorSpec, anchor_name, build_anchor, check_anchor_sequence, per_anchor_kwargs
from .model import StitchedNet
from .route_spaces import StitchOptions

__all__ = ['StitchOptions', 'stitch', 'stitchable_stages']

#: keyword arguments of ``stitch`` that go to :class:`StitchedNet` (the others build the anchors)
_NET_ARGS = ('final_norm_on_stitched_routes', 'stitch_id', 'stitch_lora_rank', 'stitch_lora_alpha')


def stitch(
        anchors: Sequence[AnchorSpec],
        options: Optional[StitchOptions] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        pretrained_anchors: bool = False,
        **kwargs: Any,
) -> StitchedNet:
    """Stitch ``anchors`` (timm names, ``create_model`` kwargs dicts or built models; any order) into one network.

    Anchors are sorted by parameter count (smallest first, as SN-Net requires), except that feature maps feed tokens
    and not the reverse: of two anchors with different stage structures, a CNN (feature-map stages) comes before a
    plain token model (ViT), so ``stitch(['resnet50', 'vit_small_patch16_224'])`` stitches ResNet-50 stage 2 into
    ViT-S/16 although ViT-S has fewer parameters. Option fields
    (``kernel_size``, ``stride``, ``nearest``, ``multi_anchor``, ``stages``, ``layer_mapping``, ``route_space``) may
    be given as an ``options`` object or as keyword arguments; other keywords go to :class:`StitchedNet` or, for
    anchors given by name, to ``timm.create_model`` (``img_size``, ``drop_path_rate``...; a sequence
    ``drop_path_rate`` gives each anchor, in the order given, its own rate).

    Raises:
        TypeError: An anchor's family cannot be stitched.
        ValueError: The anchors cannot be stitched together; the message names what differs.
    """
    options = StitchOptions.of(options, kwargs)
    check_anchor_sequence(anchors)
    net_kwargs = {k: kwargs.pop(k) for k in _NET_ARGS if k in kwargs}
    net_kwargs.update((k, kwargs[k]) for k in ('device', 'dtype') if kwargs.get(k) is not None)  # anchors' too
    if kwargs.get('img_size') is None:
        kwargs.pop('img_size', None)
    models = [build_anchor(a, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained_anchors, **kw)
              for a, kw in zip(anchors, per_anchor_kwargs(kwargs, len(anchors)))]
    names = [anchor_name(a, m) for a, m in zip(anchors, models)]
    order = _feature_maps_first(models, sorted(range(len(models)),
                                               key=lambda i: sum(p.numel() for p in models[i].parameters())))
    return StitchedNet([models[i] for i in order], num_classes=num_classes, in_chans=in_chans, options=options,
                       anchor_names=[names[i] for i in order], **net_kwargs)


def _feature_maps_first(models: Sequence[nn.Module], order: list[int]) -> list[int]:
    """``order`` with a CNN put before a plain token model when the two are the only anchors (a token anchor's
    activations cannot feed feature-map stages; the other way, a resampling stitch joins them)."""
    if len(order) != 2 or type(models[order[0]]) is type(models[order[1]]):  # one family: one stage structure
        return order
    front, end = (adapter_for(models[i]) for i in order)
    if len(front.stage_depths()) != len(end.stage_depths()) and set(front.stage_layouts()) == {'tokens'} \
            and set(end.stage_layouts()) & {'nchw', 'nhwc'}:
        return order[::-1]
    return order
