"""Stitch any compatible timm family: ``timm_stitch.stitch(['convnext_atto', 'convnext_femto'], ...)``.

The builder builds the anchors, sorts them by size, checks that they can be stitched (same kind of model, input
size, channels, and matching token counts / spatial sizes at the stitched stages, found by one probe forward per
anchor) and picks the stitch positions, then returns a :class:`~timm_stitch.model.StitchedNet`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._modes import eval_mode
from .adapters import AnchorAdapter, adapter_for
from .anchors import AnchorSpec, anchor_name, build_anchor, per_anchor_kwargs
from .errors import IncompatibleAnchorsError
from .model import StitchedNet
from .route_spaces import RouteSpace
from .routes import LayerMapping
from .stitching import _LAYOUT_CHANGES

__all__ = ['StitchOptions', 'stitch', 'stitchable_stages']


@dataclass(frozen=True)
class StitchOptions:
    """Where and how anchors are stitched.

    Args:
        kernel_size: Sliding-window size over block ids (official: 2).
        stride: Sliding-window stride (official: 1).
        nearest: Stitch only anchors adjacent in size; otherwise every pair.
        multi_anchor: Also build routes through three or more anchors (single-stage token models only).
        stages: Stages of hierarchical anchors to stitch inside; default every stage but the last whose token
            counts / spatial sizes match.
        layer_mapping: ``'corrected'`` layer sharing between unequal-depth stages, or ``'official'`` (the released
            code's indexing, needed for its checkpoints).
        route_space: ``'one_way'`` (small to large anchors, with the settings above) or ``'two_way'`` (SN-Netv2:
            two plain token anchors stitched both ways; the window settings do not apply).
    """
    kernel_size: int = 2
    stride: int = 1
    nearest: bool = True
    multi_anchor: bool = False
    stages: Optional[tuple[int, ...]] = None
    layer_mapping: LayerMapping = 'corrected'
    route_space: RouteSpace = 'one_way'


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(StitchOptions))
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

    Anchors are sorted by parameter count (smallest first, as SN-Net requires). Option fields
    (``kernel_size``, ``stride``, ``nearest``, ``multi_anchor``, ``stages``, ``layer_mapping``, ``route_space``) may
    be given as an ``options`` object or as keyword arguments; other keywords go to :class:`StitchedNet` or, for
    anchors given by name, to ``timm.create_model`` (``img_size``, ``drop_path_rate``...; a sequence
    ``drop_path_rate`` gives each anchor, in the order given, its own rate).

    Raises:
        TypeError: An anchor's family cannot be stitched.
        ValueError: The anchors cannot be stitched together; the message names what differs.
    """
    option_kwargs = {k: kwargs.pop(k) for k in _OPTION_NAMES if k in kwargs}
    options = dataclasses.replace(options or StitchOptions(), **option_kwargs)
    if not anchors:
        raise ValueError('stitch() needs at least one anchor')
    net_kwargs = {k: kwargs.pop(k) for k in _NET_ARGS if k in kwargs}
    net_kwargs.update((k, kwargs[k]) for k in ('device', 'dtype') if kwargs.get(k) is not None)  # anchors' too
    if kwargs.get('img_size') is None:
        kwargs.pop('img_size', None)
    models = [build_anchor(a, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained_anchors, **kw)
              for a, kw in zip(anchors, per_anchor_kwargs(kwargs, len(anchors)))]
    names = [anchor_name(a, m) for a, m in zip(anchors, models)]
    order = sorted(range(len(models)), key=lambda i: sum(p.numel() for p in models[i].parameters()))
    models, names = [models[i] for i in order], [names[i] for i in order]
    stages = stitchable_stages(models, names, options)

    model = StitchedNet(
        models, num_classes=num_classes, in_chans=in_chans, kernel_size=options.kernel_size, stride=options.stride,
        nearest=options.nearest, multi_anchor=options.multi_anchor, stages=stages,
        layer_mapping=options.layer_mapping, route_space=options.route_space, **net_kwargs)
    model.anchor_names = names
    return model


def stitchable_stages(
        models: Sequence[nn.Module], names: Sequence[str], options: StitchOptions = StitchOptions(),
) -> Optional[tuple[int, ...]]:
    """Check that ``models`` (sorted small to large) can be stitched and return the stages to stitch inside
    (None for single-stage token models); raises ``TypeError``/``ValueError`` naming what differs."""
    adapters = [adapter_for(m) for m in models]
    _check_same(adapters, names, 'input channels', lambda a: a.in_chans)
    fixed = [(n, a.input_size()) for n, a in zip(names, adapters) if a.input_size() is not None]
    if len({size for _, size in fixed}) > 1:
        raise IncompatibleAnchorsError('anchors need different input sizes: ' + _listing(
            [(n, f'{h}x{w}') for n, (h, w) in fixed]) + '; build them with one img_size')
    num_stages = _check_same(
        adapters, names, 'numbers of stages', lambda a: len(a.stage_depths()),
        ' (plain token models such as ViT/DeiT/EVA stitch with each other; hierarchical models such as Swin, '
        'ResNet, ConvNeXt and LeViT need the same number of stages)')
    if options.multi_anchor and num_stages > 1:
        raise ValueError('multi_anchor routes are only planned for single-stage token models, not for anchors '
                         f'with {num_stages} stages')
    if options.route_space == 'two_way' and (num_stages > 1 or len(models) != 2):
        raise ValueError("route_space='two_way' stitches two plain token anchors (ViT/DeiT/EVA), got "
                         f'{len(models)} anchors with {num_stages} stages')
    pairs = _pairs(len(models), options.nearest)
    if options.route_space == 'two_way':
        pairs += [(b, a) for a, b in pairs]
    for a, b in pairs:
        front, end = adapters[a], adapters[b]
        if (front.layout, end.layout) not in _LAYOUT_CHANGES:
            raise IncompatibleAnchorsError(
                f'cannot stitch {names[a]} ({front.layout} activations) into {names[b]} ({end.layout}): '
                f'the smaller anchor must produce a layout the larger accepts '
                f'({", ".join(f"{x}->{y}" for x, y in _LAYOUT_CHANGES)})')
    if len(models) == 1:
        return None if num_stages == 1 else ()
    grids = _stage_grids(models, adapters, fixed[0][1] if fixed else None)
    mismatch = {s: [(a, b) for a, b in pairs if grids[a][s] != grids[b][s]] for s in range(num_stages)}
    if num_stages == 1:
        _raise_mismatch(0, mismatch[0], names, grids)
        return None
    if options.stages is None:
        stages = tuple(s for s in range(num_stages - 1) if not mismatch[s])
        if not stages:
            _raise_mismatch(0, mismatch[0], names, grids)
        return stages
    for s in options.stages:
        if not 0 <= s < num_stages:
            raise ValueError(f'stage {s} is out of range: the anchors have stages 0..{num_stages - 1}')
        _raise_mismatch(s, mismatch[s], names, grids)
    return tuple(options.stages)


def _pairs(num_anchors: int, nearest: bool) -> list[tuple[int, int]]:
    if nearest:
        return [(a, a + 1) for a in range(num_anchors - 1)]
    return [(a, b) for a in range(num_anchors) for b in range(a + 1, num_anchors)]


def _check_same(adapters: Sequence[AnchorAdapter], names: Sequence[str], what: str, value, hint: str = '') -> Any:
    values = [(n, value(a)) for n, a in zip(names, adapters)]
    if len({v for _, v in values}) > 1:
        raise IncompatibleAnchorsError(f'anchors have different {what}: {_listing(values)}{hint}')
    return values[0][1]


def _listing(values: Sequence[tuple[str, Any]]) -> str:
    return ', '.join(f'{n}: {v}' for n, v in values)


def _positions(x: torch.Tensor, layout: str) -> Union[int, tuple[int, int]]:
    """Token count, or the (H, W) of a feature map; NCHW maps and tokens compare by H*W against tokens."""
    if layout == 'tokens':
        return x.shape[1]
    return tuple(x.shape[1:3]) if layout == 'nhwc' else tuple(x.shape[2:4])


@torch.no_grad()
def _stage_grids(
        models: Sequence[nn.Module], adapters: Sequence[AnchorAdapter], size: Optional[tuple[int, int]],
) -> list[list[Union[int, tuple[int, int]]]]:
    """Per anchor and stage, the token count or (H, W) after the stage's first block (one probe forward)."""
    grids = []
    for model, adapter in zip(models, adapters):
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        hw = size or tuple(cfg.get('input_size', (0, 224, 224))[-2:])
        param = next(model.parameters())
        with eval_mode(model):
            x = adapter.embed(torch.zeros(1, adapter.in_chans, *hw, device=param.device, dtype=param.dtype))
            firsts = {adapter.unit_index(s, 0): s for s in range(len(adapter.stage_depths()))}
            grid = []
            for u, unit in enumerate(adapter.units):
                x = unit(x)
                if u in firsts:
                    grid.append(_positions(x, adapter.layout))
        grids.append(grid)
    # a token count matches a map of the same number of positions (NCHW -> tokens stitching)
    return [[g if isinstance(g, int) or not any(isinstance(o[s], int) for o in grids) else g[0] * g[1]
             for s, g in enumerate(grid)] for grid in grids]


def _raise_mismatch(stage: int, pairs: list[tuple[int, int]], names: Sequence[str], grids) -> None:
    if not pairs:
        return
    a, b = pairs[0]

    def describe(g) -> str:
        return f'{g} tokens' if isinstance(g, int) else f'{g[0]}x{g[1]} maps'

    raise IncompatibleAnchorsError(
        f'cannot stitch {names[a]} into {names[b]} in stage {stage}: {names[a]} gives {describe(grids[a][stage])}, '
        f'{names[b]} {describe(grids[b][stage])}; stitched anchors need matching token counts / spatial sizes '
        '(choose other stages, or build the anchors for matching input sizes)')
