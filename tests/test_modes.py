"""Work done in eval mode (export, LS init, MACs, BN recalibration, profiling, the builder's probe) gives every
submodule its own train/eval flag back: a frozen part kept in eval inside a training model stays in eval."""
from __future__ import annotations

import pytest
import torch
from tiny_models import resnet_family, tiny_images, tiny_snnet

import timm_stitch
from timm_stitch._modes import eval_mode
from timm_stitch.builder import stitchable_stages

CALLS = {
    'export_stitch': lambda m, x: m.export_stitch(4),
    'init_stitches': lambda m, x: m.init_stitches(x, progress=False),
    'count_route_macs': lambda m, x: timm_stitch.count_route_macs(m),
    'recalibrate_bn': lambda m, x: m.recalibrate_bn(x, stitch_id=5, progress=False),
    'profile': lambda m, x: timm_stitch.profile(m, routes=[0], warmup=0, repeats=1, progress=False),
    'stitchable_stages': lambda m, x: stitchable_stages(list(m.anchors), m.anchor_names),
}


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules() if not name.startswith('route_bn.')}


@pytest.mark.parametrize('call', CALLS)
def test_mixed_modes_are_restored(call):
    model, images = (resnet_family()[:2]) if call == 'recalibrate_bn' else (tiny_snnet(), tiny_images(4))
    model.train()
    model.anchors[0].eval()  # a frozen anchor inside a training model
    before = _modes(model)
    CALLS[call](model, images)
    assert _modes(model) == before


def test_eval_mode_restores_on_error():
    model = tiny_snnet().train()
    model.anchors[1].eval()
    before = _modes(model)
    with pytest.raises(RuntimeError, match='boom'), eval_mode(model):
        assert not any(_modes(model).values())
        raise RuntimeError('boom')
    assert _modes(model) == before
