"""The shipped Fashion-MNIST SN-Net (``snnet_vit_fmnist_tsb``): it loads from the package with no network, its card
holds what ``benchmarks/fmnist_pipeline.py`` measured, and a sample of routes reproduces that accuracy here."""
from __future__ import annotations

import math
import re
import socket

import pytest
import timm
import torch
from safetensors import safe_open
from timm.data import resolve_data_config

import timm_stitch.data.fashion_mnist as fashion_mnist
from timm_stitch import demo
from timm_stitch._io import file_sha256
from timm_stitch.data import GreyImageDataset, load_fashion_mnist_sample
from timm_stitch.evaluation import eval_loader, evaluate_routes
from timm_stitch.models.snnet_vit_fmnist import FMNIST_ANCHORS, SHIPPED_DIR

WEIGHTS = SHIPPED_DIR / 'model.safetensors'
SAMPLED_ROUTES = [0, 1, 2, 4, 10, 17, 20, 26, 34]  # the anchors, Ti->S and S->B routes at early/middle/late cuts


def _refuse_network(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')


@pytest.fixture(scope='module')
def shipped():
    """The shipped model as ``pretrained=True`` gives it, loaded with every socket connection refused."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('HF_HUB_OFFLINE', '1')
        patch.setattr(socket.socket, 'connect', _refuse_network)
        patch.setattr(socket, 'create_connection', _refuse_network)
        model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True)
    return model.eval()


def _provenance(model, what: str) -> dict:
    return next(p['values'] for p in model.card.provenance if p['what'].startswith(what))


def test_shipped_weights_are_small_fp16_and_loaded(shipped):
    assert shipped.pretrained_cfg['file'] == str(WEIGHTS)
    assert WEIGHTS.stat().st_size < 10 * 2 ** 20
    state = shipped.state_dict()
    with safe_open(WEIGHTS, 'pt') as f:
        assert set(f.keys()) == set(state)
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float16, key
            assert torch.equal(tensor.float(), state[key]), key


def test_shipped_card_has_measured_top1_and_macs_for_every_route(shipped):
    routes = shipped.routes()
    assert len(routes) == 35 and shipped.card.model == 'snnet_vit_fmnist_tsb'
    assert all(r.top1 is not None and 0 < r.top1 <= 100 and r.macs > 0 and r.params > 0 for r in routes)
    assert [r.macs for r in routes] == [r.macs for r in shipped.card.routes]  # the card's MACs are this model's
    records = {p['what']: p for p in shipped.card.provenance}
    assert records['macs, params']['checkpoint_sha256'] == file_sha256(WEIGHTS)  # measured on the shipped weights
    assert records['accuracy']['dataset'] == 'torch/fashion_mnist/test' and records['accuracy']['images'] == 10_000


def test_sampled_routes_reproduce_the_card(shipped):
    """Top-1 on the shipped 1,000-image test sample equals what the pipeline recorded for these weights (to 2
    images, for BLAS differences between machines) and agrees with the card's full-test-split top-1 to within
    three binomial standard errors."""
    images, labels = load_fashion_mnist_sample()
    loader = eval_loader(GreyImageDataset(images, labels), resolve_data_config(model=shipped), 250)
    results = evaluate_routes(shipped, loader, SAMPLED_ROUTES, torch.device('cpu'), progress=False)
    recorded = _provenance(shipped, 'top-1 on the shipped test sample')
    routes = shipped.routes()
    for stitch_id in SAMPLED_ROUTES:
        top1 = results[stitch_id]['top1']
        assert abs(top1 - recorded[str(stitch_id)]) <= 0.2, stitch_id
        p = routes[stitch_id].top1 / 100
        assert abs(top1 - routes[stitch_id].top1) <= 300 * math.sqrt(p * (1 - p) / len(labels)), stitch_id


def test_anchor_routes_keep_their_accuracy_and_stitched_routes_interpolate(shipped):
    """The issue's acceptance: anchor routes within 0.5 points of the anchors trained alone, and on the MACs/top-1
    front at least 2 stitched routes strictly inside the Ti-S interval and 3 inside the S-B one (MACs and top-1 both
    strictly between the segment's anchors'), measured on the 10,000 test images."""
    before = _provenance(shipped, 'anchor test top-1 before stitching')
    routes = shipped.routes()
    anchors = [routes[i] for i in range(len(FMNIST_ANCHORS))]
    for anchor, (name, _, _) in zip(anchors, FMNIST_ANCHORS):
        assert abs(anchor.top1 - before[name]) <= 0.5, name
    assert anchors[0].top1 < anchors[1].top1 < anchors[2].top1
    front = [r for r in shipped.pareto() if not r.is_anchor]
    for (low, high), needed in zip(zip(anchors, anchors[1:]), (2, 3)):
        inside = [r.id for r in front if low.macs < r.macs < high.macs and low.top1 < r.top1 < high.top1]
        assert len(inside) >= needed, (low.id, high.id, inside)


def test_demo_runs_offline_on_the_shipped_sample(monkeypatch, tmp_path, capsys, shipped):
    """The README's main job, with no Debian dataset installed: it falls back to the shipped sample, and the
    accuracy it prints for each budget's route is the one recorded for that sample."""
    monkeypatch.setattr(fashion_mnist, 'DEFAULT_SOURCES', (tmp_path,))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(socket.socket, 'connect', _refuse_network)
    demo.main(['--budgets', '12', '40', '--repeats', '1', '--examples', '4'])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if re.match(r'\s+\d+\*? ', line)]
    assert len(table) == 35 and 'MMACs' in out and 'first 1,000 test images shipped' in out
    recorded = _provenance(shipped, 'top-1 on the shipped test sample')
    chosen = re.findall(r'budget (\d+) MMACs -> route (\d+) .*\n    top-1 ([\d.]+)%', out)
    assert [b for b, _, _ in chosen] == ['12', '40']
    for budget, stitch_id, top1 in chosen:
        fitting = [r for r in shipped.routes() if r.macs <= int(budget) * 1e6]
        assert int(stitch_id) == max(fitting, key=lambda r: (r.top1, -r.macs)).id
        assert abs(float(top1) - recorded[stitch_id]) <= 0.2
