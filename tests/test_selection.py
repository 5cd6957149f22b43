"""Budget selection and Pareto fronts: pure functions over hand-made routes, then through the model."""
import random

import pytest
from tiny_models import tiny_snnet

from timm_stitch.cards import RouteCard
from timm_stitch.catalogue import MissingMeasurementError
from timm_stitch.routes import Route
from timm_stitch.selection import Budget, filter_routes, mark_dominated, pareto_front, select_route


def R(i, macs=None, params=None, top1=None, latency_ms=None, top5=None):
    return Route(id=i, anchors=(0,), macs=macs, params=params, top1=top1, latency_ms=latency_ms, top5=top5)


ROUTES = [R(0, 100, 10, 70.0, 1.0), R(1, 400, 40, 79.0, 3.0), R(2, 900, 90, 81.0, 9.0),
          R(3, 450, 42, 78.5, 3.5), R(4, 300, 30, 79.0, 2.5), R(5, 950, 95, 81.0, 9.5)]


def test_select_highest_top1_within_every_bound():
    assert select_route(ROUTES).id == 2  # 81.0 twice: the cheaper one
    assert select_route(ROUTES, max_macs=500).id == 4  # 79.0 twice: fewer MACs wins
    assert select_route(ROUTES, max_macs=500, max_params=35, max_latency_ms=2.6).id == 4
    assert select_route(ROUTES, max_latency_ms=2.0).id == 0
    assert select_route(ROUTES, min_top1=80.0).id == 2


def test_budget_is_the_one_form_of_the_bounds():
    budget = Budget(max_macs=500, max_params=35)
    assert select_route(ROUTES, budget) == select_route(ROUTES, max_macs=500, max_params=35)
    assert filter_routes(ROUTES, Budget(min_top1=79.0)) == filter_routes(ROUTES, min_top1=79.0)
    assert budget.costs == {'macs': 500, 'params': 35}
    with pytest.raises(TypeError, match='not both'):
        select_route(ROUTES, budget, max_macs=100)
    with pytest.raises(TypeError, match='max_macs must be a number'):
        Budget(max_macs=True)
    with pytest.raises(TypeError):
        select_route(ROUTES, max_flops=1)  # not a bound
    with pytest.raises(ValueError, match='min_top1 must be a number'):
        Budget(min_top1=float('nan'))


def test_select_prefers_known_accuracy():
    assert select_route([R(0, 100), R(1, 200, top1=50.0), R(2, 50)]).id == 1


def test_select_lowest_cost_without_accuracy():
    routes = [R(0, 300, 30), R(1, 200, 50), R(2, 200, 40), R(3, 900, 90)]
    assert select_route(routes).id == 2
    assert select_route(routes, max_params=35).id == 0


def test_select_errors_name_the_smallest_available_value():
    with pytest.raises(ValueError, match=r'max_macs=50 .* smallest available macs, 100 \(route 0\)'):
        select_route(ROUTES, max_macs=50)
    with pytest.raises(ValueError, match=r'highest available top1, 81 \(route 2\)'):
        select_route(ROUTES, min_top1=90)
    with pytest.raises(ValueError, match='no route meets all of them together'):
        select_route(ROUTES, max_macs=150, min_top1=75)
    with pytest.raises(ValueError, match='no route has a known latency_ms'):
        select_route([R(0, 100)], max_latency_ms=5)
    with pytest.raises(TypeError, match='max_macs must be a number'):
        select_route(ROUTES, max_macs='5G')


def test_pareto_front_and_dominated_marks():
    routes = ROUTES + [R(6, 100, top1=70.0), R(7, 50)]  # 6 ties route 0 exactly; 7 has no accuracy
    assert [r.id for r in pareto_front(routes)] == [0, 6, 4, 2]
    marks = {r.id: r.dominated for r in mark_dominated(routes)}
    assert marks == {0: False, 1: True, 2: False, 3: True, 4: False, 5: True, 6: False, 7: None}
    assert [r.id for r in pareto_front(routes, x='latency_ms')] == [0, 4, 2]
    with pytest.raises(ValueError, match="x must be one of 'macs', 'params', 'latency_ms'"):
        pareto_front(routes, x='flops')


def test_pareto_sweep_agrees_with_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        routes = [R(i, rng.randint(1, 8), top1=float(rng.randint(1, 8))) for i in range(rng.randint(1, 30))]
        expected = {r.id for r in routes if not any(
            s.macs <= r.macs and s.top1 >= r.top1 and (s.macs < r.macs or s.top1 > r.top1) for s in routes)}
        assert {r.id for r in pareto_front(routes)} == expected


def test_model_select_stitch_and_pareto_use_the_card():
    model = tiny_snnet()
    card = RouteCard.from_model(model)
    accuracy = {r.id: (50.0 + r.macs / 1e5 - (r.id % 3), None) for r in model.routes()}
    model.load_card(card.with_accuracy(accuracy, 'tiny', 'measured'))
    routes = model.routes()
    best = max(routes, key=lambda r: (r.top1, -r.macs))
    assert model.select_stitch().id == best.id and model.stitch_id == best.id
    budget = sorted(r.macs for r in routes)[5]
    chosen = model.select_stitch(max_macs=budget)
    assert chosen.macs <= budget and model.stitch_id == chosen.id
    assert chosen.top1 == max(r.top1 for r in routes if r.macs <= budget)
    front = model.pareto()
    assert {r.id for r in front} == {r.id for r in routes if r.dominated is False}
    assert all(r.dominated is not None for r in routes)
    with pytest.raises(ValueError, match='smallest available macs'):
        model.select_stitch(max_macs=1)
    assert model.stitch_id == chosen.id


def test_a_floor_alone_asks_for_the_cheapest_route_reaching_it():
    """min_top1 alone: the cheapest route at or above the floor (not the most accurate route overall)."""
    routes = [R(0, 100, top1=70.0), R(1, 633, top1=89.0), R(2, 384, top1=88.01), R(3, 500, top1=88.5)]
    assert select_route(routes, min_top1=88).id == 2
    assert select_route(routes, min_top1=88.2).id == 3
    # a budget asks for the most accurate within it; with a floor too, the floor only narrows those
    assert select_route(routes, max_macs=700).id == 1
    assert select_route(routes, max_macs=550, min_top1=88).id == 3
    with pytest.raises(ValueError, match='above the highest available top1, 89'):
        select_route(routes, max_macs=700, min_top1=90)


@pytest.mark.parametrize('floor', [0.88, 0.5, float('nan')])
def test_a_fractional_or_nan_floor_on_percent_accuracies_is_an_error(floor):
    routes = [R(0, 100, top1=70.0), R(1, 633, top1=89.0)]
    with pytest.raises(ValueError, match='min_top1=(0.88|0.5) looks like a fraction.*percent.*pass min_top1=|'
                                         'min_top1 must be a number, got nan'):
        select_route(routes, min_top1=floor)
    assert select_route([R(0, 100, top1=0.7), R(1, 50, top1=0.9)], min_top1=0.8).id == 1  # fractions throughout


def test_model_select_stitch_with_a_floor_takes_the_cheapest_route():
    model = tiny_snnet()
    routes = model.routes()
    accuracy = {r.id: (60.0 + r.macs / max(q.macs for q in routes) * 30, None) for r in routes}
    model.load_card(RouteCard.from_model(model).with_accuracy(accuracy, 'tiny', 'measured'))
    routes = model.routes()
    chosen = model.select_stitch(min_top1=80)
    assert chosen.id == min((r for r in routes if r.top1 >= 80), key=lambda r: (r.macs, r.params, r.id)).id
    assert model.stitch_id == chosen.id and chosen.top1 < max(r.top1 for r in routes)
    with pytest.raises(ValueError, match='looks like a fraction'):
        model.select_stitch(min_top1=0.8)
    assert model.stitch_id == chosen.id


def test_pareto_without_the_values_it_needs_names_what_to_measure():
    model = tiny_snnet()
    with pytest.raises(MissingMeasurementError, match='no latency_ms/top1 Pareto front: the model has no route card, '
                                                      r'so no route latency; measure them with timm_stitch.profile'):
        model.pareto(x='latency_ms')
    with pytest.raises(MissingMeasurementError, match='no route has a top1 .*load a route card with accuracies'):
        model.pareto()
    accuracy = {r.id: (50.0 + r.id, None) for r in model.routes()}
    model.load_card(RouteCard.from_model(model).with_accuracy(accuracy, 'tiny', 'measured'))
    assert model.pareto()
    with pytest.raises(MissingMeasurementError, match=f"no latency profile '{model.latency_profile}' "
                                                      r'\(it holds: none\)'):
        model.pareto(x='latency_ms')
    with pytest.raises(ValueError, match="x must be one of 'macs', 'params', 'latency_ms', got 'flops'"):
        model.pareto(x='flops')
