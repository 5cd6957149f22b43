"""Route samplers: uniform and flops-grouped (SN-Netv2 ROS), synced or per rank, resumable."""
from collections import Counter

import numpy as np
import pytest
from reported_tables import read_rows

from timm_stitch.sampling import RouteSampler, group_by_cost


def test_group_by_cost_walks_sorted_costs_from_each_groups_first():
    # sorted: 0 (id 0), 0.5 (1), 1.0 (3), 1.2 (2), 3.0 (4); 1.0 - 0 is not above the gap, 1.2 - 0 is
    assert group_by_cost([0.0, 0.5, 1.2, 1.0, 3.0], gap=1.0) == [[0, 1, 3], [2], [4]]
    assert group_by_cost([5.0, 5.0, 5.0], gap=0.0) == [[0, 1, 2]]
    assert group_by_cost([3.0, 1.0, 2.0], gap=0.0) == [[1], [2], [0]]
    with pytest.raises(ValueError, match='gap'):
        group_by_cost([1.0], gap=-1)


def test_groups_of_the_official_deit_table_partition_the_routes_within_the_gap():
    rows = read_rows()
    costs = [r['flops'] for r in sorted(rows, key=lambda r: r['cfg_id'])]
    groups = group_by_cost(costs, gap=1e9)
    assert sorted(i for g in groups for i in g) == list(range(71))
    for g in groups:
        assert max(costs[i] for i in g) - costs[g[0]] <= 1e9
    firsts = [costs[g[0]] for g in groups]
    assert firsts == sorted(firsts)
    assert all(b - a > 1e9 for a, b in zip(firsts, firsts[1:]))  # each next group starts beyond the gap
    assert groups[0][0] == 0 and 39 in groups[-1]  # DeiT-Ti is the cheapest, id 39 (18.34 G) the costliest


def test_synced_draws_agree_across_ranks_per_rank_draws_differ():
    synced = [RouteSampler(71, sync='synced', seed=3, rank=r) for r in range(4)]
    per_rank = [RouteSampler(71, sync='per-rank', seed=3, rank=r) for r in range(4)]
    for _ in range(50):
        assert len({s() for s in synced}) == 1
    draws = [[s() for _ in range(50)] for s in per_rank]
    assert all(draws[0] != d for d in draws[1:])
    assert RouteSampler(71, seed=4).draw(0) != RouteSampler(71, seed=3).draw(0) or \
        RouteSampler(71, seed=4).draw(1) != RouteSampler(71, seed=3).draw(1)


def test_uniform_draws_cover_every_route_evenly():
    sampler = RouteSampler(6, seed=0)
    counts = Counter(sampler() for _ in range(6000))
    assert sorted(counts) == list(range(6))
    assert all(abs(c - 1000) < 150 for c in counts.values())


def test_flops_grouped_picks_groups_evenly_then_routes_within():
    costs = [1.0, 1.1, 1.2, 1.3, 9.0]  # two groups: four cheap routes and one expensive
    sampler = RouteSampler(5, mode='flops-grouped', costs=costs, gap=0.5, seed=0)
    assert sampler.groups == [[0, 1, 2, 3], [4]]
    counts = Counter(sampler() for _ in range(4000))
    assert abs(counts[4] - 2000) < 200  # half the steps go to the single expensive route
    assert all(abs(counts[i] - 500) < 120 for i in range(4))


def test_group_weights_follow_i_over_k_plus_one_over_g():
    sampler = RouteSampler(3, mode='flops-grouped', costs=[1, 2, 3], gap=0.1, group_k=2)
    weights = np.array([0 / 2 + 1 / 3, 1 / 2 + 1 / 3, 2 / 2 + 1 / 3])
    np.testing.assert_allclose(sampler.group_probs, weights / weights.sum())


def test_state_round_trip_continues_the_sequence():
    full = RouteSampler(71, sync='per-rank', seed=7, rank=1)
    expected = [full() for _ in range(20)]
    first = RouteSampler(71, sync='per-rank', seed=7, rank=1)
    head = [first() for _ in range(8)]
    resumed = RouteSampler(71, sync='per-rank', seed=7, rank=1)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed() for _ in range(12)] == expected
    with pytest.raises(ValueError, match='other settings'):
        RouteSampler(71, sync='synced', seed=7).load_state_dict(first.state_dict())


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_routes=0), 'num_routes'),
    (dict(num_routes=3, mode='random'), 'sampling mode'),
    (dict(num_routes=3, sync='all'), 'route sync'),
    (dict(num_routes=3, mode='flops-grouped'), 'one cost per route'),
    (dict(num_routes=3, mode='flops-grouped', costs=[1, 2]), 'one cost per route'),
    (dict(num_routes=3, group_k=0), 'group_k'),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouteSampler(**kwargs)


def test_route_weights_skew_draws_towards_the_anchor_routes():
    weights = [5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # two anchors drawn 5x as often as each stitched route
    sampler = RouteSampler(7, route_weights=weights, seed=0)
    counts = Counter(sampler() for _ in range(15000))
    assert all(abs(counts[i] - 5000) < 300 for i in (0, 1)) and all(abs(counts[i] - 1000) < 150 for i in range(2, 7))
    resumed = RouteSampler(7, route_weights=weights, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.draw(3) == sampler.draw(3)
    with pytest.raises(ValueError, match='other settings'):
        RouteSampler(7, seed=0).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match='7 positive numbers'):
        RouteSampler(7, route_weights=[1.0] * 6)
