"""Whether anchors can be stitched: same kind of model, input size and channels, and matching token counts / spatial
sizes at the stitched stages (found by one probe forward per anchor). Every stitched network checks its anchors here
when it is built, by :class:`~timm_stitch.StitchedNet` or by :func:`~timm_stitch.stitch`."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._modes import eval_mode
from .adapters import AnchorAdapter, adapter_for
from .errors import IncompatibleAnchorsError
from .route_spaces import StitchOptions
from .stitching import _LAYOUT_CHANGES

__all__ = ['stitchable_stages']


def stitchable_stages(
        models: Sequence[nn.Module], names: Sequence[str], options: Optional[StitchOptions] = None,
) -> Optional[tuple[int, ...]]:
    """Check that ``models`` (sorted small to large) can be stitched and return the stages to stitch inside
    (None for single-stage token models); raises ``TypeError``/``ValueError`` naming what differs."""
    options = options or StitchOptions()
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
        count = 'exactly two anchors' if len(models) != 2 else 'one stage of blocks'
        raise ValueError(f"route_space='two_way' stitches two plain token anchors (ViT/DeiT/EVA; {count}), got "
                         f'{len(models)} anchors with {num_stages} stages')
    pairs = _pairs(len(models), options.nearest)
    if options.route_space == 'two_way':
        pairs += [(b, a) for a, b in pairs]
    for a, b in pairs:
        front, end = adapters[a].stage_layouts(), adapters[b].stage_layouts()
        bad = next((s for s in range(num_stages) if (front[s], end[s]) not in _LAYOUT_CHANGES), None)
        if bad is not None:
            raise IncompatibleAnchorsError(
                f'cannot stitch {names[a]} ({front[bad]} activations in stage {bad}) into {names[b]} ({end[bad]}): '
                f'the smaller anchor must produce a layout the larger accepts '
                f'({", ".join(f"{x}->{y}" for x, y in _LAYOUT_CHANGES)})')
    if len(models) == 1:
        return None if num_stages == 1 else ()
    grids = _stage_grids(models, adapters, fixed[0][1] if fixed else adapters[0].probe_size())  # one size for all
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
            grid, layouts = [], adapter.stage_layouts()
            for u, unit in enumerate(adapter.units):
                x = unit(x)
                if u in firsts:
                    grid.append(_positions(x, layouts[firsts[u]]))
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
