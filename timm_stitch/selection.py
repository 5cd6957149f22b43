"""Choosing routes under budgets and finding the cost/accuracy Pareto front (pure functions over ``Route`` lists).

Selection rule (:func:`select_route`, and so ``model.select_stitch``, ``RouteCatalogue.select`` and
``timm-stitch routes --select``): a budget (``max_macs``, ``max_params``, ``max_latency_ms``) asks for the most
accurate route that fits it; an accuracy floor alone (``min_top1``) asks for the cheapest route that reaches it;
with both, the floor only narrows the routes within the budget, and the most accurate of them is chosen. Top-1 is
in percent, as in route cards: a floor between 0 and 1 (a fraction) is refused while the routes' top-1 are
percentages.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

from .routes import Route

__all__ = ['Budget', 'select_route', 'filter_routes', 'pareto_front', 'mark_dominated', 'COST_FIELDS', 'QUALITY_FIELDS']

COST_FIELDS = ('macs', 'params', 'latency_ms')
QUALITY_FIELDS = ('top1', 'top5')

_INF = float('inf')


def _check_field(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f'{name} must be one of {", ".join(map(repr, valid))}, got {value!r}')


def _num(value: float) -> str:
    return f'{int(value):,}' if float(value).is_integer() and abs(value) >= 1e4 else f'{value:g}'


def _cost_key(route: Route) -> tuple:
    return tuple(_INF if getattr(route, f) is None else getattr(route, f) for f in COST_FIELDS) + (route.id,)


@dataclass(frozen=True)
class Budget:
    """The bounds a route is chosen under: upper bounds on its cost (``max_*``) and a floor on its top-1 (percent).
    None leaves a bound out; a bound excludes routes whose value for it is unknown."""
    max_macs: Optional[float] = None
    max_params: Optional[float] = None
    max_latency_ms: Optional[float] = None
    min_top1: Optional[float] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            bound = getattr(self, f.name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                raise TypeError(f'{f.name} must be a number, got {bound!r}')
            if bound is not None and bound != bound:
                raise ValueError(f'{f.name} must be a number, got {bound!r}')

    @classmethod
    def of(cls, budget: Optional[Budget] = None, **bounds: Optional[float]) -> Budget:
        """``budget``, or the bounds given by keyword (``max_macs=...``), not both."""
        if budget is not None and any(v is not None for v in bounds.values()):
            raise TypeError('give a Budget or bounds by keyword, not both')
        return budget if budget is not None else cls(**bounds)

    @property
    def costs(self) -> dict[str, float]:
        """The cost bounds given, by route field (``'macs'``, ``'params'``, ``'latency_ms'``)."""
        upper = {'macs': self.max_macs, 'params': self.max_params, 'latency_ms': self.max_latency_ms}
        return {f: b for f, b in upper.items() if b is not None}


def filter_routes(routes: Sequence[Route], budget: Optional[Budget] = None, **bounds: Optional[float]) -> list[Route]:
    """The routes meeting every bound of ``budget`` (or of the :class:`Budget` fields given by keyword), in their
    order. A bound excludes routes whose value for it is unknown.

    Raises ``ValueError`` when none does, saying why: a value no route knows (no card loaded), or the smallest
    (largest, for ``min_top1``) available value.
    """
    budget = Budget.of(budget, **bounds)
    bounds, min_top1 = budget.costs, budget.min_top1
    if not routes:
        raise ValueError('there are no routes to select from')
    _check_floor_unit(routes, min_top1)

    def fits(r: Route) -> bool:
        if any(getattr(r, f) is None or getattr(r, f) > b for f, b in bounds.items()):
            return False
        return min_top1 is None or (r.top1 is not None and r.top1 >= min_top1)

    candidates = [r for r in routes if fits(r)]
    if not candidates:
        raise ValueError(_nothing_fits(routes, bounds, min_top1))
    return candidates


def select_route(routes: Sequence[Route], budget: Optional[Budget] = None, **bounds: Optional[float]) -> Route:
    """The route meeting every bound of ``budget`` (or of the :class:`Budget` fields given by keyword; see
    :func:`filter_routes`) that the bounds ask for (see the module docstring): with a budget (or no bound at all),
    the highest top-1 (ties: lowest cost), or the lowest cost when no route has a known top-1; with only
    ``min_top1``, the lowest cost. Cost order is MACs, then params, then latency, then id."""
    budget = Budget.of(budget, **bounds)
    candidates = filter_routes(routes, budget)
    floor_only = budget.min_top1 is not None and not budget.costs
    if not floor_only and any(r.top1 is not None for r in candidates):
        return min(candidates, key=lambda r: (_INF if r.top1 is None else -r.top1, _cost_key(r)))
    return min(candidates, key=_cost_key)


def _check_floor_unit(routes: Sequence[Route], min_top1: Optional[float]) -> None:
    """Refuse a fractional ``min_top1`` (0 < floor < 1) for routes whose top-1 are percentages."""
    if min_top1 is None or not 0 < min_top1 < 1:
        return
    known = [r.top1 for r in routes if r.top1 is not None]
    if known and max(known) > 1:
        raise ValueError(f'min_top1={min_top1:g} looks like a fraction, but top-1 is in percent here (up to '
                         f'{max(known):g}): pass min_top1={100 * min_top1:g} for {100 * min_top1:g} %')


def _nothing_fits(routes: Sequence[Route], bounds: dict, min_top1: Optional[float]) -> str:
    reasons = []
    for field, bound in bounds.items():
        known = [r for r in routes if getattr(r, field) is not None]
        if not known:
            hint = ' (profile the model or load a card with latencies)' if field == 'latency_ms' else ''
            reasons.append(f'no route has a known {field}{hint}')
            continue
        best = min(known, key=lambda r: getattr(r, field))
        if getattr(best, field) > bound:
            reasons.append(f'max_{field}={_num(bound)} is below the smallest available {field}, '
                           f'{_num(getattr(best, field))} (route {best.id})')
    if min_top1 is not None:
        known = [r for r in routes if r.top1 is not None]
        if not known:
            reasons.append('no route has a known top1 (load a card with accuracies)')
        else:
            best = max(known, key=lambda r: r.top1)
            if best.top1 < min_top1:
                reasons.append(f'min_top1={_num(min_top1)} is above the highest available top1, {_num(best.top1)} '
                               f'(route {best.id})')
    if not reasons:
        reasons.append('each bound alone can be met, but no route meets all of them together')
    return 'no route meets the bounds: ' + '; '.join(reasons)


def _dominated_ids(routes: Sequence[Route], x: str, y: str) -> set[int]:
    """Ids of routes with both values known that another such route beats (no worse on both, better on one)."""
    known = sorted((r for r in routes if getattr(r, x) is not None and getattr(r, y) is not None),
                   key=lambda r: (getattr(r, x), -getattr(r, y)))
    dominated, best_y, best_x = set(), -_INF, None
    for r in known:  # sweep by cost: a route is dominated unless it beats every cheaper route's accuracy
        rx, ry = getattr(r, x), getattr(r, y)
        if ry < best_y or (ry == best_y and best_x is not None and best_x < rx):
            dominated.add(r.id)
        elif ry > best_y:
            best_y, best_x = ry, rx
    return dominated


def pareto_front(routes: Sequence[Route], x: str = 'macs', y: str = 'top1') -> list[Route]:
    """The non-dominated routes (lower ``x`` and higher ``y`` are better), sorted by ``x``; routes missing a
    value are left out."""
    _check_field('x', x, COST_FIELDS)
    _check_field('y', y, QUALITY_FIELDS)
    dominated = _dominated_ids(routes, x, y)
    front = [r for r in routes if getattr(r, x) is not None and getattr(r, y) is not None and r.id not in dominated]
    return sorted(front, key=lambda r: (getattr(r, x), r.id))


def mark_dominated(routes: Sequence[Route], x: str = 'macs', y: str = 'top1') -> list[Route]:
    """Copies of ``routes`` with ``dominated`` set (``None`` where ``x`` or ``y`` is unknown)."""
    _check_field('x', x, COST_FIELDS)
    _check_field('y', y, QUALITY_FIELDS)
    dominated = _dominated_ids(routes, x, y)
    return [replace(r, dominated=None if getattr(r, x) is None or getattr(r, y) is None else r.id in dominated)
            for r in routes]
