"""Building the anchors of a stitched network: timm models by name, kwargs dict or instance."""
from __future__ import annotations

import difflib
from typing import Any, Optional, Union

import timm
from torch import nn

from .errors import UnknownAnchorError

__all__ = ['AnchorSpec', 'build_anchor', 'check_anchor_sequence', 'per_anchor_kwargs', 'anchor_name']

#: an anchor given as a timm model name, a dict of ``timm.create_model`` arguments, or a built timm model
AnchorSpec = Union[str, dict, nn.Module]


def check_anchor_sequence(anchors: Any) -> None:
    """``TypeError`` for one anchor where a sequence is due (a name would be read letter by letter), ``ValueError``
    for none."""
    if isinstance(anchors, (str, dict, nn.Module)):
        raise TypeError(f'anchors must be a sequence of anchors, not one {type(anchors).__name__} '
                        f'({anchors!r:.80}): e.g. [{anchors!r:.40}, ...]')
    if not anchors:
        raise ValueError('a stitched network needs at least one anchor')


def build_anchor(
        spec: AnchorSpec, num_classes: Optional[int], in_chans: Optional[int], pretrained: bool, **kwargs: Any,
) -> nn.Module:
    """The anchor ``spec`` names, built with ``timm.create_model`` (a built model is returned as it is)."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        spec = dict(model_name=spec)
    if not isinstance(spec, dict) or 'model_name' not in spec:
        raise TypeError(f'an anchor must be a timm model name, a dict with "model_name", or a model; got {spec!r}')
    args = dict(pretrained=pretrained, **kwargs)
    args.update((k, v) for k, v in (('num_classes', num_classes), ('in_chans', in_chans)) if v is not None)
    args.update(spec)
    name = args['model_name']
    if isinstance(name, str) and ':' not in name and not timm.is_model(name):
        close = difflib.get_close_matches(name.split('.')[0], timm.list_models(), n=3)
        raise UnknownAnchorError(f'unknown anchor {name!r}: no timm architecture of that name'
                                 + (f' (did you mean {", ".join(close)}?)' if close else ' (see timm.list_models())'))
    return timm.create_model(**args)


def per_anchor_kwargs(anchor_kwargs: dict[str, Any], num_anchors: int) -> list[dict[str, Any]]:
    """``anchor_kwargs`` for each anchor: a sequence ``drop_path_rate`` is split, one rate per anchor."""
    rate = anchor_kwargs.get('drop_path_rate')
    if not isinstance(rate, (list, tuple)):
        return [anchor_kwargs] * num_anchors
    if len(rate) != num_anchors:
        raise ValueError(f'drop_path_rate has {len(rate)} values {list(rate)}: give one rate, or one per anchor '
                         f'({num_anchors})')
    return [dict(anchor_kwargs, drop_path_rate=r) for r in rate]


def anchor_name(spec: AnchorSpec, model: nn.Module) -> str:
    """The timm architecture name an anchor is known by (its name, its cfg's architecture, or its class)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        return spec['model_name']
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__
