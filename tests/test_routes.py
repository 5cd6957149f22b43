"""Route planning (pure functions) against the official SN-Net enumeration (SPEC §2.1, §3.1, §4, §5)."""
import dataclasses

import pytest
from reported_tables import read_rows

from timm_stitch.routes import (
    StitchPosition,
    format_route_table,
    interpolated_positions,
    nearest_end_map,
    plan_staged_routes,
    plan_token_routes,
    window_positions,
)


def official_deit_position(p: int) -> tuple[int, int, int]:
    """SPEC §2.1 closed form for position index p = 0..33: (front, end, layer)."""
    if p < 4:
        return (*((0, 0), (0, 1), (1, 0), (1, 1))[p], 0)
    w, r = (p - 4) // 3 + 1, (p - 4) % 3
    return (*((w, w + 1), (w + 1, w), (w + 1, w + 1))[r], w)


def test_deit_71_routes_in_official_order():
    plan = plan_token_routes([12, 12, 12], kernel_size=2, stride=1, nearest=True)
    routes = plan.routes
    assert len(routes) == 71
    assert [r.id for r in routes] == list(range(71))
    assert [r.anchors for r in routes[:3]] == [(0,), (1,), (2,)]
    for r in routes[3:]:
        pair, p = ((0, 1), r.id - 3) if r.id < 37 else ((1, 2), r.id - 37)
        front, end, layer = official_deit_position(p)
        assert r.anchors == pair
        assert r.cuts == ((front, end),)
        assert r.stitches[0].layer == layer
        assert r.stitches[0].pair == (0 if pair == (0, 1) else 1)


def test_deit_route_ids_cover_reference_table():
    ids = [r['cfg_id'] for r in read_rows()]
    assert ids == [r.id for r in plan_token_routes([12] * 3).routes]


@pytest.mark.parametrize('route_id, cuts, layer', [
    (3, (0, 0), 0), (4, (0, 1), 0), (5, (1, 0), 0), (7, (1, 2), 1), (24, (7, 7), 6), (36, (11, 11), 10),
    (39, (1, 0), 0), (56, (6, 7), 6), (70, (11, 11), 10),
])
def test_deit_worked_examples(route_id, cuts, layer):
    route = plan_token_routes([12] * 3).routes[route_id]
    assert route.cuts == (cuts,)
    assert route.stitches[0].layer == layer


def test_deit_layer_sharing():
    plan = plan_token_routes([12] * 3)
    assert len(plan.groups) == 2
    for group in plan.groups:
        assert group.num_layers == 11
        per_layer = [sum(p.layer == layer for p in group.positions) for layer in range(11)]
        assert per_layer == [4] + [3] * 10


@pytest.mark.parametrize('kernel, stride, expected', [(1, 1, 27), (2, 2, 51), (3, 1, 111), (2, 1, 71)])
def test_window_settings(kernel, stride, expected):
    assert len(plan_token_routes([12] * 3, kernel, stride).routes) == expected


def test_all_pairs_and_three_anchor_routes():
    plan = plan_token_routes([12] * 3, nearest=False, multi_anchor=True)
    assert len(plan.routes) == 732
    assert [g.front_anchor for g in plan.groups] == [0, 0, 1] and [g.end_anchor for g in plan.groups] == [1, 2, 2]
    triples = [r for r in plan.routes if len(r.anchors) == 3]
    assert len(triples) == 732 - 3 - 3 * 34
    assert all(r.cuts[1][0] >= r.cuts[0][1] for r in triples)


def test_any_number_of_anchors():
    assert len(plan_token_routes([12, 12]).routes) == 2 + 34  # the official code raises here
    plan = plan_token_routes([12] * 4)
    assert len(plan.routes) == 4 + 3 * 34
    assert [(g.front_anchor, g.end_anchor) for g in plan.groups] == [(0, 1), (1, 2), (2, 3)]
    assert len(plan_token_routes([6]).routes) == 1


def test_window_positions_forward_only():
    assert window_positions(4, 2, 1, forward_only=True) == [StitchPosition(i, i + 1, i) for i in range(3)]


def test_nearest_end_map_matches_torch_nearest():
    import torch
    for front, end in [(6, 18), (2, 4), (2, 6), (4, 4), (3, 7), (5, 3)]:
        torch_map = torch.nn.functional.interpolate(
            torch.arange(front, dtype=torch.float32)[None, None], size=end, mode='nearest')
        assert nearest_end_map(front, end) == torch_map.flatten().long().tolist()


def test_swin_41_routes_official_and_corrected_mapping():
    depths = [[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]]
    official = plan_staged_routes(depths, [0, 1, 2], layer_mapping='official').routes
    assert len(official) == 41
    assert [(r.stage, r.anchors, r.cuts) for r in official[3:7]] == [
        (0, (0, 1), ((0, 1),)), (0, (1, 2), ((0, 1),)), (1, (0, 1), ((0, 1),)), (1, (1, 2), ((0, 1),))]
    ti_s = official[7:24]
    assert [r.cuts[0] for r in ti_s] == [
        (0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8), (3, 9), (3, 10), (3, 11), (4, 12),
        (4, 13), (4, 14), (5, 15), (5, 16), (5, 17)]
    assert [r.stitches[0].layer for r in ti_s] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    assert [r.cuts[0] for r in official[24:]] == [(i, i + 1) for i in range(17)]
    assert [r.stitches[0].layer for r in official[24:]] == list(range(17))
    corrected = plan_staged_routes(depths, [0, 1, 2]).routes
    assert [r.stitches[0].layer for r in corrected[7:24]] == [j for j, _ in (r.cuts[0] for r in ti_s)]


def test_resnet_and_levit_route_counts():
    r18_r50 = plan_staged_routes([[2, 2, 2, 2], [3, 4, 6, 3]], [1, 2], layer_mapping='official').routes
    assert len(r18_r50) == 10
    assert [(r.stage, r.cuts[0], r.stitches[0].layer) for r in r18_r50[2:]] == [
        (1, (0, 1), 0), (1, (1, 2), 0), (1, (1, 3), 1),
        (2, (0, 1), 0), (2, (0, 2), 0), (2, (1, 3), 0), (2, (1, 4), 1), (2, (1, 5), 1)]
    assert len(plan_staged_routes([[2, 2, 2, 2], [2, 2, 6, 2]], [1, 2]).routes) == 8
    levit = plan_staged_routes([[4, 4, 4], [4, 4, 4]], [0, 1]).routes
    assert [(r.stage, r.cuts[0]) for r in levit[2:]] == [(s, (i, i + 1)) for s in (0, 1) for i in range(3)]


def test_interpolated_positions_rejects_unknown_mapping():
    with pytest.raises(ValueError, match="'corrected' or 'official'"):
        interpolated_positions(6, 18, 'nearest')


@pytest.mark.parametrize('kwargs', [dict(depths=[12, 0]), dict(depths=[12], kernel_size=0), dict(depths=[])])
def test_bad_planning_arguments(kwargs):
    with pytest.raises(ValueError):
        plan_token_routes(**kwargs)


def test_staged_rejects_missing_stage():
    with pytest.raises(ValueError, match='stage 3 is out of range'):
        plan_staged_routes([[2, 2, 2]], [3])


def test_format_route_table():
    table = format_route_table(plan_token_routes([12] * 3).routes[:4], ['Ti', 'S', 'B'])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ['id', 'route'] and len(lines) == 6
    assert 'Ti -> S (0,0)' in lines[5]


def test_format_route_table_macs_unit():
    routes = plan_token_routes([12] * 3).routes[:2]
    small = [dataclasses.replace(r, macs=m) for r, m in zip(routes, (5_312_000, 17_000_000))]
    assert 'MMACs' in format_route_table(small) and '  5.312 ' in format_route_table(small)
    large = [dataclasses.replace(r, macs=m) for r, m in zip(routes, (1_258_411_200, 4_608_338_304))]
    assert 'GMACs' in format_route_table(large) and '  1.258 ' in format_route_table(large)


def test_a_stage_of_one_block_each_is_stitched_at_its_end():
    """No cut inside a one-block stage: the route runs the front's whole stage, then the end from its next stage
    (end block 1 of a one-block stage is the next stage's first unit); the last stage gets none."""
    plan = plan_staged_routes([(1, 1, 2), (1, 1, 2)], stages=(0, 1))
    assert [(r.stage, r.cuts, r.stitches[0].layer) for r in plan.routes[2:]] == [(0, ((0, 1),), 0), (1, ((0, 1),), 0)]
    assert plan_staged_routes([(2, 2), (2, 2)], stages=(0,)).routes[2].cuts == ((0, 1),)  # in-stage cuts unchanged


def test_a_deeper_front_resumes_at_the_same_relative_depth():
    """ViT-Ti (12 blocks) before CLIP ViT-XS (8): every front block resumes where the end is as far along; the
    official mapping (its checkpoints never have a deeper front) keeps none."""
    positions = interpolated_positions(12, 8)
    assert [(p.front, p.end) for p in positions] == [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (6, 4), (7, 5), (8, 6),
                                                     (9, 6), (10, 7)]
    assert [p.layer for p in positions] == list(range(10))
    assert interpolated_positions(12, 8, 'official') == []
