"""Route planning for stitchable networks, as pure functions (no torch modules).

A *position* ``(front, end)`` means: the front anchor runs its blocks ``0..front`` inclusive, a stitching layer
maps the activation, and the end anchor resumes at block ``end``. A *route* is one runnable configuration:
a single anchor, or a chain of anchors joined at positions. Route ids follow the official SN-Net ordering
(anchors first, then each stitched pair in order, each pair's positions in window order).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

__all__ = [
    'StitchPosition', 'StitchRef', 'StitchGroup', 'Route', 'StitchPlan',
    'window_positions', 'nearest_end_map', 'interpolated_positions',
    'plan_token_routes', 'plan_staged_routes', 'format_route_table',
]

LayerMapping = Literal['corrected', 'official']


@dataclass(frozen=True)
class StitchPosition:
    """Front anchor runs blocks ``0..front``; end anchor resumes at block ``end``; ``layer`` is the shared layer."""
    front: int
    end: int
    layer: int


@dataclass(frozen=True)
class StitchRef:
    """Address of one stitching layer: ``stitch_layers[stage][pair][layer]`` (``stage``: the front anchor's), and
    the end anchor's stage it feeds (``end_stage``; None: the same stage)."""
    stage: int
    pair: int
    layer: int
    end_stage: Optional[int] = None

    @property
    def resume_stage(self) -> int:
        """The end anchor's stage the route resumes in."""
        return self.stage if self.end_stage is None else self.end_stage


@dataclass(frozen=True)
class StitchGroup:
    """The stitching layers of one (stage, anchor pair): ``num_layers`` layers shared by ``positions``, from the
    front anchor's ``stage`` into the end anchor's ``end_stage`` (None: the same stage)."""
    stage: int
    pair: int
    front_anchor: int
    end_anchor: int
    positions: tuple[StitchPosition, ...]
    end_stage: Optional[int] = None

    @property
    def resume_stage(self) -> int:
        """The end anchor's stage its positions resume in."""
        return self.stage if self.end_stage is None else self.end_stage

    @property
    def num_layers(self) -> int:
        return max((p.layer for p in self.positions), default=-1) + 1


@dataclass(frozen=True)
class Route:
    """One runnable route of a stitched network.

    ``cuts`` holds ``(last front block, first end block)`` per stitch (block ids local to ``stage``),
    ``stitches`` the stitching layer used at each cut. Cost and quality fields are filled by later stages
    (parameter counting, MACs counting, evaluation, profiling) and are ``None`` until then.
    """
    id: int
    anchors: tuple[int, ...]
    cuts: tuple[tuple[int, int], ...] = ()
    stitches: tuple[StitchRef, ...] = ()
    stage: Optional[int] = None
    params: Optional[int] = None
    macs: Optional[int] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    latency_ms: Optional[float] = None
    dominated: Optional[bool] = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_anchor(self) -> bool:
        return len(self.anchors) == 1


@dataclass(frozen=True)
class StitchPlan:
    """All routes of a stitched network plus the stitching-layer groups they share."""
    routes: tuple[Route, ...]
    groups: tuple[StitchGroup, ...]

    def group(self, stage: int, pair: int) -> StitchGroup:
        for g in self.groups:
            if g.stage == stage and g.pair == pair:
                return g
        raise KeyError(f'no stitch group for stage {stage}, pair {pair}')


def window_positions(
        depth: int, kernel_size: int = 2, stride: int = 1, forward_only: bool = False,
) -> list[StitchPosition]:
    """Positions from a sliding window over block ids, as the official ``paired_stitching`` enumerates them.

    Each window of ``kernel_size`` block ids (stride ``stride``) contributes every ``(j, k)`` pair in row-major
    order that no earlier window produced; the layer counter advances only for windows that added something.
    ``forward_only`` keeps only ``j < k`` (the hierarchical families' variant).
    """
    _check_positive(depth=depth, kernel_size=kernel_size, stride=stride)
    seen: set[tuple[int, int]] = set()
    positions: list[StitchPosition] = []
    layer = 0
    for start in range(0, depth, stride):
        window = range(start, min(start + kernel_size, depth))
        added = False
        for j, k in itertools.product(window, window):
            if (forward_only and j >= k) or (j, k) in seen:
                continue
            seen.add((j, k))
            positions.append(StitchPosition(j, k, layer))
            added = True
        layer += added
    return positions


def nearest_end_map(front_depth: int, end_depth: int) -> list[int]:
    """Front block id nearest to each end block, as torch's float32 ``F.interpolate(mode='nearest')`` computes it."""
    _check_positive(front_depth=front_depth, end_depth=end_depth)
    scale = np.float32(front_depth) / np.float32(end_depth)
    return [min(int(np.floor(np.float32(i) * scale)), front_depth - 1) for i in range(end_depth)]


def interpolated_positions(
        front_depth: int, end_depth: int, layer_mapping: LayerMapping = 'corrected',
) -> list[StitchPosition]:
    """Positions between anchors of different depth (the official ``unpaired_stitching``), in front-block order.

    Every end block ``i`` whose nearest front block ``j`` is before it gives the position ``(j, i)``; with a deeper
    front (``'corrected'`` only), each front block ``j`` resumes at the end block at the same relative depth.
    ``layer_mapping='corrected'`` shares layer ``j``; ``'official'`` reproduces the released code, which gives
    the m-th position layer ``end_map[m]``, as the official checkpoints are laid out.
    """
    if layer_mapping not in ('corrected', 'official'):
        raise ValueError(f"layer_mapping must be 'corrected' or 'official', got {layer_mapping!r}")
    if front_depth > end_depth and layer_mapping == 'corrected':
        # a deeper front (SN-Net's anchors never have one): after front block j, resume at the end block at the same
        # relative depth, one layer per front block
        ends = [((j + 1) * end_depth) // front_depth for j in range(front_depth)]
        kept = [(j, k) for j, k in enumerate(ends) if 0 < k < end_depth]
        return [StitchPosition(j, k, layer) for layer, (j, k) in enumerate(kept)]
    end_map = nearest_end_map(front_depth, end_depth)
    pairs = [(j, i) for j in range(front_depth) for i in range(end_depth) if end_map[i] == j and i > j]
    if layer_mapping == 'official':
        return [StitchPosition(j, k, end_map[m]) for m, (j, k) in enumerate(pairs)]
    # corrected: layers numbered by front block, compacted so that front blocks without a position use none
    used = sorted({j for j, _ in pairs})
    return [StitchPosition(j, k, used.index(j)) for j, k in pairs]


def _anchor_combinations(num_anchors: int, nearest: bool, multi_anchor: bool) -> list[tuple[int, ...]]:
    """Anchor chains in the official order: singletons, pairs, then longer chains (when ``multi_anchor``)."""
    max_len = num_anchors if multi_anchor else min(2, num_anchors)
    combos = []
    for n in range(1, max_len + 1):
        for combo in itertools.combinations(range(num_anchors), n):
            if nearest and any(b - a != 1 for a, b in zip(combo, combo[1:])):
                continue
            combos.append(combo)
    return combos


def _chains(position_lists: Sequence[Sequence[StitchPosition]], min_front: int = 0) -> list[tuple[StitchPosition, ...]]:
    """Every chain of positions, one per stitch, where each front block is at or after the previous end block."""
    if not position_lists:
        return [()]
    chains = []
    for p in position_lists[0]:
        if p.front < min_front:
            continue
        for rest in _chains(position_lists[1:], p.end):
            chains.append((p,) + rest)
    return chains


def plan_token_routes(
        depths: Sequence[int],
        kernel_size: int = 2,
        stride: int = 1,
        nearest: bool = True,
        multi_anchor: bool = False,
        layer_mapping: LayerMapping = 'corrected',
) -> StitchPlan:
    """Routes for plain token models (ViT/DeiT) stitched at any block, anchors ordered small to large.

    Official DeiT settings (``kernel_size=2, stride=1, nearest=True``) on three 12-block anchors give the 71
    official routes. ``nearest=False`` stitches every pair; ``multi_anchor`` adds chains through 3+ anchors.
    Anchors of unequal depth are joined with interpolated positions.
    """
    if len(depths) < 1:
        raise ValueError('at least one anchor depth is required')
    _check_positive(kernel_size=kernel_size, stride=stride, **{f'depths[{i}]': d for i, d in enumerate(depths)})
    combos = _anchor_combinations(len(depths), nearest, multi_anchor)
    pairs = [c for c in combos if len(c) == 2]
    groups = []
    for pair_idx, (a, b) in enumerate(pairs):
        if depths[a] == depths[b]:
            positions = window_positions(depths[a], kernel_size, stride)
        else:
            positions = interpolated_positions(depths[a], depths[b], layer_mapping)
        groups.append(StitchGroup(0, pair_idx, a, b, tuple(positions)))
    pair_group = {(g.front_anchor, g.end_anchor): g for g in groups}

    routes: list[Route] = []
    for combo in combos:
        if len(combo) == 1:
            routes.append(Route(id=len(routes), anchors=combo))
            continue
        links = [pair_group[(a, b)] for a, b in zip(combo, combo[1:])]
        for chain in _chains([g.positions for g in links]):
            routes.append(Route(
                id=len(routes), anchors=combo, stage=0,
                cuts=tuple((p.front, p.end) for p in chain),
                stitches=tuple(StitchRef(0, g.pair, p.layer) for g, p in zip(links, chain)),
            ))
    return StitchPlan(tuple(routes), tuple(groups))


def plan_staged_routes(
        stage_depths: Sequence[Sequence[int]],
        stages: Sequence[int],
        kernel_size: int = 2,
        stride: int = 1,
        nearest: bool = True,
        layer_mapping: LayerMapping = 'corrected',
        end_stages: Optional[dict[int, int]] = None,
) -> StitchPlan:
    """Routes for hierarchical models (Swin, ResNet, LeViT) stitched inside one stage at a time.

    ``stage_depths[a][s]`` is the number of blocks of anchor ``a`` in stage ``s``. In each stage of ``stages``,
    each anchor pair (adjacent when ``nearest``) is stitched with forward window positions (``j < k``) when the
    depths match and with interpolated positions otherwise; a stage that gives no position (one block in each)
    gets one at its end: the front anchor's whole stage, then the end anchor from its next stage. Order: anchors,
    then stage by stage, pair by pair. ``end_stages`` maps a front stage to the end anchor's stage it feeds, for
    two anchors of different stage structures (ResNet stage 2 -> a ViT's only stage: ``{2: 0}``); default the
    same stage.
    """
    num_anchors = len(stage_depths)
    if num_anchors < 1:
        raise ValueError('at least one anchor is required')
    _check_positive(kernel_size=kernel_size, stride=stride)
    end_stages = end_stages or {}
    pairs = [c for c in _anchor_combinations(num_anchors, nearest, False) if len(c) == 2]
    checks = [(a, s) for s in stages for a in range(num_anchors) if not end_stages]
    checks += [check for s in stages for a, b in pairs for check in ((a, s), (b, end_stages.get(s, s)))]
    for anchor, stage in checks:
        if not 0 <= stage < len(stage_depths[anchor]):
            raise ValueError(f'stage {stage} is out of range: the anchors have stages '
                             f'0..{len(stage_depths[anchor]) - 1}')
    routes = [Route(id=a, anchors=(a,)) for a in range(num_anchors)]
    groups = []
    for s in stages:
        t = end_stages.get(s)
        for pair_idx, (a, b) in enumerate(pairs):
            df, de = stage_depths[a][s], stage_depths[b][s if t is None else t]
            if df == de:
                positions = window_positions(df, kernel_size, stride, forward_only=True)
            else:
                positions = interpolated_positions(df, de, layer_mapping)
            if not positions and t is None and s + 1 < len(stage_depths[b]):
                # no cut inside the stage (one block each): after the front's whole stage, into the end's next one
                positions = [StitchPosition(df - 1, de, 0)]
            groups.append(StitchGroup(s, pair_idx, a, b, tuple(positions), t))
            for p in positions:
                routes.append(Route(
                    id=len(routes), anchors=(a, b), stage=s, cuts=((p.front, p.end),),
                    stitches=(StitchRef(s, pair_idx, p.layer, t),),
                ))
    return StitchPlan(tuple(routes), tuple(groups))


def macs_unit(macs: Sequence[Optional[float]]) -> tuple[str, float]:
    """``('GMACs', 1e9)``, or ``('MMACs', 1e6)`` when every known value is under a billion (small models)."""
    return ('MMACs', 1e6) if all(m is None or m < 1e9 for m in macs) else ('GMACs', 1e9)


def format_route_table(routes: Sequence[Route], anchor_names: Optional[Sequence[str]] = None) -> str:
    """A fixed-width text table of routes: id, anchors, stage and cuts, params, MACs, accuracy, latency."""
    def name(a: int) -> str:
        return anchor_names[a] if anchor_names else str(a)

    def fmt(value, scale: float = 1.0, digits: int = 2) -> str:
        return '-' if value is None else f'{value / scale:.{digits}f}'

    def describe(r: Route) -> str:
        if r.is_anchor:
            return f'anchor {name(r.anchors[0])}'
        stage = f's{r.stage} ' if r.stage else ''
        return ' -> '.join(name(a) for a in r.anchors) + f" {stage}{' '.join(f'({j},{k})' for j, k in r.cuts)}"

    descs = [describe(r) for r in routes]
    width = max([len('route'), *map(len, descs)])
    unit, scale = macs_unit([r.macs for r in routes])
    header = f"{'id':>4}  {'route':<{width}} {'params(M)':>9} {unit:>7} {'top1':>6} {'ms':>8}"
    lines = [header, '-' * len(header)]
    for r, desc in zip(routes, descs):
        mark = '*' if r.dominated is False else ' '
        lines.append(
            f'{r.id:>4}{mark} {desc:<{width}} {fmt(r.params, 1e6):>9} {fmt(r.macs, scale, 3):>7} '
            f'{fmt(r.top1):>6} {fmt(r.latency_ms, 1.0, 3):>8}'
        )
    return '\n'.join(lines)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{key} must be a positive integer, got {value!r}')
