"""The latency-SLO route controller on synthetic tables and traces (no model run, no Ray)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import tiny_snnet

from timm_stitch.cards import RouteCard
from timm_stitch.profiling import device_profile
from timm_stitch.slo import (
    Arrivals,
    Bounds,
    MissingLatencyProfileError,
    NoRouteFitsError,
    Pending,
    RouteController,
    RouteCost,
    RouteTable,
    StaleCardError,
)

#: small, middle, large: latency (ms) at batch 1 and 8; the large route sustains 8 / 40 ms = 200 requests/s
SMALL, MID, LARGE = 0, 1, 2
TABLE = RouteTable([RouteCost(SMALL, 70.0, 100, {1: 1.0, 8: 4.0}), RouteCost(MID, 78.0, 300, {1: 3.0, 8: 12.0}),
                    RouteCost(LARGE, 82.0, 900, {1: 10.0, 8: 40.0})])


def _simulate(controller: RouteController, arrivals: np.ndarray, slo_s: float, fixed: int | None = None,
              stall: tuple[float, float] = (math.inf, 0.0)):
    """Serve ``arrivals`` (seconds) on a virtual clock where each batch takes the table's estimate (``stall``:
    the first batch started at or after ``stall[0]`` takes ``stall[1]`` s longer, as when other jobs take the
    machine for a moment); returns the (time, route) of each answer in arrival order, and the met-deadline flags."""
    queue, pending, t, answers = [], list(range(len(arrivals))), 0.0, {}
    while pending or queue:
        while pending and arrivals[pending[0]] <= t:
            queue.append(pending.pop(0))
        if not queue:
            t = arrivals[pending[0]]
            continue
        if fixed is None:
            plan = controller.plan([Pending(arrivals[i] + slo_s) for i in queue], t)
        else:  # one route for everything, earliest first, batches as large as allowed
            take = tuple(range(min(len(queue), controller.max_batch_size)))
            plan = type('P', (), {'take': take, 'routes': (fixed,) * len(take)})
        t += controller._batch_ms(plan.routes) / 1e3
        if t >= stall[0]:
            t, stall = t + stall[1], (math.inf, 0.0)
        for i, route in zip(plan.take, plan.routes):
            answers[queue[i]] = (t, route)
        queue = [r for i, r in enumerate(queue) if i not in set(plan.take)]
    done = [answers[i] for i in range(len(arrivals))]
    met = np.array([a[0] - arrivals[i] <= slo_s + 1e-12 for i, a in enumerate(done)])
    return done, met


def _bursty(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Poisson arrivals at 20/s for 1 s, 600/s (3x what the large route sustains) for 0.5 s, 20/s for 1 s."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    for rate, end in [(20, 1.0), (600, 1.5), (20, 2.5)]:
        while True:
            t += rng.exponential(1 / rate)
            if t >= end:
                t = end
                break
            times.append(t)
    times = np.array(times)
    return times, (times >= 1.0) & (times < 1.5)


def test_empty_queue_gives_an_empty_plan():
    assert RouteController(TABLE).plan([], 0.0).take == ()


def test_a_lone_request_gets_the_most_accurate_route_its_deadline_allows():
    controller = RouteController(TABLE)
    assert controller.plan([Pending(1.0)], 0.0).routes == (LARGE,)
    assert controller.plan([Pending(0.005)], 0.0).routes == (MID,)
    assert controller.plan([Pending(0.002)], 0.0).routes == (SMALL,)


def test_routes_follow_the_queue_down_and_up_again():
    controller = RouteController(TABLE)
    arrivals, burst = _bursty()
    answers, met = _simulate(controller, arrivals, slo_s=0.1)
    routes = np.array([r for _, r in answers])
    assert met.all()
    assert (routes[arrivals < 0.9] == LARGE).all()  # low load: the best route
    assert (routes[burst] != LARGE).mean() > 0.5  # the burst: mostly faster routes
    assert (routes[arrivals > 2.0] == LARGE).all()  # back to the best once the queue has drained
    _, met_large = _simulate(controller, arrivals, slo_s=0.1, fixed=LARGE)
    assert met_large.mean() < 0.5
    mean_top1 = np.mean([TABLE.routes[r].top1 for r in routes])
    assert mean_top1 > TABLE.routes[SMALL].top1 and _simulate(controller, arrivals, 0.1, fixed=SMALL)[1].all()


def test_plans_are_deterministic():
    queue = [Pending(0.05 + 0.001 * (i % 5)) for i in range(30)]
    plans = {RouteController(TABLE).plan(queue, 0.0) for _ in range(3)}
    assert len(plans) == 1
    plan = plans.pop()
    assert len(plan.take) == 8 and [queue[i].deadline for i in plan.take] == sorted(q.deadline for q in queue)[:8]


def test_hopeless_requests_run_fast_and_do_not_hold_others_back():
    plan = RouteController(TABLE).plan([Pending(-1.0), Pending(1.0)], 0.0)
    assert plan.take == (1, 0) and plan.routes == (LARGE, SMALL) and plan.feasible == (True, False)


@pytest.mark.parametrize('bounds, route', [
    (Bounds(route=MID), MID), (Bounds(max_macs=300), MID), (Bounds(max_latency_ms=1.5), SMALL),
    (Bounds(min_top1=80.0), LARGE),
])
def test_bounds_restrict_each_request(bounds, route):
    controller = RouteController(TABLE)
    plan = controller.plan([Pending(1.0, bounds), Pending(1.0)], 0.0)
    assert plan.routes == (route, LARGE)


def test_min_top1_is_kept_under_load():
    queue = [Pending(0.05, Bounds(min_top1=80.0))] + [Pending(0.05)] * 15  # all on LARGE: 80 ms
    plan = RouteController(TABLE).plan(queue, 0.0)
    assert plan.routes[0] == LARGE and set(plan.routes[1:]) <= {SMALL, MID}


@pytest.mark.parametrize('bounds, match', [
    (Bounds(route=7), r'route 7 is not served: valid ids are 0\.\.2'),
    (Bounds(max_macs=50), 'max_macs=50'),
    (Bounds(min_top1=90.0), 'min_top1=90.0'),
    (Bounds(max_macs=200, min_top1=75.0), 'min_top1=75.0'),
    (Bounds(max_latency_ms=float('nan')), 'max_latency_ms must be a finite number'),
])
def test_bounds_no_route_meets_are_refused_naming_the_bound(bounds, match):
    with pytest.raises(NoRouteFitsError, match=match):
        RouteController(TABLE).plan([Pending(1.0, bounds)], 0.0)


def test_latency_is_interpolated_between_profiled_batch_sizes():
    assert TABLE.latency(LARGE, 1) == 10.0 and TABLE.latency(LARGE, 8) == 40.0
    assert math.isclose(TABLE.latency(LARGE, 4), 10.0 + 30.0 * 3 / 7)
    with pytest.raises(ValueError, match='above the largest profiled batch size 8'):
        TABLE.latency(LARGE, 9)
    with pytest.raises(ValueError, match=r'max_batch_size must be an integer in \[1, 8\]'):
        RouteController(TABLE, max_batch_size=16)
    with pytest.raises(ValueError, match='profile every route at the same sizes'):
        RouteTable([RouteCost(0, 1.0, 1, {1: 1.0}), RouteCost(1, 1.0, 1, {1: 1.0, 8: 2.0})])


# ---- from a model's card ----

@pytest.fixture(scope='module')
def model():
    return tiny_snnet().eval()


def _card(model, sizes=(1, 4)):
    card = RouteCard.from_model(model).with_accuracy(
        {i: (50.0 + i, None) for i in range(model.num_routes)}, 'tiny', 'measured')
    for b in sizes:
        key = device_profile('cpu', b)
        card = card.with_latency(key, {i: {'median_ms': b * (1.0 + i)} for i in range(model.num_routes)},
                                 {'what': 'latency', 'profile': key})
    return card


def test_table_from_a_fresh_card(model):
    model.load_card(_card(model))
    table = RouteTable.from_model(model, batch_sizes=(1, 4))
    assert table.batch_sizes == (1, 4) and table.latency(2, 4) == 12.0 and table.routes[2].top1 == 52.0
    assert table.routes[2].macs == model.counted_routes()[2].macs


def test_a_missing_profile_is_refused_naming_it_and_how_to_make_it(model):
    model.load_card(_card(model, sizes=(1,)))
    with pytest.raises(MissingLatencyProfileError, match=rf"no latency profile '{device_profile('cpu', 8)}'.*"
                                                         r'timm-stitch profile .* --batch-size 8'):
        RouteTable.from_model(model, batch_sizes=(1, 8))


def test_a_route_left_out_of_a_held_profile_is_named_not_the_profile(model):
    key = device_profile('cpu', 1)
    card = RouteCard.from_model(model).with_accuracy(
        {i: (50.0 + i, None) for i in range(model.num_routes)}, 'tiny', 'measured')
    card = card.with_latency(key, {i: {'median_ms': 1.0 + i} for i in range(1, model.num_routes)},
                             {'what': 'latency', 'profile': key})
    model.load_card(card)
    with pytest.raises(MissingLatencyProfileError, match=rf"latency profile '{key}' holds no time for route 0 .*"
                                                         r'--routes 0 --max-spread'):
        RouteTable.from_model(model, batch_sizes=(1,))


def test_a_stale_card_or_one_without_accuracy_is_refused(model):
    other = tiny_snnet(seed=1)
    model.load_card(_card(other))
    with pytest.raises(StaleCardError, match='the route card is stale, the card was measured on other weights'):
        RouteTable.from_model(model)
    model.load_card(RouteCard.from_model(model))
    with pytest.raises(StaleCardError, match='no route card with accuracies'):
        RouteTable.from_model(model)


def test_observed_batches_scale_the_card_latencies():
    controller = RouteController(TABLE, adapt=0.5)
    plan = controller.plan([Pending(0.015)], 0.0)
    assert plan.routes == (LARGE,)  # 10 ms on the card
    controller.observe(plan, 30.0)  # one batch 3x slower: a stall, not yet a slower machine
    assert controller.scale == 1.0
    controller.observe(plan, 30.0)  # the second in a row: the machine is 3x slower, followed at once
    assert controller.scale == 3.0
    assert controller.plan([Pending(0.015)], 0.0).routes == (MID,)  # LARGE now estimated at 30 ms
    for _ in range(6):  # faster again: by adapt, towards the second slowest of the last 8 batches
        controller.observe(plan, 10.0)
    assert controller.scale == 3.0
    controller.observe(plan, 10.0)
    assert controller.scale == 2.0
    assert RouteController(TABLE).plan([Pending(0.015)], 0.0).routes == (LARGE,)  # adapt=0: the card as it is


def test_one_stalled_batch_does_not_make_the_queue_look_hopeless():
    controller = RouteController(TABLE, adapt=0.2)
    plan = controller.plan([Pending(1.0)], 0.0)
    controller.observe(plan, 200.0)  # 20x its estimate once; the next batches run as the card says
    plan = controller.plan([Pending(0.015), Pending(0.015)], 0.0)
    assert plan.feasible == (True, True) and plan.routes == (LARGE, LARGE)


def test_requests_are_given_up_at_the_usual_speed_not_the_cautious_one():
    controller = RouteController(TABLE, adapt=0.5)
    plan = controller.plan([Pending(1.0)], 0.0)
    for ms in [10.0] * 6 + [30.0] * 2:  # a slowdown over two batches after six at the card's speed
        controller.observe(plan, ms)
    assert controller.scale == 3.0 and controller.typical_scale == 1.0
    # SMALL answers 8 in 4 ms as usual, 12 ms at the cautious scale: not given up, served on the fastest route
    plan = controller.plan([Pending(0.006)] * 8, 0.0)
    assert plan.feasible == (True,) * 8 and plan.routes == (SMALL,) * 8
    for _ in range(4):  # the machine stays slow: the usual speed follows once most recent batches are slow
        controller.observe(plan, 12.0)
    assert controller.typical_scale == 3.0
    assert controller.plan([Pending(0.006)] * 8, 0.0).feasible == (False,) * 8


@pytest.mark.parametrize('rate, route', [(None, LARGE), (20.0, LARGE), (200.0, LARGE), (300.0, MID), (600.0, MID)])
def test_expected_arrivals_keep_a_burst_from_starting_on_a_slow_batch(rate, route):
    # LARGE answers two in time, but at 300 requests/s (1.5x what it sustains) those arriving meanwhile would queue
    # past their deadlines within the horizon; at 200/s it keeps up
    arrivals = None if rate is None else Arrivals(rate, 0.1)
    assert RouteController(TABLE).plan([Pending(0.1)] * 2, 0.0, arrivals).routes == (route, route)
    one = RouteTable([TABLE.routes[LARGE]])  # a fixed route has no other choice
    assert RouteController(one).plan([Pending(0.1)] * 2, 0.0, arrivals).routes == (LARGE, LARGE)


def test_arrivals_no_route_can_answer_in_time_do_not_pull_the_queue_down():
    # expected arrivals with a 0.5 ms deadline (below every route) are hopeless: the queue, with a second to spare,
    # keeps the most accurate route
    assert RouteController(TABLE).plan([Pending(1.0)] * 2, 0.0, Arrivals(50.0, 0.0005)).routes == (LARGE, LARGE)


def test_a_zero_rate_plans_for_the_queue_alone():
    assert RouteController(TABLE).plan([Pending(0.1)] * 2, 0.0, Arrivals(0, 0.1)).routes == (LARGE, LARGE)


@pytest.mark.parametrize('rate, deadline_s, match', [
    (-5.0, 0.1, r'Arrivals.rate must be a finite number >= 0 \(requests per second\), got -5.0'),
    (math.inf, 0.1, 'Arrivals.rate must be a finite number >= 0'), ('10', 0.1, 'Arrivals.rate must be'),
    (10.0, 0.0, 'Arrivals.deadline_s must be a positive finite number, got 0.0'),
    (10.0, math.nan, 'Arrivals.deadline_s must be a positive finite number'),
])
def test_bad_arrivals_are_refused_naming_the_value(rate, deadline_s, match):
    with pytest.raises(ValueError, match=match):
        Arrivals(rate, deadline_s)


def test_a_stall_costs_only_the_requests_it_made_hopeless():
    # after a stall: 8 requests that no batch can answer in time (SMALL takes 4 ms for 8), 8 that one batch can
    queue = [Pending(0.003)] * 8 + [Pending(0.006)] * 8
    plan = RouteController(TABLE).plan(queue, 0.0)
    assert plan.take == tuple(range(8, 16)) and plan.feasible == (True,) * 8 and plan.est_ms == 4.0
    # served first, the hopeless ones would make the next 8 late as well (0 of 16 met instead of 8)


def test_a_backlog_of_late_requests_waits_behind_those_still_in_time():
    queue = [Pending(-1.0 + i * 1e-4) for i in range(5000)] + [Pending(0.05)] * 8
    plan = RouteController(TABLE).plan(queue, 0.0)
    assert plan.take == tuple(range(5000, 5008)) and plan.feasible == (True,) * 8
    plan = RouteController(TABLE).plan(queue[:5000], 0.0)  # none in time: the earliest late ones, fastest route
    assert plan.take == tuple(range(8)) and plan.routes == (SMALL,) * 8 and plan.feasible == (False,) * 8


@pytest.mark.parametrize('at', [1.1, 1.2, 1.25, 1.3, 1.4])
def test_a_burst_the_smallest_route_absorbs_is_met_through_a_stall(at):
    arrivals, _ = _bursty()
    stall = (at, 0.04)  # in the burst, one batch takes 40 ms longer (ten of SMALL's full batches)
    assert _simulate(RouteController(TABLE), arrivals, 0.1, fixed=SMALL, stall=stall)[1].all()
    answers, met = _simulate(RouteController(TABLE, reserve_ms=40), arrivals, 0.1, stall=stall)
    assert met.all()
    assert np.mean([TABLE.routes[r].top1 for _, r in answers]) > TABLE.routes[SMALL].top1


def test_without_a_reserve_a_stall_in_a_burst_costs_deadlines():
    arrivals, _ = _bursty()  # the controller plans the queue to drain just in time: no room for the stall
    assert not _simulate(RouteController(TABLE), arrivals, 0.1, stall=(1.3, 0.04))[1].all()


def test_the_reserve_plans_every_deadline_that_much_early():
    assert RouteController(TABLE, reserve_ms=6).plan([Pending(0.015)], 0.0).routes == (MID,)  # LARGE: 10 > 15 - 6
    with pytest.raises(ValueError, match='reserve_ms must be >= 0'):
        RouteController(TABLE, reserve_ms=-1)
