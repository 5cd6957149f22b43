"""``export_stitch``: one route as a standalone module (parity, weights, torch.export, ONNX, saving)."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from tiny_models import tiny_images, tiny_snnet

from timm_stitch.errors import RouteIdError
from timm_stitch.export import StitchedRoute
from timm_stitch.hub import save_pretrained


def _family(family_net):
    return family_net.model.eval(), family_net.images


def _quiet(fn, *args):
    with warnings.catch_warnings():  # uncalibrated per-route BatchNorm statistics (BN families) warn once per route
        warnings.simplefilter('ignore')
        return fn(*args)


def _route_outputs(model, x, k):
    return _quiet(model, x, k)


@torch.no_grad()
def test_every_route_matches_and_holds_only_its_weights(family, family_net):
    model, x = _family(family_net)
    routes = model.routes()
    for k, route in enumerate(routes):
        exported = _quiet(model.export_stitch, k)
        assert not exported.training
        diff = (exported(x) - _route_outputs(model, x, k)).abs().max().item()
        assert diff < 1e-5, (family, k, diff)
        assert sum(p.numel() for p in exported.parameters()) == route.params, (family, k)
        if route.is_anchor:
            assert type(exported) is type(model.anchors[route.anchors[0]])
        else:
            assert isinstance(exported, StitchedRoute) and len(exported.anchors) == len(route.anchors)
    assert model.training is False


def test_exported_weights_are_copies():
    model = tiny_snnet()
    exported = model.export_stitch(5)
    with torch.no_grad():
        next(exported.parameters()).add_(1.0)
    x = tiny_images(2)
    assert not torch.equal(exported(x), model(x, stitch_id=5))


def test_training_mode_is_restored():
    model = tiny_snnet().train()
    model.export_stitch(4)
    assert model.training


@pytest.mark.integration
@pytest.mark.filterwarnings('ignore:The tensor attributes')  # timm LeViT's attention-bias cache, set while tracing
def test_torch_export_and_onnx(family_net, tmp_path):
    onnx = pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    model, x = _family(family_net)
    k = next(r.id for r in model.routes() if not r.is_anchor and r.stage == max(r.stage or 0 for r in model.routes()))
    exported = _quiet(model.export_stitch, k)
    expected = _route_outputs(model, x, k)

    program = torch.export.export(exported, (x,))
    assert (program.module()(x) - expected).abs().max().item() < 1e-5

    path = tmp_path / 'route.onnx'
    torch.onnx.export(exported, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    ort = pytest.importorskip('onnxruntime')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(torch.from_numpy(out) - expected).max().item() < 1e-4


def test_anchor_route_saves_as_an_ordinary_timm_model(tmp_path):
    model = tiny_snnet()
    anchor = model.export_stitch(1)
    folder = save_pretrained(anchor, tmp_path / 'anchor')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = tiny_images(2)
    assert torch.equal(loaded(x), model(x, stitch_id=1))


def test_stitched_route_cannot_be_saved_as_a_timm_model(tmp_path):
    with pytest.raises(TypeError, match='cannot save a StitchedRoute'):
        save_pretrained(tiny_snnet().export_stitch(5), tmp_path / 'route')
    assert list(tmp_path.iterdir()) == []


def test_bad_route_id():
    with pytest.raises(RouteIdError, match='out of range'):
        tiny_snnet().export_stitch(99)
