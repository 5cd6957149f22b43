"""A latency-SLO route controller: which route each queued request runs so that deadlines hold and accuracy is high.

Pure policy, no I/O and no clock of its own: :class:`RouteController` reads a :class:`RouteTable` (each route's
card accuracy, MACs and measured latency on this device at the served batch sizes) and, given the queue (each
request's absolute deadline and optional :class:`Bounds`) and the time now, returns the next batch to run and the
route of each request in it (:class:`Plan`).

The rule: requests are served earliest deadline first in batches of up to ``max_batch_size``. Those that cannot
make their deadline even when the queue runs on its fastest routes (a stall has queued more than can be served in
time) are hopeless: they run their fastest route after the others, so that they do not make the others late one
batch after another. For a latency cap ``c``, every request runs the most accurate route it may use (its bounds)
whose latency at the batch size is at most ``c``; the queue is drained in simulation (``horizon`` batches ahead),
each batch costing the sum of its route groups' latencies (groups run one after another, see
:func:`timm_stitch.serving.mixed_forward`). The controller takes the highest cap under which every request that is
not hopeless makes its deadline less ``reserve_ms``: as the queue grows the cap falls to faster routes, as it
shrinks it rises back. Given the requests expected meanwhile (:class:`Arrivals`: the recent rate, the server's
deadline), the cap must also let them make their deadlines after the queue, so that a burst's first requests are
not answered on a slow route while the rest queue behind them. The same queue, time, arrivals and observed batches
always give the same plan.
"""
from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from .cards import model_name
from .catalogue import staleness
from .errors import MissingLatencyProfileError, NoRouteFitsError, StaleCardError
from .profiling import _dtype_name, device_profile

if TYPE_CHECKING:
    import torch

    from .model import StitchedNet

__all__ = ['Arrivals', 'Bounds', 'RouteCost', 'RouteTable', 'Pending', 'Plan', 'RouteController', 'StaleCardError',
           'MissingLatencyProfileError', 'NoRouteFitsError']


@dataclass(frozen=True)
class Bounds:
    """What a request allows: one route id, or routes within ``max_macs`` / ``max_latency_ms`` (the route's card
    latency at batch 1) and at least ``min_top1`` accurate. ``None``: no bound."""
    route: Optional[int] = None
    max_macs: Optional[float] = None
    max_latency_ms: Optional[float] = None
    min_top1: Optional[float] = None


@dataclass(frozen=True)
class RouteCost:
    """One route as the controller sees it: card top-1, MACs and median latency (ms) per profiled batch size."""
    id: int
    top1: float
    macs: int
    latency_ms: Mapping[int, float]


@dataclass(frozen=True)
class Pending:
    """A queued request: its absolute deadline (seconds, on the clock ``now`` is read from) and its bounds."""
    deadline: float
    bounds: Bounds = Bounds()


@dataclass(frozen=True)
class Arrivals:
    """Requests expected while the queue is served: ``rate`` per second from now on, each with ``deadline_s``
    seconds of budget and no bounds (what the server has seen arriving lately, under its default deadline). A rate
    of 0 plans for the queue alone."""
    rate: float
    deadline_s: float

    def __post_init__(self) -> None:
        finite_non_negative('Arrivals.rate', self.rate, ' (requests per second)')
        _finite_positive('Arrivals.deadline_s', self.deadline_s)


@dataclass(frozen=True)
class Plan:
    """The next batch: positions in the queue given to :meth:`RouteController.plan`, the route of each, the
    estimated run time and the latency cap chosen (at the batch size)."""
    take: tuple[int, ...]
    routes: tuple[int, ...]
    est_ms: float
    cap_ms: float
    #: per taken request: whether it can still make its deadline (a hopeless one runs its fastest route)
    feasible: tuple[bool, ...] = field(default=())


def finite_non_negative(name: str, value: object, unit: str = '') -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f'{name} must be a finite number >= 0{unit}, got {value!r}')
    return float(value)


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be a positive finite number, got {value!r}')
    return float(value)


class RouteTable:
    """The routes' accuracy, MACs and latency at every served batch size (all routes profiled at the same sizes).

    Latency between two profiled batch sizes is interpolated linearly; batches larger than the largest profiled
    size are not served (``max_batch_size``)."""

    def __init__(self, routes: Sequence[RouteCost]):
        if not routes:
            raise ValueError('a route table needs at least one route')
        sizes = sorted(routes[0].latency_ms)
        for r in routes:
            if sorted(r.latency_ms) != sizes:
                raise ValueError(f'route {r.id} is profiled at batch sizes {sorted(r.latency_ms)}, route '
                                 f'{routes[0].id} at {sizes}: profile every route at the same sizes')
            for b, ms in r.latency_ms.items():
                _finite_positive(f'route {r.id} latency at batch {b}', ms)
        if not sizes or sizes[0] < 1:
            raise ValueError(f'batch sizes must be >= 1, got {sizes}')
        self.routes = {r.id: r for r in routes}
        self.batch_sizes = tuple(sizes)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def latency(self, route: int, n: int) -> float:
        """Milliseconds for ``n`` samples of ``route`` in one group (1 <= n <= ``max_batch_size``)."""
        lat, sizes = self.routes[route].latency_ms, self.batch_sizes
        if n <= sizes[0]:
            return lat[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if n <= hi:
                return lat[lo] + (lat[hi] - lat[lo]) * (n - lo) / (hi - lo)
        raise ValueError(f'batch of {n} is above the largest profiled batch size {sizes[-1]}')

    @classmethod
    def from_model(cls, model: StitchedNet, batch_sizes: Sequence[int] = (1,), device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None, routes: Optional[Sequence[int]] = None,
                   statistic: str = 'median_ms') -> RouteTable:
        """The table of ``model``'s loaded card: top-1 (refused when stale or absent, :class:`StaleCardError`) and
        the latency profiles of ``device``/``dtype`` (default: the model's) at each of ``batch_sizes`` (a missing
        one: :class:`MissingLatencyProfileError` naming it and the command that makes it). ``routes``: the ids to
        serve (default: all). ``statistic``: the latency read, ``'median_ms'`` or (on a noisy machine) ``'p90_ms'``."""
        if statistic not in ('median_ms', 'p90_ms'):
            raise ValueError(f"statistic must be 'median_ms' or 'p90_ms', got {statistic!r}")
        param = next(model.parameters())
        device, dtype = device if device is not None else param.device, dtype if dtype is not None else param.dtype
        card, name = model.card, model_name(model)
        if card is None or not card.has_accuracy:
            raise StaleCardError(f'{name} has no route card with accuracies: load one (model.load_card) so that the '
                                 'controller knows what each route is worth')
        stale = staleness(card, model)
        if stale:
            raise StaleCardError(f'the route card is stale, {stale}. Measure the routes again (timm-stitch validate)')
        ids = list(range(model.num_routes)) if routes is None else [model.check_stitch_id(i) for i in routes]
        counted = model.counted_routes()
        costs = []
        for b in batch_sizes:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f'batch sizes must be positive integers, got {b!r}')
        for i in ids:
            entry = card.route(i)
            if entry is None or entry.top1 is None:
                raise StaleCardError(f'the route card has no top1 for route {i}')
            latency = {}
            for b in batch_sizes:
                key = device_profile(device, b, dtype)
                ms = entry.latency.get(key, {}).get(statistic)
                if ms is None and key in card.latency_profiles:
                    raise MissingLatencyProfileError(
                        f'the route card\'s latency profile {key!r} holds no time for route {i} (profile leaves out a '
                        f'route whose timings stay unstable). Time it again when quieter, or accept the spread: '
                        f'timm-stitch profile {name} --device {device} --dtype {_dtype_name(dtype)} --batch-size {b} '
                        f'--routes {i} --max-spread 10 --card CARD --out CARD')
                if ms is None:
                    held = ', '.join(card.latency_profiles) or 'none'
                    raise MissingLatencyProfileError(
                        f'the route card has no latency profile {key!r} for route {i} (it holds: {held}). Make it '
                        f'with: timm-stitch profile {name} --device {device} --dtype {_dtype_name(dtype)} '
                        f'--batch-size {b} --card CARD --out CARD')
                latency[b] = ms
            costs.append(RouteCost(i, float(entry.top1), int(counted[i].macs), latency))
        return cls(costs)


class RouteController:
    """Chooses the next batch and its routes (see the module docstring).

    Args:
        table: The routes to serve.
        max_batch_size: The most requests per batch (default and at most: the table's largest batch size).
        margin_ms: Time added to every estimated batch (the server's own overhead per batch).
        adapt: Weight of each observed batch in ``scale`` when it falls (0: keep the card's latencies as they
            are); it rises at once (see :meth:`observe`).
        horizon: How many batches ahead the queue is simulated (the rest is planned when it comes nearer; keeps a
            plan to about a millisecond when a burst has queued thousands of requests).
        reserve_ms: Time by which every deadline is planned early (the cap is chosen so that the queue drains that
            much before its deadlines): room for a batch that stalls on a shared machine, paid for in accuracy
            under load. Which requests are hopeless is still judged on the deadlines themselves.
        window: How many of the last observed batches ``scale`` is read from (at least 2).

    ``scale`` multiplies every card latency when the route cap is chosen: :meth:`observe` moves it to the second
    highest ratio of the last ``window`` batches' run times to their estimates, so that a machine slower than when
    it was profiled (other jobs, a server's own overhead) is followed and a lone stalled batch is not.
    ``typical_scale`` (the median of those ratios, at most ``scale``) is the one at which requests are judged
    hopeless: a cautious estimate costs accuracy when it is wrong, but giving up a request on it costs its
    deadline, so a request is given up only when the machine's usual speed cannot answer it in time. Both are
    state fed only by :meth:`observe`: the same observations give the same plans.
    """

    def __init__(self, table: RouteTable, max_batch_size: Optional[int] = None, margin_ms: float = 0.0,
                 adapt: float = 0.0, horizon: int = 8, reserve_ms: float = 0.0, window: int = 8):
        self.table = table
        limit = table.max_batch_size
        if max_batch_size is None:
            max_batch_size = limit
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= limit:
            raise ValueError(f'max_batch_size must be an integer in [1, {limit}] (the profiled batch sizes), '
                             f'got {max_batch_size!r}')
        for name, value in (('margin_ms', margin_ms), ('reserve_ms', reserve_ms)):
            if not value >= 0:
                raise ValueError(f'{name} must be >= 0, got {value!r}')
        if not 0 <= adapt <= 1:
            raise ValueError(f'adapt must be in [0, 1], got {adapt!r}')
        for name, value, least in (('horizon', horizon, 1), ('window', window, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f'{name} must be an integer >= {least}, got {value!r}')
        self.max_batch_size, self.margin_ms, self.adapt = max_batch_size, float(margin_ms), adapt
        self.scale = self.typical_scale = 1.0
        self.horizon, self.reserve_ms, self.window = horizon, float(reserve_ms), window
        self._ratios: tuple[float, ...] = ()  # the last ``window`` observed ratios of run time to card estimate
        # by accuracy (best first), ties to the faster (at batch 1) then the lower id
        self._by_top1 = sorted(table.routes.values(), key=lambda r: (-r.top1, table.latency(r.id, 1), r.id))
        self._allowed: dict[Bounds, tuple[int, ...]] = {}

    def allowed(self, bounds: Bounds) -> tuple[int, ...]:
        """The route ids ``bounds`` allow, most accurate first; :class:`NoRouteFitsError` naming the bound that
        excludes every route."""
        if bounds in self._allowed:
            return self._allowed[bounds]
        table = self.table
        if bounds.route is not None:
            if isinstance(bounds.route, bool) or not isinstance(bounds.route, int) or bounds.route not in table.routes:
                raise NoRouteFitsError(f'route {bounds.route!r} is not served: valid ids are '
                                       f'{_id_ranges(sorted(table.routes))}', 'route')
        for name in ('max_macs', 'max_latency_ms', 'min_top1'):
            value = getattr(bounds, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise NoRouteFitsError(f'{name} must be a finite number, got {value!r}', name)
        checks = [('route', lambda r: bounds.route is None or r.id == bounds.route),
                  ('max_macs', lambda r: bounds.max_macs is None or r.macs <= bounds.max_macs),
                  ('max_latency_ms', lambda r: bounds.max_latency_ms is None
                   or table.latency(r.id, 1) <= bounds.max_latency_ms),
                  ('min_top1', lambda r: bounds.min_top1 is None or r.top1 >= bounds.min_top1)]
        ids = [r.id for r in self._by_top1 if all(ok(r) for _, ok in checks)]
        if not ids:
            left = list(self._by_top1)
            for name, ok in checks:
                left = [r for r in left if ok(r)]
                if not left:
                    raise NoRouteFitsError(f'no served route meets {name}={getattr(bounds, name)!r} together with the '
                                           f'other bounds of the request ({bounds})', name)
        self._allowed[bounds] = tuple(ids)
        return self._allowed[bounds]

    def _batch_ms(self, routes: Sequence[int]) -> float:
        counts: dict[int, int] = {}
        for r in routes:
            counts[r] = counts.get(r, 0) + 1
        return self._group_ms(counts)

    def _group_ms(self, counts: Mapping[int, int], scale: Optional[float] = None) -> float:
        """Estimated ms of one batch holding ``counts[r]`` requests of route ``r`` (groups run one after another),
        the card's latencies times ``scale`` (default: :attr:`scale`)."""
        scale = self.scale if scale is None else scale
        return sum(self.table.latency(r, n) for r, n in counts.items()) * scale + self.margin_ms

    def observe(self, plan: Plan, actual_ms: float) -> None:
        """Record that ``plan``'s batch took ``actual_ms``. ``scale`` follows the second highest ratio of run time
        to card estimate over the last ``window`` batches: at once when that is above it (a machine that slowed
        down is followed from its second slow batch: an underestimate costs deadlines), by ``adapt`` when below.
        The highest is left out: on a shared machine a batch now and then stalls several times over while the next
        one runs at the usual speed, and a scale set by it would make the controller give up accuracy and, taking
        requests for hopeless, deadlines. ``typical_scale`` is the median of the same ratios. Ratios are kept within
        [0.5, 20]."""
        if self.adapt and plan.routes:
            card_ms = (self._batch_ms(plan.routes) - self.margin_ms) / self.scale
            ratio = min(max((actual_ms - self.margin_ms) / card_ms, 0.5), 20.0)
            self._ratios = (*self._ratios, ratio)[-self.window:]
            ranked = sorted(self._ratios)
            high = ranked[-2] if len(ranked) > 1 else self.scale
            self.scale = high if high > self.scale else self.scale + self.adapt * (high - self.scale)
            self.typical_scale = min(statistics.median(ranked), self.scale)

    def plan(self, queue: Sequence[Pending], now: float, arrivals: Optional[Arrivals] = None) -> Plan:
        """The next batch for ``queue`` at time ``now`` (seconds, the deadlines' clock). ``arrivals``: the requests
        expected meanwhile; the cap is then also one under which they make their deadlines within the horizon, so
        that a slow batch taken when a burst begins does not leave the burst's requests a queue they can only
        catch up with on fast routes. Raises :class:`NoRouteFitsError` when a request's bounds exclude every
        route."""
        if not queue:
            return Plan((), (), 0.0, 0.0)
        if arrivals is not None and not arrivals.rate:
            arrivals = None
        b = min(len(queue), self.max_batch_size)
        live = [i for i, q in enumerate(queue) if q.deadline > now]
        if len(live) == len(queue):
            return self._plan(queue, now, b, arrivals)
        # requests already late are hopeless and served earliest first after the others: only the first few can be
        # in this plan's horizon, so that a backlog of thousands (a long stall) costs no more planning than the
        # requests still in time (planning time taken from the batches would make the backlog grow)
        late = [(q.deadline, i) for i, q in enumerate(queue) if q.deadline <= now]
        keep = live + [i for _, i in heapq.nsmallest(b * self.horizon, late)]
        plan = self._plan([queue[i] for i in keep], now, b, arrivals)
        return replace(plan, take=tuple(keep[i] for i in plan.take))

    def _plan(self, queue: Sequence[Pending], now: float, b: int, arrivals: Optional[Arrivals]) -> Plan:
        latency = {r: self.table.latency(r, b) for r in self.table.routes}
        kinds: dict[Bounds, int] = {}  # distinct bounds, numbered; per number: the allowed routes and the fastest
        allowed, fast = [], []
        for bounds in {q.bounds for q in queue}:
            kinds[bounds] = len(allowed)
            allowed.append(self.allowed(bounds))
            fast.append(min(allowed[-1], key=lambda i: (latency[i], -self.table.routes[i].top1, i)))
        kind = [kinds[q.bounds] for q in queue]
        edf = sorted(range(len(queue)), key=lambda i: (queue[i].deadline, i))
        feasible = self._feasible(queue, edf, [fast[k] for k in kind], b, now)
        # requests that can still make their deadline, earliest first, then the hopeless ones (they run their
        # fastest route and hold no one back)
        order = ([i for i in edf if feasible[i]] + [i for i in edf if not feasible[i]])[:b * self.horizon]
        caps = sorted({latency[r] for ids in allowed for r in ids}, reverse=True)
        if arrivals is not None:  # they run the route a request without bounds gets under each cap
            unbounded = self.allowed(Bounds())
            arrival_route = min(unbounded, key=lambda i: (latency[i], -self.table.routes[i].top1, i))  # under no cap
            queued_batches = -(-sum(feasible[i] for i in order) // b)
        # the most accurate cap first under which the queue, and then the expected arrivals, make their deadlines;
        # when no cap lets the arrivals make theirs (a deadline shorter than any route, say), they are left out as
        # hopeless requests are, and the first cap the queue drains under is taken; the fastest when none is
        queue_only = None
        for cap in caps:
            pick = [next((r for r in ids if latency[r] <= cap), f) for ids, f in zip(allowed, fast)]
            routes = [pick[kind[i]] if feasible[i] else fast[kind[i]] for i in order]
            t = self._drains(queue, order, routes, feasible, b, now + self.reserve_ms / 1e3)
            if t is not None and queue_only is None:
                queue_only = cap, routes
            if t is not None and arrivals is not None:
                route = next((r for r in unbounded if latency[r] <= cap), arrival_route)
                t = t if self._drains_arrivals(arrivals, route, now, t, queued_batches) else None
            if t is not None:
                break
        else:
            cap, routes = queue_only or (cap, routes)
        take = order[:b]
        return Plan(tuple(take), tuple(routes[:b]), self._batch_ms(routes[:b]), cap, tuple(feasible[i] for i in take))

    def _feasible(self, queue: Sequence[Pending], edf: Sequence[int], fastest: Sequence[int], b: int,
                  now: float) -> list[bool]:
        """Which requests can make their deadline when the queue runs earliest deadline first (``edf``) on its
        fastest routes in batches of ``b``, the hopeless ones left out: a request that would finish late (or make
        an earlier one of its batch late) is hopeless, and served after the others it cannot push them past their
        deadlines one after another when a stall has queued more than can be served in time. Each batch is
        costed full (the plan fills it), at ``typical_scale``. ``horizon`` batches are checked, later requests when
        they come nearer."""
        feasible, full_ms = [True] * len(queue), {}
        t, counts, members = now, {}, []  # the end of the last batch; the routes and requests of the one filling
        one = len(set(fastest)) == 1  # (the usual case: no bounds) every batch costs the same
        for i in edf:
            if len(members) == b * self.horizon:
                break
            trial = counts if one else {**counts, fastest[i]: counts.get(fastest[i], 0) + 1}
            key = () if one else (*sorted(trial.items()), fastest[i])
            if key not in full_ms:
                full = {**trial, fastest[i]: trial.get(fastest[i], 0) + b - sum(trial.values())}
                full_ms[key] = self._group_ms(full, self.typical_scale)
            end = t + full_ms[key] / 1e3
            first = members[len(members) // b * b] if len(members) % b else i  # the earliest deadline of the batch
            if end > queue[first].deadline:
                feasible[i] = False
                continue
            counts = trial
            members.append(i)
            if len(members) % b == 0:
                t, counts = end, {}
        return feasible

    def _drains(self, queue: Sequence[Pending], order: Sequence[int], routes: Sequence[int],
                feasible: Sequence[bool], b: int, start: float) -> Optional[float]:
        """When the queue, served from ``start`` in batches of ``b`` in ``order`` (the feasible requests first,
        earliest deadline first) with ``routes``, is served up to its hopeless requests (on the deadlines' clock
        shifted by the reserve, as ``start`` is); None when a feasible deadline is missed."""
        t = start
        for first in range(0, len(order), b):
            if not feasible[order[first]]:  # the rest are hopeless
                return t
            t += self._batch_ms(routes[first:first + b]) / 1e3
            if t > queue[order[first]].deadline:
                return None
        return t

    def _drains_arrivals(self, arrivals: Arrivals, route: int, now: float, start: float,
                         done: int) -> bool:
        """Whether the requests arriving from ``now`` (one every ``1 / arrivals.rate`` s), served on ``route`` in
        batches of up to ``max_batch_size`` after the queue (``done`` batches ending at ``start``, on the clock
        shifted by the reserve), make their deadlines for the rest of the horizon."""
        t, served, shift = start, 0, self.reserve_ms / 1e3
        for _ in range(done, self.horizon):
            arrived = math.floor((t - shift - now) * arrivals.rate)
            if arrived <= served:  # none waiting: the next batch starts when the next request comes
                t, arrived = now + shift + (served + 1) / arrivals.rate, served + 1
            n = min(arrived - served, self.max_batch_size)
            t += self._group_ms({route: n}) / 1e3
            if t > now + (served + 1) / arrivals.rate + arrivals.deadline_s:
                return False
            served += n
        return True


def _id_ranges(ids: Sequence[int]) -> str:
    return f'{ids[0]}..{ids[-1]}' if ids == list(range(ids[0], ids[-1] + 1)) else ', '.join(map(str, ids))
