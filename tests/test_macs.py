"""MACs in the fvcore convention: counter rules, the pure per-route sum, and whole-route parity."""
import pytest
import timm
import torch
import torch.nn.functional as F
from reported_tables import read_rows
from tiny_models import TINY_IMG, TINY_WIDTHS, tiny_snnet
from torch import nn

import timm_stitch  # noqa: F401  (registers snnet_*)
from timm_stitch.macs import AnchorMacs, count_anchor_macs, count_macs, count_route_macs, route_macs
from timm_stitch.routes import StitchRef, plan_token_routes


def vit_block_macs(n: int, d: int) -> int:
    """SPEC §6: two LayerNorms, qkv, q·kᵀ and attn·v, proj, two MLP linears (ratio 4)."""
    return 2 * 5 * n * d + 3 * n * d * d + 2 * n * n * d + n * d * d + 8 * n * d * d


def test_counter_rules():
    x = torch.randn(2, 5, 8)
    assert count_macs(nn.Linear(8, 3), x)[0] == 2 * 5 * 8 * 3  # bias not counted
    assert count_macs(nn.LayerNorm(8), x)[0] == 5 * x.numel()
    assert count_macs(nn.LayerNorm(8, elementwise_affine=False), x)[0] == 4 * x.numel()
    assert count_macs(lambda t: F.gelu(t).softmax(-1) + t * 2, x)[0] == 0
    q, k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    assert count_macs(F.scaled_dot_product_attention, q, k, v)[0] == 2 * (2 * 3 * 7 * 9 * 4)
    assert count_macs(lambda a, b, c: (a @ b.transpose(-2, -1)).softmax(-1) @ c, q, k, v)[0] == 2 * (2 * 3 * 7 * 9 * 4)
    img = torch.randn(1, 3, 8, 8)
    assert count_macs(nn.Conv2d(3, 4, 3, bias=True), img)[0] == 4 * 3 * 9 * 6 * 6
    assert count_macs(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 8, 8))[0] == 4 * 9 * 6 * 6
    assert count_macs(nn.BatchNorm2d(3).eval(), img)[0] == 2 * img.numel()
    assert count_macs(nn.AdaptiveAvgPool2d(1), img)[0] == img.numel()
    assert count_macs(lambda t: t.mean((2, 3)), img)[0] == 0


def deit_anchor(d: int, n: int = 197, depth: int = 12, classes: int = 1000) -> AnchorMacs:
    embed, block, norm, head = 196 * 768 * d, vit_block_macs(n, d), 5 * n * d, d * classes
    return AnchorMacs(embed=embed, units=(block,) * depth, finish=norm, finish_no_norm=0, head=head,
                      forward=embed + depth * block + norm + head, block_units=(tuple(range(depth)),))


def test_route_macs_is_a_pure_sum_matching_the_official_table():
    """No models: SPEC §6's analytic DeiT pieces, summed along the planned routes, give every official value."""
    plan = plan_token_routes([12, 12, 12])
    anchors = [deit_anchor(d) for d in (192, 384, 768)]
    dims = {0: (192, 384), 1: (384, 768)}
    stitches = {(ref, front): 197 * dims[ref.pair][0] * dims[ref.pair][1]
                for r in plan.routes for ref, (front, _) in zip(r.stitches, r.cuts)}
    official = [r['flops'] for r in read_rows()]
    assert [route_macs(r, anchors, stitches, final_norm=False) for r in plan.routes] == official
    with_norm = [route_macs(r, anchors, stitches, final_norm=True) for r in plan.routes]
    end_dim = [192, 384, 768]
    assert [w - o for w, o in zip(with_norm, official)] == [
        0 if r.is_anchor else 5 * 197 * end_dim[r.anchors[-1]] for r in plan.routes]


def test_route_macs_follows_cuts_through_three_anchors():
    plan = plan_token_routes([2, 2, 2], nearest=True, multi_anchor=True)
    route = next(r for r in plan.routes if len(r.anchors) == 3 and r.cuts == ((0, 1), (1, 1)))
    anchors = [AnchorMacs(embed=10 ** a, units=(100 * 10 ** a, 1000 * 10 ** a), finish=7, finish_no_norm=0,
                          head=3 * 10 ** a, forward=0, block_units=((0, 1),)) for a in range(3)]
    assert route.stitches == (StitchRef(0, 0, 0), StitchRef(0, 1, 0))
    stitches = {(StitchRef(0, 0, 0), 0): 5, (StitchRef(0, 1, 0), 1): 70}
    # embed Ti, Ti block 0, stitch, S block 1, stitch, B block 1, B finish + head
    assert route_macs(route, anchors, stitches, final_norm=True) == 1 + 100 + 5 + 10000 + 70 + 100000 + 7 + 300


def test_tiny_anchor_macs_match_the_formula():
    model = tiny_snnet()
    n = (TINY_IMG // 8) ** 2 + 1
    expected = [16 * 3 * 64 * d + 4 * vit_block_macs(n, d) + 5 * n * d + d * 10 for d, _ in TINY_WIDTHS]
    anchors, _ = count_anchor_macs(model)
    assert [a.forward for a in anchors] == expected
    assert [a.embed + sum(a.units) + a.finish + a.head for a in anchors] == expected


@pytest.mark.parametrize('final_norm', [True, False])
def test_piece_sums_equal_counting_each_whole_route(final_norm):
    model = tiny_snnet(final_norm_on_stitched_routes=final_norm)
    x = torch.randn(1, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        whole = [count_macs(model, x, stitch_id=k)[0] for k in range(model.num_routes)]
    assert count_route_macs(model) == whole
    assert [r.macs for r in model.routes()] == whole


def test_counting_leaves_modes_and_buffers_alone():
    model = tiny_snnet().train()
    model.anchors[0].blocks[0].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_route_macs(model)
    assert model.training and not model.anchors[0].blocks[0].training and model.anchors[1].blocks[0].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_routes_cache_macs_and_recount_after_reset_classifier():
    model = tiny_snnet()
    first = model.routes()
    assert model.routes() == first
    model.reset_classifier(3)
    d = TINY_WIDTHS[0][0]
    assert model.routes()[0].macs == first[0].macs - d * 10 + d * 3


@pytest.mark.slow
def test_deit_tsb_matches_official_flops_and_timm_gmacs(monkeypatch):
    model = timm.create_model('snnet_deit_tsb')
    official = [r['flops'] for r in read_rows()]
    routes = model.routes()
    # counted once per model: a second call reuses the count instead of tracing every route again
    monkeypatch.setattr('timm_stitch.model.count_route_macs', lambda m: pytest.fail('MACs counted twice'))
    assert model.routes() == routes
    assert all(abs(r.macs - o) / o < 1e-3 for r, o in zip(routes, official))
    assert [round(r.macs / 1e9, 2) for r in routes[:3]] == [1.26, 4.61, 17.58]  # timm's published GMACs
    model.final_norm_on_stitched_routes = False
    assert count_route_macs(model) == official


@pytest.mark.slow
@pytest.mark.parametrize('name,gmacs', [
    ('resnet50', 4.11), ('swin_tiny_patch4_window7_224', 4.51), ('levit_192', 0.66)])
def test_counter_matches_timm_published_gmacs_of_other_families(name, gmacs):
    """Conv + eval BatchNorm + pooling (ResNet), windowed attention (Swin), BN-linear attention (LeViT)."""
    with torch.no_grad():
        macs, _ = count_macs(timm.create_model(name).eval(), torch.randn(1, 3, 224, 224))
    assert round(macs / 1e9, 2) == gmacs


SPEC_GMACS = {  # SPEC §3 and §6: official fvcore GFLOPs of named routes (two decimals)
    'snnet_swin_tsb': {13: 7.38, 23: 4.89, 25: 13.75, 28: 12.94},
    'snnet_resnet_18_50': {2: 3.76, 9: 2.49},
    'snnet_resnet18_swin_ti': {2: 4.10, 7: 2.54},
    'snnet_levit_192_256': {2: 1.02, 3: 0.98},
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(SPEC_GMACS))
def test_family_route_macs_match_the_spec(name):
    if name not in timm.list_models(name):
        pytest.skip(f'{name} is not registered')
    routes = timm.create_model(name).routes()
    assert {k: round(routes[k].macs / 1e9, 2) for k in SPEC_GMACS[name]} == SPEC_GMACS[name]
