"""Route samplers for SN-Net training: which route each training step runs.

``uniform`` draws over every route (anchors included), as SN-Net v1 does. ``flops-grouped`` is SN-Netv2's
resource-constrained sampling (ROS): routes sorted by cost are split into groups whose costs stay within
``gap`` of the group's first route; a step picks a group (uniformly, or with weights ``i/k + 1/G`` when ``k`` is
set), then a route of it uniformly. ``route_weights`` skews the draw within a group (for example towards the anchor
routes, so that a long stitched training keeps the anchors' accuracy).

Draws are a pure function of ``(seed, step)`` (``synced``: the same route on every rank, so each optimizer step
trains one route) or of ``(seed, rank, step)`` (``per-rank``: each rank its own route, whose gradients DDP then
averages, as the official code does). The state is therefore just the step counter and the settings, which a
resumed run restores with ``load_state_dict``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np

__all__ = ['RouteSampler', 'group_by_cost', 'SAMPLING_MODES', 'SYNC_MODES']

SAMPLING_MODES = ('uniform', 'flops-grouped')
SYNC_MODES = ('synced', 'per-rank')


def group_by_cost(costs: Sequence[float], gap: float) -> list[list[int]]:
    """Route ids grouped by cost: walking routes in increasing cost, a new group starts when a route's cost
    exceeds the current group's first cost by more than ``gap`` (SN-Netv2's ``group_subnets_by_flops``)."""
    if gap < 0:
        raise ValueError(f'the cost gap must be >= 0, got {gap}')
    groups: list[list[int]] = []
    first = None
    for i in sorted(range(len(costs)), key=lambda i: (costs[i], i)):
        if first is None or abs(costs[i] - first) > gap:
            groups.append([])
            first = costs[i]
        groups[-1].append(i)
    return groups


class RouteSampler:
    """Picks the route of each training step.

    Args:
        num_routes: Number of routes of the stitched network.
        mode: ``'uniform'`` or ``'flops-grouped'``.
        costs: Per-route cost (MACs) for ``'flops-grouped'``.
        gap: Group width, in the units of ``costs``.
        group_k: Group weighting ``i/k + 1/G`` (SN-Netv2 ``--flops_sampling_k``); None for uniform groups.
        route_weights: Relative weight of each route within its group; None for uniform.
        sync: ``'synced'`` (same route on every rank) or ``'per-rank'``.
        seed: Base seed.
        rank: This process's rank (used only by ``'per-rank'``).
    """

    def __init__(
            self,
            num_routes: int,
            mode: Literal['uniform', 'flops-grouped'] = 'uniform',
            costs: Optional[Sequence[float]] = None,
            gap: float = 1e9,
            group_k: Optional[float] = None,
            route_weights: Optional[Sequence[float]] = None,
            sync: Literal['synced', 'per-rank'] = 'synced',
            seed: int = 0,
            rank: int = 0,
    ):
        if num_routes < 1:
            raise ValueError(f'num_routes must be >= 1, got {num_routes}')
        if mode not in SAMPLING_MODES:
            raise ValueError(f'route sampling mode must be one of {SAMPLING_MODES}, got {mode!r}')
        if sync not in SYNC_MODES:
            raise ValueError(f'route sync must be one of {SYNC_MODES}, got {sync!r}')
        if group_k is not None and group_k <= 0:
            raise ValueError(f'group_k must be > 0, got {group_k}')
        if route_weights is not None and (len(route_weights) != num_routes or min(route_weights) <= 0):
            raise ValueError(f'route_weights must be {num_routes} positive numbers, got {list(route_weights)}')
        self.num_routes, self.mode, self.sync, self.seed, self.rank = num_routes, mode, sync, seed, rank
        self.route_weights = None if route_weights is None else [float(w) for w in route_weights]
        self.gap, self.group_k = gap, group_k
        if mode == 'flops-grouped':
            if costs is None or len(costs) != num_routes:
                raise ValueError(f'flops-grouped sampling needs one cost per route ({num_routes}), got '
                                 f'{None if costs is None else len(costs)}')
            self.groups = group_by_cost(costs, gap)
        else:
            self.groups = [list(range(num_routes))]
        self.group_probs = self._group_probs()
        self.step = 0

    def _group_probs(self) -> np.ndarray:
        n = len(self.groups)
        if self.group_k is None:
            return np.full(n, 1.0 / n)
        weights = np.arange(n) / self.group_k + 1.0 / n
        return weights / weights.sum()

    def draw(self, step: int) -> int:
        """The route of training step ``step`` (a pure function of the seed, the step and, per-rank, the rank)."""
        key = [self.seed, step] if self.sync == 'synced' else [self.seed, self.rank, step]
        rng = np.random.default_rng(key)
        group = self.groups[rng.choice(len(self.groups), p=self.group_probs)] if len(self.groups) > 1 \
            else self.groups[0]
        if self.route_weights is None:
            return int(group[rng.integers(len(group))])
        weights = np.array([self.route_weights[i] for i in group])
        return int(group[rng.choice(len(group), p=weights / weights.sum())])

    def __call__(self) -> int:
        """The route of the next step; advances the step counter."""
        route = self.draw(self.step)
        self.step += 1
        return route

    def state_dict(self) -> dict[str, Any]:
        return {'step': self.step, 'mode': self.mode, 'sync': self.sync, 'seed': self.seed,
                'num_routes': self.num_routes, 'gap': self.gap, 'group_k': self.group_k,
                'route_weights': self.route_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; raises ``ValueError`` when it was saved with other settings."""
        mine = self.state_dict()
        changed = {k: (state.get(k), v) for k, v in mine.items() if k != 'step' and state.get(k) != v}
        if changed:
            raise ValueError('the saved route sampler state has other settings than this run '
                             f'(saved, now): {changed}')
        self.step = int(state['step'])
