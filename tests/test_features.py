"""timm's feature API on every route: forward_intermediates, feature_info, features_only backbones."""
from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
from tiny_models import SMALL_ARCHS

import timm_stitch
from timm_stitch.errors import RouteIdError
from timm_stitch.features import StitchedFeatures, route_feature_info

pytestmark = pytest.mark.filterwarnings('ignore:route .* BatchNorm layers after its stitch')


def _stitched_ids(net) -> list[int]:
    """The first, a middle and the last stitched route."""
    stitched = [r.id for r in net.plan.routes if not r.is_anchor]
    return sorted({stitched[0], stitched[len(stitched) // 2], stitched[-1]})


def _expected_anchors(net, stitch_id: int) -> list[int]:
    """The anchor each intermediate of a one-stitch route comes from, by the documented indexing: per block run
    for token families; per stage (the end anchor's from the stitched stage on, the stem first; the front's for a
    stage stitched at its end) otherwise."""
    route = net.plan.routes[stitch_id]
    (front, end), stage = route.cuts[0], route.stitches[0].stage
    first, last = route.anchors
    depths = net.adapters[last].stage_depths()
    stem = [first] if len(net.anchors[first].feature_info) > len(net.adapters[first].stage_depths()) else []
    if len(net.adapters[first].stage_depths()) != len(depths):  # a CNN stage into a ViT: the stage outputs it ran
        ran = stage + (front == net.adapters[first].stage_depths()[stage] - 1)
        return stem + [first] * ran + [last] * (depths[0] - end)
    if len(depths) == 1:
        return [first] * (front + 1) + [last] * (depths[0] - end)
    ends_stage = end == depths[stage]  # a one-block stage stitched at its end: the front's stage output is kept
    return stem + [first if s < stage or (s == stage and ends_stage) else last for s in range(len(depths))]


def _hooked_module(net, name: str) -> torch.nn.Module:
    """The module whose output is intermediate ``name``: a stage's last block (stitched routes run blocks)."""
    module = net.get_submodule(name)
    blocks = getattr(module, 'blocks', module)
    return blocks[-1] if isinstance(blocks, torch.nn.Sequential) else module


def _as_map(y: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """A hooked activation (NCHW, NHWC or tokens with prefix) in the intermediate's NCHW shape."""
    b, c, h, w = like.shape
    if layout == 'tokens':
        return y[:, y.shape[1] - h * w:].reshape(b, h, w, c).permute(0, 3, 1, 2)
    return y.permute(0, 3, 1, 2) if layout == 'nhwc' else y


def test_anchor_routes_equal_timm_bit_exact(family, family_net):
    net, x = family_net.model.eval(), family_net.images
    for anchor_id, anchor in enumerate(net.anchors):
        for norm in (False, True):
            with torch.no_grad():
                final, ours = net.forward_intermediates(x, norm=norm, stitch_id=anchor_id)
                ref_final, ref = anchor.forward_intermediates(x, norm=norm)
            assert torch.equal(final, ref_final)
            assert len(ours) == len(ref) == len(route_feature_info(net, anchor_id)) == len(anchor.feature_info)
            assert all(torch.equal(a, b) for a, b in zip(ours, ref))
        with torch.no_grad():
            last = net.forward_intermediates(x, indices=[-1], intermediates_only=True, stitch_id=anchor_id)
        assert torch.equal(last[0], ref[-1]) if not norm else last[0].shape == ref[-1].shape


def test_stitched_routes_match_feature_info_and_a_hooked_forward(family, family_net):
    net, x = family_net.model.eval(), family_net.images
    for stitch_id in _stitched_ids(net):
        infos = route_feature_info(net, stitch_id)
        with torch.no_grad():
            final, feats = net.forward_intermediates(x, stitch_id=stitch_id)
        assert len(feats) == len(infos)
        assert [int(i['module'].split('.')[1]) for i in infos] == _expected_anchors(net, stitch_id)
        for feat, info in zip(feats, infos):
            assert feat.shape[1] == info['num_chs'], (stitch_id, info)
            assert feat.shape[-2:] == (x.shape[-2] // info['reduction'], x.shape[-1] // info['reduction'])
        # independently: hook each named module during the plain forward of the route
        seen: dict[str, torch.Tensor] = {}
        handles = [_hooked_module(net, info['module']).register_forward_hook(
            lambda m, i, o, name=info['module'], seen=seen: seen.__setitem__(name, o)) for info in infos]
        with torch.no_grad():
            features = net.forward_features(x, stitch_id=stitch_id)
        for h in handles:
            h.remove()
        assert torch.equal(final, features)
        for feat, info in zip(feats, infos):
            layout = net.adapters[int(info['module'].split('.')[1])].layout
            assert torch.equal(feat, _as_map(seen[info['module']], feat, layout)), (stitch_id, info['module'])
        # a subset is the same tensors
        with torch.no_grad():
            some = net.forward_intermediates(x, indices=[0, -1], intermediates_only=True, stitch_id=stitch_id)
        assert torch.equal(some[0], feats[0]) and torch.equal(some[1], feats[-1])


def test_deit3_anchor_and_stitched_routes():
    """DeiT-3 (layer scale) anchors: anchor routes are timm's; a stitched route's blocks are the anchors' blocks."""
    net = timm_stitch.stitch([dict(model_name='deit3_small_patch16_224', img_size=32, patch_size=8, embed_dim=d,
                                   depth=3, num_heads=2, num_classes=10) for d in (16, 32)], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for anchor_id, anchor in enumerate(net.anchors):
            ours, ref = (net.forward_intermediates(x, stitch_id=anchor_id, intermediates_only=True),
                         anchor.forward_intermediates(x, intermediates_only=True))
            assert all(torch.equal(a, b) for a, b in zip(ours, ref))
        stitch_id = _stitched_ids(net)[0]
        feats = net.forward_intermediates(x, stitch_id=stitch_id, intermediates_only=True, output_fmt='NLC')
        assert [f.shape[-1] for f in feats] == [i['num_chs'] for i in route_feature_info(net, stitch_id)]
        assert [int(i['module'].split('.')[1]) for i in route_feature_info(net, stitch_id)] == \
            _expected_anchors(net, stitch_id)


@pytest.mark.families('deit', 'eva')
def test_norm_uses_each_blocks_own_anchor_norm(family, family_net):
    net, x = family_net.model.eval(), family_net.images
    stitch_id = _stitched_ids(net)[-1]
    with torch.no_grad():
        raw = net.forward_intermediates(x, stitch_id=stitch_id, intermediates_only=True, output_fmt='NLC')
        normed = net.forward_intermediates(x, stitch_id=stitch_id, intermediates_only=True, norm=True,
                                           output_fmt='NLC')
        for r, n, anchor in zip(raw, normed, _expected_anchors(net, stitch_id)):
            assert torch.equal(n, net.anchors[anchor].norm(r))


def test_prune_keeps_every_route(family, family_net):
    """Blocks are shared between routes: pruning resolves the indices and drops the heads only."""
    net, x = family_net.model.eval(), family_net.images
    stitch_id = _stitched_ids(net)[-1]
    n = len(route_feature_info(net, stitch_id))
    with torch.no_grad():
        before = net.forward_intermediates(x, stitch_id=stitch_id, intermediates_only=True)
        assert net.prune_intermediate_layers([-1], stitch_id=stitch_id) == [n - 1]
        assert net.num_classes == 0
        after = net.forward_intermediates(x, stitch_id=stitch_id, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert net(x, stitch_id=0).shape[-1] == net.anchors[0].num_features


@pytest.mark.families('deit', 'swin')
def test_bad_indices_name_the_route_range(family, family_net):
    net, x = family_net.model, family_net.images
    stitch_id = _stitched_ids(net)[-1]
    n = len(route_feature_info(net, stitch_id))
    with pytest.raises(ValueError, match=rf'route {stitch_id}.*0\.\.{n - 1}'):
        net.forward_intermediates(x, indices=[n], stitch_id=stitch_id)
    with pytest.raises(ValueError, match=rf'route {stitch_id}.*1\.\.{n}'):
        net.forward_intermediates(x, indices=n + 1, stitch_id=stitch_id)
    formats = ['NCHW', 'NLC'] if family == 'deit' else ['NCHW']
    with pytest.raises(ValueError, match=re.escape(f"valid are {formats}")):
        net.forward_intermediates(x, output_fmt='NLC' if family == 'swin' else 'NHWC', stitch_id=stitch_id)
    net.set_stitch(stitch_id)
    backbone = StitchedFeatures(net, out_indices=(0, n - 1))
    m = len(route_feature_info(net, 0))
    if m < n:  # a shorter route cannot give index n - 1: switching to it raises and keeps the route
        with pytest.raises(ValueError, match=rf'route 0.*0\.\.{m - 1}'):
            backbone.set_stitch(0)
        assert backbone.stitch_id == stitch_id
    with pytest.raises(ValueError, match=rf'route {stitch_id}.*0\.\.{n - 1}'):
        StitchedFeatures(net, out_indices=(0, n))


def test_features_backbone_follows_the_route(family, family_net):
    net, x = family_net.model.eval(), family_net.images
    backbone = StitchedFeatures(net, out_indices=3)
    for stitch_id in [0, *_stitched_ids(net), len(net.anchors) - 1]:
        backbone.set_stitch(stitch_id)
        reductions = [i['reduction'] for i in route_feature_info(net, stitch_id)]
        if reductions != sorted(reductions):  # resampled to a finer grid at the stitch (vit_grids)
            with pytest.raises(ValueError, match=f'route {stitch_id} resamples .*non-decreasing reductions'):
                backbone.route_feature_info()
            continue
        channels = [i['num_chs'] for i in route_feature_info(net, stitch_id)[-3:]]
        assert backbone.feature_info.channels() == channels
        with torch.no_grad():
            feats = backbone(x)
            per_call = StitchedFeatures(net, out_indices=3)(x, stitch_id=stitch_id)
        assert [f.shape[1] for f in feats] == channels
        assert all(torch.equal(a, b) for a, b in zip(feats, per_call))


@pytest.mark.parametrize('arch', sorted(SMALL_ARCHS))
def test_create_model_features_only(arch):
    kwargs, size = SMALL_ARCHS[arch]
    backbone = timm.create_model(arch, features_only=True, out_indices=(-2, -1), **kwargs).eval()
    assert isinstance(backbone, StitchedFeatures)
    x = torch.randn(1, 3, size, size)
    net = backbone.model
    for stitch_id in (0, net.num_routes - 1):
        backbone.set_stitch(stitch_id)
        with torch.no_grad():
            feats = backbone(x)
        assert [f.shape[1] for f in feats] == backbone.feature_info.channels()
        assert [f.shape[-1] for f in feats] == [size // r for r in backbone.feature_info.reduction()]
    with pytest.raises(RouteIdError, match=re.escape('stitch_id')):
        backbone.set_stitch(net.num_routes)


@pytest.mark.integration
def test_features_backbone_compiles_per_route(family, family_net):
    net, x = family_net.model.eval(), family_net.images
    backbone = StitchedFeatures(net, out_indices=2)
    compiled = timm_stitch.compile(backbone, backend='eager')
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for stitch_id in (0, _stitched_ids(net)[-1]):
            backbone.set_stitch(stitch_id)
            assert all(torch.equal(a, b) for a, b in zip(compiled(x), backbone(x)))


def test_shipped_fmnist_model_as_a_pretrained_backbone():
    backbone = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, features_only=True, out_indices=[-1])
    backbone.eval()
    net = backbone.model
    x = torch.randn(2, net.in_chans, *net.fixed_input_size)
    widths = set()
    with torch.no_grad():
        for stitch_id in (0, net.num_routes // 2, net.num_routes - 1):
            backbone.set_stitch(stitch_id)
            (feat,) = backbone(x)
            assert feat.shape[1:] == (backbone.feature_info.channels()[0], 7, 7)
            assert torch.equal(feat, net.forward_intermediates(x, indices=1, intermediates_only=True)[0])
            widths.add(feat.shape[1])
    assert len(widths) == 3


def test_dense_example_names_the_feature_api_as_it_works():
    """docs/dense_example.md's feature-API calls run on the shipped model (the page said the API was still being
    added)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / 'docs' / 'dense_example.md').read_text()
    assert 'being added' not in text
    calls = [c for c in re.findall(r'`([^`]+\))`', text) if 'forward_intermediates' in c or 'features_only' in c]
    assert len(calls) == 2
    model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    x, k = torch.randn(2, 1, 28, 28), 5
    with torch.no_grad():
        final, (block,) = eval(calls[0], {'model': model, 'x': x, 'k': k})
        backbone = eval(calls[1], {'timm': timm}).eval()
        (features,) = backbone(x)
    assert block.shape == (2, 64, 7, 7) and final.shape[0] == 2
    assert features.shape == (2, 128, 7, 7)
