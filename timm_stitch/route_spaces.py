"""Route spaces: which routes a stitched network plans, as pure functions of the anchors' depths.

``'one_way'`` is SN-Net's: activations flow from smaller to larger anchors only (:func:`plan_token_routes`,
:func:`plan_staged_routes`). ``'two_way'`` is SN-Netv2's (Pan et al., "Stitched ViTs are Flexible Vision
Backbones"): two plain token anchors stitched in both directions, small->large (SL), large->small (LS),
large->small->large (LSL) and small->large->small (SLS) (:func:`plan_two_way_routes`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from .errors import IncompatibleAnchorsError
from .routes import (
    LayerMapping,
    Route,
    StitchGroup,
    StitchPlan,
    StitchPosition,
    StitchRef,
    _chains,
    _check_positive,
    nearest_end_map,
    plan_staged_routes,
    plan_token_routes,
)

__all__ = ['StitchOptions', 'RouteSpace', 'ROUTE_SPACES', 'two_way_positions', 'plan_two_way_routes', 'plan_routes']

RouteSpace = Literal['one_way', 'two_way']
ROUTE_SPACES: tuple[str, ...] = ('one_way', 'two_way')


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

    def __post_init__(self) -> None:
        if self.route_space not in ROUTE_SPACES:
            raise ValueError(f'route_space must be one of {ROUTE_SPACES}, got {self.route_space!r}')
        if self.stages is not None:
            object.__setattr__(self, 'stages', tuple(self.stages))

    @classmethod
    def of(cls, options: Optional[StitchOptions], kwargs: dict[str, Any]) -> StitchOptions:
        """``options`` (default: the defaults) with the option fields in ``kwargs`` (flat keyword arguments, as a
        ``config.json`` records them) taken out of ``kwargs`` and applied."""
        given = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}
        return dataclasses.replace(options or cls(), **given)



def two_way_positions(small_depth: int, large_depth: int) -> tuple[list[StitchPosition], list[StitchPosition]]:
    """The small->large and large->small positions of two anchors, in the official SN-Netv2 order.

    With ``r = large_depth / small_depth`` (an integer), small block ``i`` maps to large blocks ``i*r..i*r+r-1``.
    SL: after small block ``i`` (every ``i``), the large anchor resumes at block ``(i+1)*r``, on layer ``i``. LS:
    after the last large block ``i`` mapped to a small block (``i % r == r - 1``, so every odd ``i`` for ``r = 2``
    and every ``i`` for equal depths; not the last large block), the small anchor resumes at the small block after
    it, on layer ``i // r``. Each layer serves one position.
    """
    _check_positive(small_depth=small_depth, large_depth=large_depth)
    if large_depth < small_depth:
        raise IncompatibleAnchorsError(
            f'two-way routes need the smaller (shallower) anchor first, got depths {small_depth} then '
            f'{large_depth}')
    if large_depth % small_depth:
        raise IncompatibleAnchorsError(
            f'two-way routes need the larger anchor\'s depth to be a multiple of the smaller\'s, got '
            f'depths {small_depth} and {large_depth}')
    r = large_depth // small_depth
    sl = [StitchPosition(i, (i + 1) * r, i) for i in range(small_depth)]
    end_map = nearest_end_map(small_depth, large_depth)
    ls = [StitchPosition(i, end_map[i] + 1, i // r) for i in range(large_depth - 1) if i % r == r - 1]
    return sl, ls


def plan_two_way_routes(depths: Sequence[int]) -> StitchPlan:
    """SN-Netv2's two-way routes of a small and a large token anchor (``depths``: small first), in the official ids.

    Ids: 0 and 1 the anchors (small, large); then every SL route (one per small block), every LS route, every LSL
    route (outer loop over LS, inner over SL but the last, kept when the SL stitch is at or after the LS resume
    block) and every SLS route (outer loop over SL, inner over LS, kept likewise). Stitching layers: pair 0 holds
    the small->large layers (``StitchRef(0, 0, i)``, the model's ``stitch_layers.0.0.i``, the official
    ``stitch_layers.0.i``), pair 1 the large->small ones (``stitch_layers.0.1.i``, officially ``stitch_layers.1.i``).
    Two 12-block anchors or a 12- and a 24-block anchor give 135 routes (2 + 12 + 11 + 55 + 55).

    The last SL route (the official id 13 for 12-block small anchors: every small block, then the large anchor's
    final norm and head with none of its blocks) keeps its id so that ids match the official ones, but the
    official checkpoints never trained nor evaluated it (their training set is the other 134 routes).
    """
    if len(depths) != 2:
        raise ValueError(f'two-way routes are planned for exactly two anchors (small, large), got {len(depths)}')
    small_depth, large_depth = depths
    sl, ls = two_way_positions(small_depth, large_depth)
    groups = (StitchGroup(0, 0, 0, 1, tuple(sl)), StitchGroup(0, 1, 1, 0, tuple(ls)))
    routes = [Route(id=0, anchors=(0,)), Route(id=1, anchors=(1,))]
    chains = ([((0, 1), (0,), chain) for chain in _chains([sl])] + [((1, 0), (1,), chain) for chain in _chains([ls])]
              + [((1, 0, 1), (1, 0), chain) for chain in _chains([ls, sl[:-1]])]
              + [((0, 1, 0), (0, 1), chain) for chain in _chains([sl, ls])])
    for anchors, pairs, chain in chains:
        routes.append(Route(
            id=len(routes), anchors=anchors, stage=0, cuts=tuple((p.front, p.end) for p in chain),
            stitches=tuple(StitchRef(0, pair, p.layer) for pair, p in zip(pairs, chain)),
        ))
    return StitchPlan(tuple(routes), groups)


def plan_routes(stage_depths: Sequence[Sequence[int]], options: StitchOptions = StitchOptions(),
                end_stages: Optional[dict[int, int]] = None) -> StitchPlan:
    """The routes of anchors with ``stage_depths[a][s]`` blocks in stage ``s`` (one stage: plain token models).

    ``options.route_space='one_way'`` plans SN-Net's routes with the window / interpolation settings (hierarchical
    anchors inside ``options.stages``, default all but the last; ``end_stages``: the end anchor's stage each front
    stage feeds, for two anchors of different stage structures); ``'two_way'`` plans SN-Netv2's two-way routes of
    two plain token anchors (see :func:`plan_two_way_routes`; the window settings do not apply).
    """
    o = options
    single_stage = all(len(d) == 1 for d in stage_depths)
    if o.route_space == 'two_way':
        if not single_stage:
            raise ValueError("route_space='two_way' stitches plain token anchors (one stage of blocks), got anchors "
                             f'with stage depths {[list(d) for d in stage_depths]}')
        if o.multi_anchor or o.stages is not None:
            raise ValueError("route_space='two_way' plans its own routes through two anchors: multi_anchor and "
                             'stages do not apply')
        return plan_two_way_routes([d[0] for d in stage_depths])
    if single_stage:
        return plan_token_routes([d[0] for d in stage_depths], o.kernel_size, o.stride, o.nearest, o.multi_anchor,
                                 o.layer_mapping)
    stages = list(range(min(len(d) for d in stage_depths) - 1)) if o.stages is None else list(o.stages)
    return plan_staged_routes(stage_depths, stages, o.kernel_size, o.stride, o.nearest, o.layer_mapping, end_stages)
