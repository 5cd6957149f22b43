"""Swin, ResNet, ResNet->Swin and LeViT: official route tables, anchor parity, every route runs, BN, LS init."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from tiny_models import levit_family, resnet_family, resnet_swin_family, swin_family
from torch import nn

from timm_stitch import StitchedNet
from timm_stitch.bn import stitched_bn_layers
from timm_stitch.models.snnet_levit import LEVIT_192_256_ANCHORS
from timm_stitch.models.snnet_resnet import RESNET18_SWIN_TI_ANCHORS, RESNET_18_50_ANCHORS
from timm_stitch.models.snnet_swin import SWIN_TSB_ANCHORS
from timm_stitch.stitching import StitchingLayer, to_rows

# ---- official route tables (the authors' enumeration), from the registered architectures on the meta device ---

SWIN_TI_S_STAGE2 = [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8), (3, 9), (3, 10), (3, 11),
                    (4, 12), (4, 13), (4, 14), (5, 15), (5, 16), (5, 17)]
SWIN_TI_S_STAGE2_OFFICIAL = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]

# (anchors, stage, cut, official layer, corrected layer) per stitched route, in route-id order
SWIN_ROUTES = (
    [((0, 1), 0, (0, 1), 0, 0), ((1, 2), 0, (0, 1), 0, 0), ((0, 1), 1, (0, 1), 0, 0), ((1, 2), 1, (0, 1), 0, 0)]
    + [((0, 1), 2, c, lo, c[0]) for c, lo in zip(SWIN_TI_S_STAGE2, SWIN_TI_S_STAGE2_OFFICIAL)]
    + [((1, 2), 2, (i, i + 1), i, i) for i in range(17)]
)
RESNET_STAGE2 = [((0, 1), 2, (0, 1), 0, 0), ((0, 1), 2, (0, 2), 0, 0), ((0, 1), 2, (1, 3), 0, 1),
                 ((0, 1), 2, (1, 4), 1, 1), ((0, 1), 2, (1, 5), 1, 1)]
RESNET_18_50_ROUTES = [((0, 1), 1, (0, 1), 0, 0), ((0, 1), 1, (1, 2), 0, 1), ((0, 1), 1, (1, 3), 1, 1)] + RESNET_STAGE2
RESNET18_SWIN_ROUTES = [((0, 1), 1, (0, 1), 0, 0)] + RESNET_STAGE2
LEVIT_ROUTES = [((0, 1), s, (j, j + 1), j, j) for s in (0, 1) for j in range(3)]

REGISTERED = {
    'snnet_swin_tsb': (SWIN_TSB_ANCHORS, SWIN_ROUTES),
    'snnet_resnet_18_50': (RESNET_18_50_ANCHORS, RESNET_18_50_ROUTES),
    'snnet_resnet18_swin_ti': (RESNET18_SWIN_TI_ANCHORS, RESNET18_SWIN_ROUTES),
    'snnet_levit_192_256': (LEVIT_192_256_ANCHORS, LEVIT_ROUTES),
}


def _meta_model(arch: str, **kwargs) -> StitchedNet:
    with torch.device('meta'):
        return timm.create_model(arch, **kwargs)


@pytest.mark.parametrize('layer_mapping', ['corrected', 'official'])
@pytest.mark.parametrize('arch', list(REGISTERED))
def test_registered_route_tables(arch, layer_mapping):
    anchors, stitched = REGISTERED[arch]
    model = _meta_model(arch, layer_mapping=layer_mapping)
    assert model.anchor_names == list(anchors)
    assert model.num_routes == len(anchors) + len(stitched)
    assert [r.anchors for r in model.plan.routes[:len(anchors)]] == [(a,) for a in range(len(anchors))]
    got = [(r.anchors, r.stage, r.cuts[0], r.stitches[0].layer) for r in model.plan.routes[len(anchors):]]
    column = 3 if layer_mapping == 'official' else 4
    assert got == [(a, s, c, row[column]) for row in stitched for a, s, c in [row[:3]]]
    assert all(r.stitches[0].stage == r.stage for r in model.plan.routes[len(anchors):])


def test_registered_route_counts():
    assert {arch: _meta_model(arch).num_routes for arch in REGISTERED} == {
        'snnet_swin_tsb': 41, 'snnet_resnet_18_50': 10, 'snnet_resnet18_swin_ti': 8, 'snnet_levit_192_256': 8}


def _layer_shapes(model: StitchedNet) -> dict[str, list[tuple]]:
    return {f'{s}.{p}': [tuple(layer.transform.weight.shape) for layer in pair]
            for s, stage in model.stitch_layers.items() for p, pair in enumerate(stage)}


def test_registered_stitch_layers_and_params():
    """Stitching-layer counts and shapes of the official code; the ResNet totals are the official logs' parameter
    counts."""
    swin = _meta_model('snnet_swin_tsb', layer_mapping='official')
    assert {k: len(v) for k, v in _layer_shapes(swin).items()} == {
        '0.0': 1, '0.1': 1, '1.0': 1, '1.1': 1, '2.0': 6, '2.1': 17}
    assert _layer_shapes(swin)['2.1'][0] == (512, 384) and _layer_shapes(swin)['0.0'][0] == (96, 96)
    r50 = _meta_model('snnet_resnet_18_50', layer_mapping='official')
    assert _layer_shapes(r50) == {'1.0': [(512, 128, 1, 1)] * 2, '2.0': [(1024, 256, 1, 1)] * 2}
    assert sum(p.numel() for p in r50.parameters()) == 37_904_976
    rswin = _meta_model('snnet_resnet18_swin_ti', layer_mapping='official')
    assert _layer_shapes(rswin) == {'1.0': [(192, 128, 1, 1)], '2.0': [(384, 256, 1, 1)] * 2}
    assert {layer.out_layout for layer in rswin.modules() if isinstance(layer, StitchingLayer)} == {'nhwc'}
    assert sum(p.numel() for p in rswin.parameters()) == 40_200_010
    levit = _meta_model('snnet_levit_192_256')
    assert _layer_shapes(levit) == {'0.0': [(256, 192)] * 3, '1.0': [(384, 288)] * 3}


# ---- tiny configs of each family: anchor parity and every route forward + backward ------------------------------

FAMILIES = ['swin', 'resnet', 'resnet_swin', 'levit']


@pytest.mark.families(*FAMILIES)
def test_anchor_routes_equal_timm(family_net):
    model, images, _ = family_net
    model.eval()
    with torch.no_grad():
        for a, anchor in enumerate(model.anchors):
            assert torch.equal(model(images, stitch_id=a), anchor(images))
            assert torch.equal(model.forward_features(images, stitch_id=a), anchor.forward_features(images))


@pytest.mark.families(*FAMILIES)
def test_every_route_runs_forward_and_backward(family_net):
    model, images, num_routes = family_net
    assert model.num_routes == num_routes
    model.train()
    for route in model.plan.routes:
        model.zero_grad(set_to_none=True)
        out = model(images, stitch_id=route.id)
        assert out.shape == (2, 10), (route.id, out.shape)
        out.square().mean().backward()
        if not route.is_anchor:
            layer = model.stitch_layer(route.stitches[0])
            assert layer.transform.weight.grad is not None and layer.transform.weight.grad.abs().sum() > 0


def _count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, m in enumerate(modules)]
    return counts, handles


def test_swin_routes_run_each_patch_merge_once():
    """timm runs Swin's patch merge at the start of stages 1-3: a cut inside stage s runs the front anchor's merges
    into stages 1..s and the end anchor's merges after stage s, each exactly once."""
    model, images, _ = swin_family()
    merges = [stage.downsample for anchor in model.anchors for stage in anchor.layers[1:]]  # 3 per anchor
    counts, handles = _count_calls(merges)
    with torch.no_grad():
        for route in model.plan.routes[3:]:
            counts[:] = [0] * len(counts)
            model(images, stitch_id=route.id)
            front, end = route.anchors
            expected = [0] * 9
            for s in range(1, 4):
                expected[3 * (front if s <= route.stage else end) + s - 1] = 1
            assert counts == expected, route
    for h in handles:
        h.remove()


def test_resnet_to_swin_stitch_is_a_channels_last_view():
    """The NCHW -> NHWC change is a view of the 1x1 convolution's output: no copy in the stitching layer."""
    model, images, _ = resnet_swin_family()
    layer = model.stitch_layer(model.plan.routes[2].stitches[0])
    convs = []
    handle = layer.transform.register_forward_hook(lambda m, args, out: convs.append(out))
    out = layer(torch.randn(2, layer.in_dim, 8, 8))
    handle.remove()
    assert isinstance(layer.transform, nn.Conv2d) and out.shape == (2, 8, 8, layer.out_dim)
    assert out.data_ptr() == convs[0].data_ptr() and torch.equal(out, convs[0].permute(0, 2, 3, 1))


@pytest.mark.filterwarnings('ignore:route 4 runs')
def test_levit_distilled_heads_like_timm():
    """Stitched LeViT routes end in the anchor's own head: the mean of both heads, the pair in distilled training."""
    model, images, _ = levit_family()
    end = model.anchors[1]
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(images, stitch_id=4)
        head, dist = end.head(feats.mean(1)), end.head_dist(feats.mean(1))
        torch.testing.assert_close(model.forward_head(feats, stitch_id=4), (head + dist) / 2)
        for anchor in model.anchors:
            anchor.set_distilled_training(True)
        model.train()
        out = model(images, stitch_id=4)
        assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, 10)


# ---- least-squares init for a CNN family --------------------------------------------------------------------------

def _stitch_error(model: StitchedNet, images: torch.Tensor) -> float:
    """Relative error of every stitching layer's output against the end anchor's activation it replaces."""
    from timm_stitch.ls_init import _unit_outputs
    errors = []
    with torch.no_grad():
        outputs = [_unit_outputs(model, a, images) for a in range(len(model.anchors))]
        for g in model.plan.groups:
            front, end = model.adapters[g.front_anchor], model.adapters[g.end_anchor]
            for p in g.positions:
                x = outputs[g.front_anchor][front.unit_index(g.stage, p.front) + 1]
                y = to_rows(outputs[g.end_anchor][end.unit_index(g.stage, p.end)], end.layout)
                pred = to_rows(model.stitch_layers[str(g.stage)][g.pair][p.layer](x), end.layout)
                errors.append(((pred - y).norm() / y.norm()).item())
    return sum(errors) / len(errors)


@pytest.mark.families('resnet', 'resnet_swin')
def test_ls_init_improves_cnn_stitches_on_held_out_images(family_net):
    model, images, _ = family_net
    model.eval()
    size = images.shape[-1]
    fit, held_out = torch.randn(64, 3, size, size), torch.randn(16, 3, size, size)
    before = _stitch_error(model, held_out)
    model.init_stitches(fit, batch_size=16, progress=False)
    after = _stitch_error(model, held_out)
    assert after < 0.5 * before, (before, after)


# ---- BatchNorm families -------------------------------------------------------------------------------------------

def test_stitched_bn_layers_are_those_after_the_stitch():
    model, _, _ = resnet_family()
    route = model.route(5)  # stage 2, cut (0, 1): R50 layer3 blocks 1..5, layer4
    layers = stitched_bn_layers(model, route.id)
    r50 = model.anchors[1]
    expected = [m for blocks in (r50.layer3[1:], r50.layer4) for m in blocks.modules()
                if isinstance(m, nn.BatchNorm2d)]
    assert list(layers) == expected
    assert stitched_bn_layers(model, 0) == ()


def test_recalibrate_bn_gives_a_route_its_own_statistics():
    model, images, _ = resnet_family()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    anchor_out = model(images, stitch_id=1)
    with pytest.warns(UserWarning, match='recalibrate_bn'):
        stale = model(images, stitch_id=5)

    data = torch.randn(32, 3, 32, 32)
    first_bn = stitched_bn_layers(model, 5)[0]
    inputs = []
    handle = first_bn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    assert model.recalibrate_bn(data, stitch_id=5, batch_size=8, progress=False) == len(stitched_bn_layers(model, 5))
    handle.remove()
    # the layers' own buffers (anchor statistics) and every other parameter are unchanged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        calibrated = model(images, stitch_id=5)
        assert torch.equal(model(images, stitch_id=1), anchor_out)
    assert not torch.allclose(calibrated, stale)
    # the route's statistics are the cumulative average of the per-batch statistics over the whole pass
    mean, var = model.route_bn.get(5)[0]
    assert len(inputs) == 4
    torch.testing.assert_close(mean, torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0))
    torch.testing.assert_close(var, torch.stack([x.var((0, 2, 3)) for x in inputs]).mean(0))


def test_calibrated_routes_are_thread_safe():
    """Routes sharing BatchNorm layers, run from several threads, each see their own statistics."""
    from concurrent.futures import ThreadPoolExecutor
    model, images, _ = resnet_family()
    model.eval()
    for route in (5, 9):
        model.recalibrate_bn(torch.randn(16, 3, 32, 32), stitch_id=route, batch_size=8, progress=False)
    with torch.no_grad():
        expected = {k: model(images, stitch_id=k) for k in (1, 5, 9)}
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda k: (k, model(images, stitch_id=k)), [1, 5, 9] * 6))
    assert all(torch.equal(out, expected[k]) for k, out in results)


def test_recalibrate_bn_covers_levit_heads_and_is_a_no_op_without_bn():
    model, images, _ = levit_family()
    layers = stitched_bn_layers(model, 6)
    assert model.anchors[1].head.bn in layers and model.anchors[1].head_dist.bn in layers
    assert model.anchors[0].head.bn not in layers
    assert model.recalibrate_bn(torch.randn(8, 3, 64, 64), stitch_id=6, progress=False) == len(layers)
    swin, _, _ = swin_family()
    assert swin.recalibrate_bn(torch.randn(2, 3, 32, 32), stitch_id=10, progress=False) == 0


# ---- real sizes (untrained) ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:route')  # BN families: uncalibrated routes warn
@pytest.mark.parametrize('arch', list(REGISTERED))
def test_registered_real_size_runs(arch):
    """Untrained real-size anchors: anchor parity; the forward of every anchor and of the first and last route of each
    (stage, anchor pair), so that every stitched stage runs at its real size (every route runs at tiny size above,
    and every stitching layer's real shape is checked on the meta device); backward through two stitched routes."""
    torch.manual_seed(0)
    model = timm.create_model(arch).eval()
    images = torch.randn(1, 3, 224, 224)
    by_group: dict[tuple[int, int], list] = {}
    for route in model.plan.routes:
        if route.stitches:
            by_group.setdefault((route.stitches[0].stage, route.stitches[0].pair), []).append(route)
    sampled = [r for r in model.plan.routes if not r.stitches] + [r for g in by_group.values() for r in (g[0], g[-1])]
    with torch.no_grad():
        assert torch.equal(model(images, stitch_id=0), model.anchors[0](images))
        for route in sampled:
            assert model(images, stitch_id=route.id).shape == (1, 1000)
    model.train()
    for route in (model.plan.routes[len(model.anchors)], model.plan.routes[-1]):
        model(images.expand(2, -1, -1, -1), stitch_id=route.id).logsumexp(1).mean().backward()
        assert model.stitch_layer(route.stitches[0]).transform.weight.grad is not None
