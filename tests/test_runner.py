"""The one route runner: every way of running a stitched route goes through it, and its hooks keep the results."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_images, tiny_snnet

import timm_stitch.runner
from timm_stitch import Cascade


@pytest.fixture(scope='module')
def model():
    return tiny_snnet()


def _stitched_from(model, anchor):
    return [r.id for r in model.plan.routes if not r.is_anchor and r.anchors[0] == anchor]


def _outputs(model, exported, x, k1, k2):
    """What each caller of the runner gives: plain forward, mixed batch (shared prefix), cascade, intermediates,
    an exported route."""
    with torch.no_grad():
        return {
            'forward': model(x, stitch_id=k1),
            'mixed': model(x, stitch_id=[k1, k2, k1, k2]),
            'cascade': Cascade(model, [k1, k2], threshold=1.0)(x).logits,  # every sample escalates: a resumed prefix
            'intermediates': torch.cat([t.flatten(1) for t in model.forward_intermediates(
                x, stitch_id=k2, intermediates_only=True)], 1),
            'export': exported(x),
        }


def test_a_fault_in_the_runner_reaches_every_caller(model, monkeypatch):
    k1, k2 = _stitched_from(model, 0)[:2]
    x = tiny_images()
    exported = model.export_stitch(k1)
    before = _outputs(model, exported, x, k1, k2)
    step = timm_stitch.runner.run_unit
    monkeypatch.setattr(timm_stitch.runner, 'run_unit', lambda unit, h, checkpointing: step(unit, h, checkpointing)
                        + 1.0)
    after = _outputs(model, exported, x, k1, k2)
    changed = {name: not torch.allclose(before[name], after[name]) for name in before}
    assert all(changed.values()), changed
    assert not torch.allclose(model.export_stitch(k1)(x), before['export'])


def test_stop_early_gives_the_same_intermediates(model):
    x = tiny_images()
    for k in _stitched_from(model, 0):
        n = len(model.forward_intermediates(x, stitch_id=k, intermediates_only=True))
        for indices in ([0], [n // 2], 1, None):
            full = model.forward_intermediates(x, indices=indices, stitch_id=k, intermediates_only=True)
            early = model.forward_intermediates(x, indices=indices, stitch_id=k, intermediates_only=True,
                                                stop_early=True)
            assert all(torch.equal(a, b) for a, b in zip(full, early))
        feats, _ = model.forward_intermediates(x, indices=None, stitch_id=k, stop_early=True)
        assert torch.allclose(feats, model.forward_features(x, stitch_id=k))


def test_stop_early_runs_fewer_units(model, monkeypatch):
    k = _stitched_from(model, 0)[-1]
    x = tiny_images()
    calls = []
    step = timm_stitch.runner.run_unit
    monkeypatch.setattr(timm_stitch.runner, 'run_unit', lambda unit, h, c: calls.append(unit) or step(unit, h, c))
    model.forward_intermediates(x, indices=[0], stitch_id=k, intermediates_only=True, stop_early=True)
    assert len(calls) == 1
    calls.clear()
    model.forward_intermediates(x, indices=[0], stitch_id=k, intermediates_only=True)
    assert len(calls) == model.route_run(k).num_units


def test_intermediates_honour_gradient_checkpointing(monkeypatch):
    model = tiny_snnet().train()
    k = _stitched_from(model, 0)[0]
    x = tiny_images()
    checkpointed = []
    real = timm_stitch.runner.checkpoint
    monkeypatch.setattr(timm_stitch.runner, 'checkpoint', lambda f, *a: checkpointed.append(f) or real(f, *a))

    def grads():
        model.zero_grad()
        out = model.forward_intermediates(x, stitch_id=k, intermediates_only=True)
        sum(t.square().sum() for t in out).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    assert not checkpointed
    model.set_grad_checkpointing(True)
    with_checkpoints = grads()
    assert len(checkpointed) == model.route_run(k).num_units
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, with_checkpoints))
