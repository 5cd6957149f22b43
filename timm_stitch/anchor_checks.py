"""Whether anchors can be stitched: same kind of model, input size and channels, and positions that a stitch can
join at the stitched stages (found by one probe forward per anchor): the same token counts / spatial sizes, or two
patch grids a resampling stitch joins (ViT-B/16 -> ViT-L/14, a CNN stage into a ViT). Anchors of different stage
structures (a CNN into a ViT) are paired stage by stage by grid. Every stitched network checks its anchors here
when it is built, by :class:`~timm_stitch.StitchedNet` or by :func:`~timm_stitch.stitch`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ._modes import eval_mode
from .adapters import AnchorAdapter, adapter_for
from .errors import IncompatibleAnchorsError
from .grids import Grid
from .route_spaces import StitchOptions
from .routes import StitchGroup
from .stitching import _LAYOUT_CHANGES

__all__ = ['StitchGeometry', 'check_anchors', 'stitchable_stages']


@dataclass(frozen=True)
class StitchGeometry:
    """What the anchor checks found: the stages to stitch inside (the front anchor's; None for single-stage token
    models), the end anchor's stage each one feeds where the stage structures differ (``end_stages``: front stage
    -> end stage; empty: the same stage), and each anchor's :class:`~timm_stitch.grids.Grid` per stage."""
    stages: Optional[tuple[int, ...]]
    end_stages: dict[int, int] = field(default_factory=dict)
    grids: tuple[tuple[Grid, ...], ...] = ()

    def layer_grids(self, group: StitchGroup) -> dict[str, Optional[Grid]]:
        """The ``in_grid`` / ``out_grid`` arguments of ``group``'s stitching layers."""
        if not self.grids:
            return {}
        return {'in_grid': self.grids[group.front_anchor][group.stage],
                'out_grid': self.grids[group.end_anchor][group.resume_stage]}


def stitchable_stages(
        models: Sequence[nn.Module], names: Sequence[str], options: Optional[StitchOptions] = None,
) -> Optional[tuple[int, ...]]:
    """Check that ``models`` (sorted small to large) can be stitched and return the stages to stitch inside
    (None for single-stage token models); raises ``TypeError``/``ValueError`` naming what differs."""
    return check_anchors(models, names, options).stages


def check_anchors(
        models: Sequence[nn.Module], names: Sequence[str], options: Optional[StitchOptions] = None,
        adapters: Optional[Sequence[AnchorAdapter]] = None,
) -> StitchGeometry:
    """Check that ``models`` (sorted small to large) can be stitched and return where (see
    :class:`StitchGeometry`); raises ``TypeError``/``ValueError`` naming the anchors and what differs.
    ``adapters``: the models' adapters when already built (each build probes its model)."""
    options = options or StitchOptions()
    adapters = list(adapters) if adapters is not None else [adapter_for(m) for m in models]
    _check_same(adapters, names, 'input channels', lambda a: a.in_chans)
    fixed = [(n, a.input_size()) for n, a in zip(names, adapters) if a.input_size() is not None]
    if len({size for _, size in fixed}) > 1:
        raise IncompatibleAnchorsError('anchors need different input sizes: ' + _listing(
            [(n, f'{h}x{w}') for n, (h, w) in fixed]) + '; build them with one img_size (a resampling stitch joins '
            'their patch grids if these then differ)')
    counts = [len(a.stage_depths()) for a in adapters]
    if len(set(counts)) > 1 and len(models) != 2:
        raise IncompatibleAnchorsError(
            f'anchors have different numbers of stages: {_listing(list(zip(names, counts)))}; anchors of '
            'different stage structures (a CNN into a ViT) are stitched two at a time')
    num_stages = max(counts)
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
    if len(set(counts)) == 1:
        for a, b in pairs:
            front, end = adapters[a].stage_layouts(), adapters[b].stage_layouts()
            bad = next((s for s in range(num_stages) if (front[s], end[s]) not in _LAYOUT_CHANGES), None)
            if bad is not None:
                raise IncompatibleAnchorsError(
                    f'cannot stitch {names[a]} ({front[bad]} activations in stage {bad}) into {names[b]} '
                    f'({end[bad]}): the smaller anchor must produce a layout the larger accepts '
                    f'({", ".join(f"{x}->{y}" for x, y in _LAYOUT_CHANGES)})')
    if len(models) == 1:
        return StitchGeometry(None if num_stages == 1 else ())
    grids = _stage_grids(models, adapters, fixed[0][1] if fixed else adapters[0].probe_size())  # one size for all
    if len(set(counts)) > 1:
        return _cross_structure(adapters, names, grids, options)
    if num_stages == 1:
        for s in options.stages or ():  # a single stage: stage 0 is the only valid one
            _check_stage(s, num_stages)
        for a, b in pairs:
            if not _joinable(grids[a][0], grids[b][0]):
                _raise_mismatch(0, [(a, b)], names, grids, adapters)
        return StitchGeometry(None, grids=grids)
    mismatch = {s: [(a, b) for a, b in pairs if not grids[a][s].matches(grids[b][s])] for s in range(num_stages)}
    if options.stages is None:
        stages = tuple(s for s in range(num_stages - 1) if not mismatch[s])
        if not stages:
            _raise_mismatch(0, mismatch[0], names, grids, adapters)
        return StitchGeometry(stages, grids=grids)
    for s in options.stages:
        _check_stage(s, num_stages)
        _raise_mismatch(s, mismatch[s], names, grids, adapters)
    return StitchGeometry(tuple(options.stages), grids=grids)


def _check_stage(stage: int, num_stages: int, whose: str = 'the anchors have') -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise IncompatibleAnchorsError(f'stage {stage!r} is out of range: {whose} stages 0..{num_stages - 1}')


def _joinable(front: Grid, end: Grid) -> bool:
    """Positions a stitch joins: the same ones, or two known patch grids (resampled, prefix tokens by role)."""
    return front.matches(end) or (front.hw is not None and end.hw is not None)


def _cross_structure(adapters: Sequence[AnchorAdapter], names: Sequence[str], grids: list[list[Grid]],
                     options: StitchOptions) -> StitchGeometry:
    """Pair the front anchor's stages with the end anchor's by grid (two anchors of different stage counts), among
    the stages but the last (a single-stage anchor: its only one) that a stitch can join: by default one to one,
    nearest grids (in positions) first, ties to the deeper stages; ``options.stages`` (front stages) each take
    their nearest end stage."""
    (front, end), (fg, eg) = adapters, grids
    f_layouts, e_layouts = front.stage_layouts(), end.stage_layouts()
    f_stages = range(max(1, len(fg) - 1))
    e_stages = range(max(1, len(eg) - 1))

    def joinable(s: int, t: int) -> bool:
        return (f_layouts[s], e_layouts[t]) in _LAYOUT_CHANGES and _joinable(fg[s], eg[t])

    def distance(s: int, t: int) -> tuple[float, int, int]:
        return abs(math.log(fg[s].positions / eg[t].positions)), -s, -t

    end_stages: dict[int, int] = {}
    if options.stages is None:
        for s, t in sorted(((s, t) for s in f_stages for t in e_stages if joinable(s, t)), key=lambda p: distance(*p)):
            if s not in end_stages and t not in end_stages.values():
                end_stages[s] = t
    else:
        for s in options.stages:
            _check_stage(s, len(fg), f'{names[0]} has')
            t = min((t for t in e_stages if joinable(s, t)), key=lambda t: distance(s, t), default=None)
            if t is None:
                raise IncompatibleAnchorsError(
                    f'cannot stitch {names[0]} stage {s} ({f_layouts[s]}, {fg[s].describe()}) into any stage of '
                    f'{names[1]} ({", ".join(f"{e_layouts[t]} {eg[t].describe()}" for t in e_stages)})')
            end_stages[s] = t
    if not end_stages:
        def stages(layouts: Sequence[str], grid: Sequence[Grid]) -> str:
            return '; '.join(f'{s}: {layouts[s]} {grid[s].describe()}' for s in range(len(grid)))

        raise IncompatibleAnchorsError(
            f'cannot stitch {names[0]} (stages {stages(f_layouts, fg)}) into {names[1]} (stages '
            f'{stages(e_layouts, eg)}): no stage pair has layouts a stitch joins '
            f'({", ".join(f"{x}->{y}" for x, y in _LAYOUT_CHANGES)}) and matching or resamplable grids')
    stages = tuple(sorted(end_stages))
    return StitchGeometry(stages, {s: end_stages[s] for s in stages if end_stages[s] != s},
                          tuple(map(tuple, grids)))


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


def _grid(x: torch.Tensor, layout: str, adapter: AnchorAdapter) -> Grid:
    """Where activation ``x`` of a stage sits: maps by their (H, W); tokens by count, with the prefix roles and
    patch grid of a single-stage token model when they account for every token."""
    if layout == 'nchw':
        return Grid(x.shape[2] * x.shape[3], tuple(x.shape[2:4]))
    if layout == 'nhwc':
        return Grid(x.shape[1] * x.shape[2], tuple(x.shape[1:3]))
    roles, hw = adapter.prefix_roles(), adapter.patch_grid()
    if len(adapter.stage_depths()) == 1 and hw is not None and x.shape[1] == len(roles) + hw[0] * hw[1]:
        return Grid(x.shape[1], tuple(hw), roles)
    return Grid(x.shape[1])


@torch.no_grad()
def _stage_grids(models: Sequence[nn.Module], adapters: Sequence[AnchorAdapter],
                 size: Optional[tuple[int, int]]) -> list[list[Grid]]:
    """Per anchor and stage, where the activations after the stage's first block sit (one probe forward)."""
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
                    grid.append(_grid(x, layouts[firsts[u]], adapter))
        grids.append(grid)
    return grids


def _raise_mismatch(stage: int, pairs: list[tuple[int, int]], names: Sequence[str], grids: list[list[Grid]],
                    adapters: Sequence[AnchorAdapter]) -> None:
    if not pairs:
        return
    a, b = pairs[0]

    def describe(anchor: int) -> str:
        g, layout = grids[anchor][stage], adapters[anchor].stage_layouts()[stage]
        return f'{g.positions} tokens' if layout == 'tokens' else f'{g.hw[0]}x{g.hw[1]} maps'

    raise IncompatibleAnchorsError(
        f'cannot stitch {names[a]} into {names[b]} in stage {stage}: {names[a]} gives {describe(a)}, '
        f'{names[b]} {describe(b)}; stitched anchors need matching token counts / spatial sizes, or patch grids '
        'both known (single-stage token models, feature maps) for a resampling stitch '
        '(choose other stages, or build the anchors for matching input sizes)')
