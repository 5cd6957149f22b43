"""SN-Netv2 two-way route spaces: the pure enumeration against the authors' S/L results file, MACs against their
FLOPs, and two-way routes on tiny anchors (forward/backward, LS init of both directions, export, serving, saving)."""
import json
from collections import Counter

import pytest
import timm
import torch
from image_folders import ANCHORS, make_image_folder, write_config
from reported_tables import DEIT3_SL, DEIT3_SL_FLOPS, read_rows
from safetensors.torch import load_file
from tiny_models import low_rank_images, tiny_images, tiny_vit_args

import timm_stitch  # noqa: F401  (registers snnet_*)
from timm_stitch import StitchedNet, StitchOptions, stitch
from timm_stitch.card_readme import render_readme
from timm_stitch.cards import RouteCard
from timm_stitch.cli import main as cli_main
from timm_stitch.export import export_stitch
from timm_stitch.hub import CONFIG_NAME, save_pretrained
from timm_stitch.macs import count_macs, count_route_macs
from timm_stitch.route_spaces import plan_routes, plan_two_way_routes
from timm_stitch.routes import StitchRef, plan_token_routes
from timm_stitch.sampling import group_by_cost
from timm_stitch.train import main as train_main

KINDS = {(0,): 'anchor', (1,): 'anchor', (0, 1): 'SL', (1, 0): 'LS', (1, 0, 1): 'LSL', (0, 1, 0): 'SLS'}


def _kind_ranges(plan):
    """Route ids of each kind, in id order."""
    ranges = {}
    for r in plan.routes:
        ranges.setdefault(KINDS[r.anchors], []).append(r.id)
    return ranges


# ---- the pure enumeration ----

@pytest.mark.parametrize('depths', [(12, 24), (12, 12)])
def test_135_routes_in_the_official_id_blocks(depths):
    plan = plan_two_way_routes(depths)
    assert [r.id for r in plan.routes] == list(range(135))
    ranges = _kind_ranges(plan)
    assert {k: len(v) for k, v in ranges.items()} == {'anchor': 2, 'SL': 12, 'LS': 11, 'LSL': 55, 'SLS': 55}
    assert ranges['anchor'] == [0, 1] and ranges['SL'] == list(range(2, 14)) and ranges['LS'] == list(range(14, 25))
    assert ranges['LSL'] == list(range(25, 80)) and ranges['SLS'] == list(range(80, 135))
    g0, g1 = plan.groups
    assert (g0.pair, g0.front_anchor, g0.end_anchor, g0.num_layers) == (0, 0, 1, 12)
    assert (g1.pair, g1.front_anchor, g1.end_anchor, g1.num_layers) == (1, 1, 0, 11)
    for r in plan.routes:  # every cut joins the route's consecutive anchors through that pair's layers
        assert all(ref.pair == a for ref, a in zip(r.stitches, r.anchors))


def test_official_examples_of_the_s_l_pair():
    """Ids 2, 14, 25, 80, 134 as the official code runs them (front blocks 0..front, end resumes at end)."""
    routes = plan_two_way_routes([12, 24]).routes
    sl, ls = (lambda i: StitchRef(0, 0, i)), (lambda i: StitchRef(0, 1, i))
    assert (routes[2].anchors, routes[2].cuts, routes[2].stitches) == ((0, 1), ((0, 2),), (sl(0),))
    assert (routes[14].anchors, routes[14].cuts, routes[14].stitches) == ((1, 0), ((1, 1),), (ls(0),))
    assert (routes[25].anchors, routes[25].cuts, routes[25].stitches) == ((1, 0, 1), ((1, 1), (1, 4)), (ls(0), sl(1)))
    assert (routes[80].anchors, routes[80].cuts, routes[80].stitches) == ((0, 1, 0), ((0, 2), (3, 2)), (sl(0), ls(1)))
    assert (routes[134].anchors, routes[134].cuts, routes[134].stitches) == (
        (0, 1, 0), ((9, 20), (21, 11)), (sl(9), ls(10)))
    # SL i resumes the large anchor at 2(i+1); LS after odd large block 2k+1 resumes the small one at k+1
    assert [r.cuts[0] for r in routes[2:14]] == [(i, 2 * i + 2) for i in range(12)]
    assert [(r.cuts[0], r.stitches[0].layer) for r in routes[14:25]] == [((2 * k + 1, k + 1), k) for k in range(11)]
    assert routes[13].cuts == ((11, 24),)  # the untrained one: every small block, no large block


def test_chained_routes_follow_the_official_loops():
    """LSL: outer LS, inner SL but the last, SL front >= LS resume block; SLS: outer SL, inner LS, likewise."""
    routes = plan_two_way_routes([12, 24]).routes
    sl, ls = [r.cuts[0] for r in routes[2:14]], [r.cuts[0] for r in routes[14:25]]
    assert [r.cuts for r in routes[25:80]] == [(a, b) for a in ls for b in sl[:-1] if b[0] >= a[1]]
    assert [r.cuts for r in routes[80:135]] == [(a, b) for a in sl for b in ls if b[0] >= a[1]]


def test_equal_depths_stitch_large_to_small_after_every_block_but_the_last():
    routes = plan_two_way_routes([12, 12]).routes
    assert [r.cuts[0] for r in routes[2:14]] == [(i, i + 1) for i in range(12)]
    assert [(r.cuts[0], r.stitches[0].layer) for r in routes[14:25]] == [((i, i + 1), i) for i in range(11)]


def test_every_reported_route_exists_with_the_official_flops_file():
    rows = read_rows(DEIT3_SL)
    flops = json.loads(DEIT3_SL_FLOPS.read_text())
    assert len(rows) == 134 and {str(r['cfg_id']): r['flops'] for r in rows} == flops
    ids = {r.id for r in plan_two_way_routes([12, 24]).routes}
    assert {r['cfg_id'] for r in rows} == ids - {13}


@pytest.mark.parametrize('depths, match', [
    ((12, 24, 24), 'exactly two anchors'), ((12, 18), 'multiple'), ((24, 12), 'shallower. anchor first'),
    ((0, 12), 'positive')])
def test_bad_depths_raise(depths, match):
    with pytest.raises(ValueError, match=match):
        plan_two_way_routes(depths)


def test_plan_routes_dispatches_and_refuses_what_two_way_cannot_plan():
    assert plan_routes([[12], [12]]) == plan_token_routes([12, 12])
    assert plan_routes([[12], [24]], StitchOptions(route_space='two_way')) == plan_two_way_routes([12, 24])
    with pytest.raises(ValueError, match="route_space must be one of"):
        StitchOptions(route_space='both')
    with pytest.raises(ValueError, match='plain token anchors'):
        plan_routes([[2, 2, 6, 2], [2, 2, 18, 2]], StitchOptions(route_space='two_way'))
    with pytest.raises(ValueError, match='multi_anchor'):
        plan_routes([[12], [24]], StitchOptions(route_space='two_way', multi_anchor=True))


# ---- MACs ----

@pytest.fixture(scope='module')
def deit3_sl_macs():
    """Per-route MACs of DeiT-3 S/L two-way, counted on the meta device (shapes only, no weights allocated)."""
    with torch.device('meta'):
        net = StitchedNet(['deit3_small_patch16_224', 'deit3_large_patch16_224'], route_space='two_way')
    return count_route_macs(net)


def test_deit3_s_l_macs_match_the_official_flops(deit3_sl_macs):
    flops = {int(k): v for k, v in json.loads(DEIT3_SL_FLOPS.read_text()).items()}
    errors = [abs(deit3_sl_macs[i] - f) / f for i, f in flops.items()]
    assert len(errors) == 134 and max(errors) < 1e-3


def test_flops_groups_are_the_official_ones_with_id_13_beside_the_small_anchor(deit3_sl_macs):
    """ROS groups (1 GMACs gap): the official 13 groups of the 134 trained routes; id 13 joins the small anchor."""
    official = {int(k): v for k, v in json.loads(DEIT3_SL_FLOPS.read_text()).items()}
    ids = sorted(official)
    expected = [[ids[i] for i in g] for g in group_by_cost([official[i] for i in ids], 1e9)]
    assert [len(g) for g in expected] == [1] + [12] * 11 + [1]
    ours = group_by_cost(deit3_sl_macs, 1e9)
    assert ours == [sorted([13] + expected[0])] + expected[1:]


# ---- tiny two-way networks ----

@pytest.fixture(scope='module')
def tiny_two_way():
    """Tiny small (3 blocks, width 16) and large (6 blocks, width 32) anchors: 2 + 3 + 2 + 1 + 1 routes."""
    torch.manual_seed(0)
    anchors = [timm.create_model(**tiny_vit_args(16, 2, depth=3)), timm.create_model(**tiny_vit_args(32, 2, depth=6))]
    return StitchedNet(anchors, route_space='two_way').eval()


def test_tiny_plan(tiny_two_way):
    net = tiny_two_way
    assert [(r.anchors, r.cuts) for r in net.plan.routes] == [
        ((0,), ()), ((1,), ()), ((0, 1), ((0, 2),)), ((0, 1), ((1, 4),)), ((0, 1), ((2, 6),)),
        ((1, 0), ((1, 1),)), ((1, 0), ((3, 2),)), ((1, 0, 1), ((1, 1), (1, 4))), ((0, 1, 0), ((0, 2), (3, 2)))]
    assert [len(layers) for layers in net.stitch_layers['0']] == [3, 2]
    assert net.route_segments(4)[1].units == ()  # the last SL route runs no large block


def test_route_macs_equal_the_counted_forward(tiny_two_way):
    """Each route's MACs (a sum of pieces) equal one counted forward of that route, whichever way it goes."""
    net, x = tiny_two_way, tiny_images(1)
    for route in net.counted_routes():
        assert route.macs == count_macs(net, x, stitch_id=route.id)[0], route.id


@pytest.mark.parametrize('stitch_id', [7, 8])  # LSL and SLS
def test_chained_route_runs_forward_and_backward(tiny_two_way, stitch_id):
    net = tiny_two_way
    net.zero_grad()
    net.train()
    try:
        net(tiny_images(2), stitch_id=stitch_id).logsumexp(-1).sum().backward()
    finally:
        net.eval()
    used = set(net.plan.routes[stitch_id].stitches)
    for pair, layers in enumerate(net.stitch_layers['0']):
        for i, layer in enumerate(layers):
            grads = [p.grad for p in layer.parameters()]
            if StitchRef(0, pair, i) in used:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (pair, i)
            else:
                assert all(g is None for g in grads), (pair, i)
    net.zero_grad()


def _block_output(model: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Tokens after ``model.blocks[block]`` of a timm ViT (eval mode)."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for b in model.blocks[:block + 1]:
        h = b(h)
    return h


def test_ls_init_fits_both_directions():
    """Every layer of both pairs is the least-squares map from the front anchor's output of block ``front`` to the
    end anchor's output of block ``end - 1`` (for the last SL route: the large anchor's last block)."""
    torch.manual_seed(0)
    anchors = [timm.create_model(**tiny_vit_args(16, 2, depth=2)), timm.create_model(**tiny_vit_args(32, 2, depth=4))]
    net = StitchedNet(anchors, route_space='two_way').eval()
    images = low_rank_images(48)
    net.init_stitches(images, progress=False)
    fitted = 0
    with torch.no_grad():
        for group in net.plan.groups:
            front, end = net.anchors[group.front_anchor], net.anchors[group.end_anchor]
            for p in group.positions:
                x = _block_output(front, images, p.front).flatten(0, 1).double()
                y = _block_output(end, images, p.end - 1).flatten(0, 1).double()
                solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution
                expected = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ solution
                got = net.stitch_layers['0'][group.pair][p.layer](x.float()).double()
                assert (got - expected).abs().max() < 1e-3 * expected.abs().max(), (group.pair, p)
                fitted += 1
    assert fitted == 3 and [g.front_anchor for g in net.plan.groups] == [0, 1]


def test_export_serving_and_features_on_every_route(tiny_two_way):
    net = tiny_two_way
    x = tiny_images(net.num_routes)
    with torch.no_grad():
        single = torch.stack([net(x[k:k + 1], stitch_id=k)[0] for k in range(net.num_routes)])
        assert torch.allclose(net(x, stitch_id=list(range(net.num_routes))), single, atol=1e-5)  # shared prefixes
        for route in net.counted_routes():
            exported = export_stitch(net, route.id)
            assert torch.allclose(exported(x[:2]), net(x[:2], stitch_id=route.id), atol=1e-5), route.id
            assert sum(p.numel() for p in exported.parameters()) == route.params, route.id
            final, inter = net.forward_intermediates(x[:2], stitch_id=route.id)
            assert torch.allclose(final, net.forward_features(x[:2], stitch_id=route.id), atol=1e-6)
            if not route.is_anchor:
                assert len(exported.anchors) == len(set(route.anchors)), route.id  # an anchor passed twice: once
                assert len(inter) == sum(len(s.units) for s in net.route_segments(route.id)), route.id


def test_builder_and_cards_keep_the_route_space(tiny_two_way):
    net = stitch([tiny_vit_args(32, 2, depth=6), tiny_vit_args(16, 2, depth=3)], route_space='two_way')
    assert net.num_routes == 9 and net.route_space == 'two_way' and net.anchors[0].embed_dim == 16
    with pytest.raises(ValueError, match='two plain token anchors'):
        stitch([tiny_vit_args(16, 2, depth=3)] * 3, route_space='two_way')
    card = RouteCard.from_model(tiny_two_way)
    assert card.settings['route_space'] == 'two_way' and '- Routes: two-way' in render_readme(card, plot_name=None)
    one_way = StitchedNet([timm.create_model(**tiny_vit_args(16, 2, depth=3)),
                           timm.create_model(**tiny_vit_args(32, 2, depth=6))])
    with pytest.raises(ValueError, match="route_space='two_way'"):
        card.check_model(one_way)


def test_saved_two_way_model_reloads_with_its_routes(tmp_path):
    model = timm.create_model('snnet_deit_ts', depth=2, img_size=32, route_space='two_way').eval()
    folder = save_pretrained(model, tmp_path / 'saved')
    assert json.loads((folder / CONFIG_NAME).read_text())['model_args']['route_space'] == 'two_way'
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert loaded.route_space == 'two_way' and loaded.plan == model.plan
    assert Counter(r.anchors for r in loaded.plan.routes) == {(0,): 1, (1,): 1, (0, 1): 2, (1, 0): 1}


def test_trainer_builds_the_two_way_route_space_and_samples_it_by_flops(tmp_path):
    """``--route-space two_way`` reaches the model; flops-grouped sampling and LS init run on its routes."""
    data = make_image_folder(tmp_path / 'images', per_class=(8, 2))
    config = write_config(tmp_path / 'c.yaml', epochs=1)
    assert train_main(['-c', str(config), '--data-dir', str(data), '--out', str(tmp_path), '--experiment', 'run',
                       '--route-space', 'two_way', '--route-sampling', 'flops-grouped', '--route-group-gap', '1e-4',
                       '--stitch-init-samples', '16', '--val-routes', 'none']) == 0
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4, route_space='two_way')
    model.load_state_dict(load_file(tmp_path / 'run' / 'last.safetensors'))  # strict: both directions' layers
    assert model.num_routes == 5 and len(model.stitch_layers['0']) == 2
    state = torch.load(tmp_path / 'run' / 'last.state.pth', weights_only=False)
    assert state['sampler']['num_routes'] == 5 and state['sampler']['mode'] == 'flops-grouped'


def test_command_line_lists_two_way_routes(capsys):
    assert cli_main(['routes', 'snnet_deit_ts', '--route-space', 'two_way', '--json']) == 0
    routes = json.loads(capsys.readouterr().out)
    assert len(routes) == 135 and routes[80]['anchors'] == [0, 1, 0] and routes[80]['cuts'] == [[0, 1], [1, 2]]
    assert cli_main(['routes', 'snnet_deit_tsb', '--route-space', 'two_way']) == 2
    assert 'exactly two anchors' in capsys.readouterr().err
