"""Input sizes of stitched networks: the size a network is costed, profiled and served at
(:func:`model_input_size`), and pretrained stitched networks at another input size, patch size or channel count.

Each anchor's part of a checkpoint goes through the anchor's own timm ``checkpoint_filter_fn`` (position embeddings,
Swin's relative-position tables and patch embeddings resampled exactly as timm does when it loads that anchor alone),
and every anchor's first conv is declared to timm, which adapts it to ``in_chans`` (``adapt_input_conv``) as it does a
plain model's.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from timm.models import adapt_input_conv
from torch import nn

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['adapt_first_convs', 'anchor_first_convs', 'filter_anchor_checkpoints', 'is_input_conv_mismatch',
           'set_anchors_input_size', 'model_input_size']


def model_input_size(model: StitchedNet) -> tuple[int, int, int]:
    """The (C, H, W) a stitched network is costed at: its fixed input size, else the ``img_size`` it was built or
    resized to (``dynamic_img_size``), else its (or its first anchor's) cfg."""
    size = model.fixed_input_size or (getattr(model, '_traits', None) or {}).get('img_size')
    if size is not None:
        return (model.in_chans, *size)
    for source in (model, model.anchors[0]):
        cfg = getattr(source, 'pretrained_cfg', None) or {}
        if cfg.get('input_size'):
            return (model.in_chans, *cfg['input_size'][-2:])
    return (model.in_chans, 224, 224)


def _anchor_first_conv(anchor: nn.Module) -> Union[str, tuple[str, ...], None]:
    traits = getattr(anchor, '_traits', None) or {}
    first = traits.get('first_conv', (getattr(anchor, 'pretrained_cfg', None) or {}).get('first_conv'))
    return first or None


def anchor_first_convs(anchors: nn.ModuleList) -> tuple[str, ...]:
    """The first convs of every anchor, as stitched-model names (``anchors.1.patch_embed.proj``), for timm's
    input-channel adaptation of pretrained weights."""
    names = []
    for i, anchor in enumerate(anchors):
        first = _anchor_first_conv(anchor)
        for name in (first,) if isinstance(first, str) else (first or ()):
            names.append(f'anchors.{i}.{name}')
    return tuple(names)


def filter_anchor_checkpoints(state_dict: Mapping[str, torch.Tensor], anchors: nn.ModuleList) -> dict:
    """``state_dict`` with each anchor's keys passed through the ``checkpoint_filter_fn`` of the anchor's timm module
    (when it has one), as timm filters a checkpoint of that anchor alone; other keys unchanged."""
    out = {k: v for k, v in state_dict.items() if not k.startswith('anchors.')}
    for i, anchor in enumerate(anchors):
        prefix = f'anchors.{i}.'
        part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        filter_fn = getattr(sys.modules.get(type(anchor).__module__), 'checkpoint_filter_fn', None)
        if part and filter_fn is not None:
            part = filter_fn(part, anchor)
        out.update((prefix + k, v) for k, v in part.items())
    return out


def is_input_conv_mismatch(key: str, saved: torch.Tensor, expected: torch.Tensor, first_convs: tuple[str, ...]) -> bool:
    """Whether ``key`` is a first-conv weight differing from the model's only in input channels: timm adapts it to
    ``in_chans`` after the pretrained filter."""
    return (key.endswith('.weight') and key[:-len('.weight')] in first_convs and saved.ndim == expected.ndim
            and saved.shape[0] == expected.shape[0] and saved.shape[2:] == expected.shape[2:])


def adapt_first_convs(state_dict: dict, model: nn.Module) -> dict:
    """``state_dict`` with every anchor's first-conv weight adapted to ``model.in_chans`` by timm's
    ``adapt_input_conv``, for loads that bypass timm's own adaptation (``custom_load``)."""
    own = model.state_dict()
    base_chans = (model.pretrained_cfg.get('input_size') or (3,))[0]
    for name in anchor_first_convs(model.anchors):
        key = f'{name}.weight'
        if key in state_dict and state_dict[key].shape != own[key].shape:
            state_dict[key] = adapt_input_conv(model.in_chans, state_dict[key], base_chans=base_chans)
    return state_dict


def set_anchors_input_size(
        anchors: nn.ModuleList,
        img_size: Optional[Union[int, tuple[int, int]]] = None,
        patch_size: Optional[Union[int, tuple[int, int]]] = None,
        **kwargs: Any,
) -> None:
    """Call timm's ``set_input_size`` on every anchor (position embeddings resampled by timm); refused before any
    anchor changes when one has none."""
    for i, anchor in enumerate(anchors):
        if not hasattr(anchor, 'set_input_size'):
            raise NotImplementedError(f'anchor {i} ({type(anchor).__name__}) has no set_input_size in timm: build the '
                                      'stitched model with img_size=... instead')
    args = {k: v for k, v in dict(img_size=img_size, patch_size=patch_size, **kwargs).items() if v is not None}
    for anchor in anchors:
        anchor.set_input_size(**args)
