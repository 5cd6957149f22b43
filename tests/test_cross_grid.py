"""Stitches across token grids and layouts: a resampling stitching layer (ViT patch 8 -> patch 4, a ResNet stage
into a ViT), prefix tokens by role, least-squares init, MACs, export, mixed batches and refusals."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import low_rank_images, resnet_vit_family, tiny_grid_vits, tiny_resnet_vit, tiny_vit_args

import timm_stitch
from timm_stitch.cli import main
from timm_stitch.errors import IncompatibleAnchorsError
from timm_stitch.grids import Grid, prefix_sources
from timm_stitch.macs import count_anchor_macs, count_macs
from timm_stitch.stitching import StitchingLayer

FAMILIES = ('vit_grids', 'resnet_vit')  # tests/conftest.py's tiny families with resampling stitches


def test_prefix_tokens_carried_by_role():
    # front: class + 2 registers; end: class, distillation, 3 registers
    assert prefix_sources(('cls', 'reg', 'reg'), ('cls', 'dist', 'reg', 'reg', 'reg')) == (0, -1, 1, 2, -1)
    assert prefix_sources(('cls', 'dist'), ('cls',)) == (0,)  # the front's distillation token is dropped
    assert prefix_sources((), ('cls',)) == (-1,)
    torch.manual_seed(0)
    layer = StitchingLayer(8, 12, 'tokens', 'tokens', in_grid=Grid(2 + 9, (3, 3), ('cls', 'dist')),
                           out_grid=Grid(1 + 2 + 16, (4, 4), ('cls', 'reg', 'reg')))
    assert layer.regrids and layer.new_tokens.shape == (1, 2, 12)
    with torch.no_grad():
        layer.new_tokens.normal_()
    x = torch.randn(2, 11, 8)
    y = layer(x)
    assert y.shape == (2, 19, 12)
    mapped = layer.transform(x)
    assert torch.equal(y[:, 0], mapped[:, 0])  # the class token through the channel map
    assert torch.equal(y[:, 1:3], layer.new_tokens.expand(2, -1, -1))  # registers: made by the stitch
    grid = mapped[:, 2:].reshape(2, 3, 3, 12).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)
    assert torch.equal(y[:, 3:], expected)
    # the channel map and the resampling commute (bilinear weights sum to 1): LS fits on resampled inputs
    rows_x, rows_y, new = layer.ls_rows(x, y)
    assert rows_x.shape == (2 * 16 + 2, 8) and rows_y.shape == (2 * 16 + 2, 12) and new.shape == (2, 2, 12)
    torch.testing.assert_close(layer.transform(rows_x), rows_y, atol=1e-5, rtol=1e-5)


def test_same_grid_layers_stay_plain():
    """Anchors of one grid keep the plain position-wise layer (the official releases' layers)."""
    grid = Grid(17, (4, 4), ('cls',))
    layer = StitchingLayer(8, 12, in_grid=grid, out_grid=grid)
    assert not layer.regrids and not hasattr(layer, 'new_tokens')
    x = torch.randn(2, 17, 8)
    assert torch.equal(layer(x), layer.transform(x))


@pytest.mark.families(*FAMILIES)
def test_cross_grid_routes(family_net):
    model, images, num_routes = family_net
    model.eval()
    assert model.num_routes == num_routes
    layers = [m for m in model.stitch_layers.modules() if isinstance(m, StitchingLayer)]
    assert layers and all(layer.regrids for layer in layers)
    with torch.no_grad():
        for a, anchor in enumerate(model.anchors):  # anchor routes are timm's models, bit for bit
            assert torch.equal(model(images, stitch_id=a), anchor(images))
        logits = [model(images, stitch_id=k) for k in range(model.num_routes)]
        # mixed batches: one route per sample, shared prefixes included
        ids = torch.arange(len(images)) % model.num_routes + len(model.anchors) - 1
        mixed = model(images, stitch_id=ids)
    for i, k in enumerate(ids.tolist()):
        torch.testing.assert_close(mixed[i], logits[k][i], atol=1e-5, rtol=1e-5)
    for route in model.plan.routes[len(model.anchors):]:
        exported = timm_stitch.export_stitch(model, route.id)
        with torch.no_grad():
            torch.testing.assert_close(exported(images), logits[route.id], atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in exported.parameters()) == model.counted_routes()[route.id].params
        final, feats = model.forward_intermediates(images, stitch_id=route.id)
        assert torch.equal(final, model.forward_features(images, stitch_id=route.id)) and feats


def _stitch_error(model, images: torch.Tensor) -> float:
    """Mean relative error of every stitching layer at every position against the end anchor's activation."""
    errors = []
    with torch.no_grad():
        for g in model.plan.groups:
            front, end = model.adapters[g.front_anchor], model.adapters[g.end_anchor]
            for p in g.positions:
                x = end_x = front.embed(images)
                for unit in front.units[:front.unit_index(g.stage, p.front) + 1]:
                    x = unit(x)
                end_x = end.embed(images)
                for unit in end.units[:end.unit_index(g.resume_stage, p.end)]:
                    end_x = unit(end_x)
                pred = model.stitch_layers[str(g.stage)][g.pair][p.layer](x)
                errors.append(((pred - end_x).norm() / end_x.norm()).item())
    return sum(errors) / len(errors)


@pytest.mark.families(*FAMILIES)
def test_ls_init_lowers_the_stitch_error_on_held_out_images(family, family_net):
    model = family_net.model.eval()
    fit, held_out = low_rank_images(64, seed=1), low_rank_images(16, seed=2)
    before = _stitch_error(model, held_out)
    model.init_stitches(fit, batch_size=32, progress=False)
    after = _stitch_error(model, held_out)
    # a coarser front grid cannot give the end's finer detail: LS lowers the error less than on one grid
    assert after < 0.9 * before, (before, after)
    new = [m.new_tokens for m in model.stitch_layers.modules() if hasattr(m, 'new_tokens')]
    assert (family == 'resnet_vit') == bool(new) and all(t.abs().sum() > 0 for t in new)  # the class token


@pytest.mark.families(*FAMILIES)
def test_macs_count_the_resampling(family, family_net):
    model = family_net.model.eval()
    _, stitches = count_anchor_macs(model)
    routes = model.counted_routes()
    resampled = [model.stitch_layer(r).in_grid.hw != model.stitch_layer(r).out_grid.hw for r, _ in stitches]
    assert any(resampled) == (family == 'vit_grids')  # ResNet stage 1 and the ViT share a 4x4 grid
    for (ref, _), macs in stitches.items():
        layer = model.stitch_layer(ref)
        x = torch.randn(1, layer.in_dim, *layer.in_grid.hw) if layer.layout == 'nchw' else \
            torch.randn(1, layer.in_grid.positions, layer.in_dim)
        channel_map, _ = count_macs(layer.transform, x)
        resampling = 4 * layer.out_dim * layer.out_grid.hw[0] * layer.out_grid.hw[1]  # bilinear: 4 per output
        assert macs == channel_map + (resampling if layer.in_grid.hw != layer.out_grid.hw else 0)
    assert all(r.macs > 0 and r.params > 0 for r in routes)


def test_resnet_stage_feeds_the_vit_by_grid():
    model = resnet_vit_family().model
    (group,) = model.plan.groups
    assert (group.stage, group.end_stage) == (1, 0)  # ResNet stage 1 (4x4 at 32x32) -> the ViT's 16 + 1 tokens
    assert set(model.state_dict()) >= {'stitch_layers.1.0.0.transform.weight', 'stitch_layers.1.0.0.new_tokens'}
    route = model.plan.routes[2]
    assert route.stitches[0].resume_stage == 0 and route.cuts == ((0, 1),)
    # a chosen front stage takes the end stage nearest in grid; the resampling covers the difference
    model = timm_stitch.stitch(tiny_resnet_vit(), num_classes=10, stages=(0,))
    assert model.plan.groups[0].resume_stage == 0
    layer = model.stitch_layers['0'][0][0]
    assert (layer.in_grid.hw, layer.out_grid.hw) == ((8, 8), (4, 4))
    assert model(torch.randn(2, 3, 32, 32), stitch_id=2).shape == (2, 10)


@pytest.mark.parametrize('anchors', [tiny_grid_vits(), tiny_resnet_vit()])
def test_saved_cross_grid_model_reloads(tmp_path, anchors):
    model = timm.create_model('snnet', anchors=anchors, num_classes=10).eval()
    model.init_stitches(low_rank_images(32), progress=False)
    timm_stitch.save_pretrained(model, tmp_path / 'saved')
    loaded = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True).eval()
    x = low_rank_images(2, seed=3)
    with torch.no_grad():
        for stitch_id in range(model.num_routes):
            assert torch.equal(loaded(x, stitch_id=stitch_id), model(x, stitch_id=stitch_id))


@pytest.mark.slow
def test_cli_exports_a_resampling_route(tmp_path, capsys):
    """``timm-stitch export`` of a saved ResNet -> ViT network: a timm folder and a torch.export program."""
    model = timm.create_model('snnet', anchors=tiny_resnet_vit(), num_classes=10).eval()
    timm_stitch.save_pretrained(model, tmp_path / 'saved')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, stitch_id=3)
    source = f'local-dir:{tmp_path / "saved"}'
    assert main(['export', '-m', source, '--pretrained', '--route', '3', '--out', str(tmp_path / 'folder')]) == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert main(['export', '-m', source, '--pretrained', '--route', '3', '--format', 'torch-export',
                 '--batch-size', '2', '--out', str(tmp_path / 'program')]) == 0
    program = torch.export.load(str(tmp_path / 'program' / 'model.pt2'))
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_onnx_export_of_a_resampling_route(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model = timm.create_model('snnet', anchors=tiny_grid_vits(), num_classes=10).eval()
    timm_stitch.save_pretrained(model, tmp_path / 'saved')
    assert main(['export', '-m', f'local-dir:{tmp_path / "saved"}', '--pretrained', '--route', '5', '--format', 'onnx',
                 '--batch-size', '2', '--out', str(tmp_path / 'onnx')]) == 0
    session = ort.InferenceSession(str(tmp_path / 'onnx' / 'model.onnx'), providers=['CPUExecutionProvider'])
    x = low_rank_images(2)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x, stitch_id=5), atol=1e-4, rtol=1e-4)


def test_a_cnn_goes_before_a_vit_and_tokens_never_feed_maps():
    """stitch() puts the CNN first even when it is the larger (ResNet-50 has more parameters than ViT-S/16); in the
    order given, a ViT's tokens into a CNN's maps are refused naming both and the layouts."""
    vit, resnet = tiny_vit_args(16, 2), dict(model_name='resnet18', channels=(16, 32, 64, 128), num_classes=10)
    assert timm_stitch.stitch([vit, resnet], num_classes=10).anchor_names == ['resnet18', 'vit_tiny_patch16_224']
    with pytest.raises(IncompatibleAnchorsError, match=(
            r'cannot stitch vit_tiny_patch16_224 \(stages 0: tokens 4x4 grid \+ 1 prefix \(cls\)\) into resnet18 '
            r'\(stages 0: nchw 8x8 grid; .*no stage pair has layouts a stitch joins')):
        timm_stitch.StitchedNet([vit, resnet], num_classes=10)


@pytest.mark.parametrize('anchors, message', [
    # anchors of different stage structures stitch two at a time
    ([*tiny_resnet_vit(), {**tiny_vit_args(128, 2)}],
     r'different numbers of stages: resnet18: 4, vit_tiny_patch16_224: 1, vit_tiny_patch16_224: 1; .*two at a time'),
    # a dynamic-size ViT's grid changes with the input: it cannot be resampled
    ([tiny_grid_vits()[0], {**tiny_grid_vits()[1], 'dynamic_img_size': True}],
     r'cannot stitch vit_tiny_patch16_224 into vit_tiny_patch16_224 in stage 0: .* gives 17 tokens, .* 65 tokens'),
])
def test_refusals_name_the_anchors_and_the_reason(anchors, message):
    with pytest.raises(IncompatibleAnchorsError, match=message):
        timm_stitch.stitch(anchors, num_classes=10)


def test_stage_out_of_range_for_the_front_anchor():
    with pytest.raises(ValueError, match=r'stage 4 is out of range: resnet18 has stages 0\.\.3'):
        timm_stitch.stitch(tiny_resnet_vit(), num_classes=10, stages=(4,))


@pytest.mark.slow
@pytest.mark.parametrize('names', [('vit_base_patch16_clip_224', 'vit_large_patch14_clip_224'),
                                   ('resnet50', 'vit_small_patch16_224')])
def test_real_size_cross_grid_stitches(names):
    """Real-size anchors (random weights): LS init on a few low-rank images, every stitched route's kind runs,
    exports with the same logits and counts its MACs (the resampling included)."""
    torch.manual_seed(0)
    model = timm_stitch.stitch(list(names), pretrained_anchors=False, num_classes=10).eval()
    assert model.anchor_names == list(names)  # ResNet-50 first: a CNN feeds a ViT (though ViT-S is smaller)
    images = F.interpolate(low_rank_images(8, patch=8), size=(224, 224), mode='nearest')
    model.init_stitches(images, batch_size=4, progress=False)
    routes = model.counted_routes()
    stitched = [r for r in routes if not r.is_anchor]
    assert stitched and all(r.macs > 0 for r in routes)
    layer = model.stitch_layer(stitched[0].stitches[0])
    assert layer.regrids
    x = images[:2]
    for route in (stitched[0], stitched[-1]):
        with torch.no_grad():
            logits = model(x, stitch_id=route.id)
            exported = timm_stitch.export_stitch(model, route.id)
            torch.testing.assert_close(exported(x), logits, atol=1e-4, rtol=1e-4)
        assert logits.shape == (2, 10)
