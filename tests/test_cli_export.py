"""``timm-stitch export``: one route of the shipped Fashion-MNIST network (loads offline with ``pretrained=True``) as
a folder timm loads, a ``torch.export`` program and an ONNX file, each giving the route's logits."""
import json

import pytest
import timm
import torch

from timm_stitch.cli import main

FMNIST = 'snnet_vit_fmnist_tsb'
STITCHED, ANCHOR = 5, 0


@pytest.fixture(scope='module')
def fmnist():
    model = timm.create_model(FMNIST, pretrained=True).eval()
    return model, torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_stitched_route_to_a_timm_folder(fmnist, tmp_path, capsys):
    model, x = fmnist
    assert main(['export', '--model', FMNIST, '--pretrained', '--route', str(STITCHED), '--out', str(tmp_path)]) == 0
    assert f'exported route {STITCHED}' in capsys.readouterr().out
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['stitch_id'] == STITCHED
    expected = model(x, stitch_id=STITCHED)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert loaded.stitch_id == STITCHED and torch.equal(loaded(x), expected)
    overlay = timm.create_model(FMNIST, pretrained=True, stitch_id=STITCHED,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'))).eval()
    assert torch.equal(overlay(x), expected)


def test_anchor_route_to_a_plain_timm_folder(fmnist, tmp_path):
    model, x = fmnist
    assert main(['export', FMNIST, '--pretrained', '--route', str(ANCHOR), '--out', str(tmp_path)]) == 0
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == model.anchor_names[ANCHOR]  # an ordinary timm model, not the stitched one
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert torch.equal(loaded(x), model(x, stitch_id=ANCHOR))
    overlay = timm.create_model(config['architecture'], pretrained=True, **config['model_args'],
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'))).eval()
    assert torch.equal(overlay(x), model(x, stitch_id=ANCHOR))


def test_active_route_by_default_and_bad_route(fmnist, tmp_path, capsys):
    model, _ = fmnist
    assert main(['export', '-m', FMNIST, '--model-kwargs', f'stitch_id={STITCHED}', '--format', 'torch-export',
                 '--out', str(tmp_path)]) == 0
    assert f'exported route {STITCHED} (torch-export, input (1, 1, 28, 28))' in capsys.readouterr().out
    assert main(['export', '-m', FMNIST, '--route', '99', '--out', str(tmp_path / 'bad')]) == 2
    assert 'out of range' in capsys.readouterr().err and not (tmp_path / 'bad').exists()


def test_torch_export_program(fmnist, tmp_path):
    model, x = fmnist
    assert main(['export', '-m', FMNIST, '--pretrained', '--route', str(STITCHED), '--format', 'torch-export',
                 '--batch-size', '3', '--out', str(tmp_path)]) == 0
    program = torch.export.load(str(tmp_path / 'model.pt2'))
    assert torch.allclose(program.module()(x), model(x, stitch_id=STITCHED), atol=1e-5)


@pytest.mark.integration
def test_onnx_file(fmnist, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model, x = fmnist
    assert main(['export', '-m', FMNIST, '--pretrained', '--route', str(STITCHED), '--format', 'onnx',
                 '--batch-size', '3', '--out', str(tmp_path)]) == 0
    session = ort.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), model(x, stitch_id=STITCHED), atol=1e-4)
