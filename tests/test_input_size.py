"""Pretrained stitched networks at another input size or channel count: each anchor route equals its timm anchor
loaded from the same weights the same way (timm's checkpoint filter, timm's first-conv adaptation), bit-exact."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import pytest
import safetensors.torch
import timm
import tiny_models
import torch
from timm.models import adapt_input_conv, get_model_input_config
from tiny_models import SMALL_ARCHS, tiny_images, tiny_snnet

import timm_stitch
from timm_stitch.input_size import filter_anchor_checkpoints, set_anchors_input_size
from timm_stitch.macs import count_route_macs
from timm_stitch.models.snnet_vit_fmnist import SHIPPED_DIR

SWIN_KWARGS = SMALL_ARCHS['snnet_swin_tsb'][0]


def _save(state_dict: dict, path: Path) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def _assert_anchor_routes_equal_timm(arch: str, tmp_path: Path, build_kwargs: dict, load_kwargs: dict,
                                     size: Optional[int] = None) -> None:
    """Save a randomly initialised ``arch`` (built with ``build_kwargs``), load it with ``load_kwargs`` on top, and
    compare each anchor route on ``size`` images (default the img_size) with that anchor saved alone and loaded by
    timm with the same kwargs."""
    torch.manual_seed(0)
    saved = timm.create_model(arch, **build_kwargs)
    file = _save(saved.state_dict(), tmp_path / 'snnet.safetensors')
    kwargs = dict(build_kwargs, **load_kwargs)
    classes = kwargs.get('num_classes', 1000)  # the checkpoint's: timm keeps its heads
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=classes),
                              **kwargs).eval()
    size = size or kwargs.get('img_size', 224)
    x = torch.randn(2, kwargs.get('in_chans', 3), size, size)
    for i, name in enumerate(model.anchor_names):
        prefix = f'anchors.{i}.'
        part = {k[len(prefix):]: v for k, v in saved.state_dict().items() if k.startswith(prefix)}
        anchor_file = _save(part, tmp_path / f'anchor{i}.safetensors')
        overlay = dict(file=anchor_file, num_classes=classes)
        anchor = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        with torch.no_grad():
            assert torch.equal(model(x, stitch_id=i), anchor(x)), f'anchor route {i} ({name}) with {load_kwargs}'


@pytest.mark.parametrize('load_kwargs', [dict(img_size=384), dict(in_chans=1)])
def test_deit_ts_loads_224_checkpoint_at_384_and_one_channel(tmp_path: Path, load_kwargs: dict) -> None:
    _assert_anchor_routes_equal_timm('snnet_deit_ts', tmp_path, {}, load_kwargs)


def test_dynamic_img_size_runs_other_sizes_like_timm(tmp_path: Path) -> None:
    _assert_anchor_routes_equal_timm('snnet_deit_tsb', tmp_path, SMALL_ARCHS['snnet_deit_tsb'][0],
                                     dict(img_size=48, dynamic_img_size=True), size=64)


def test_dynamic_img_size_macs_follow_the_img_size() -> None:
    kwargs = dict(SMALL_ARCHS['snnet_deit_tsb'][0], dynamic_img_size=True)
    small, large = (timm.create_model('snnet_deit_tsb', **dict(kwargs, img_size=s)) for s in (32, 64))
    assert large.fixed_input_size is None
    assert [r.macs for r in large.routes()] == count_route_macs(large, (3, 64, 64))
    assert all(a > b for a, b in zip((r.macs for r in large.routes()), (r.macs for r in small.routes())))


def test_swin_relative_position_tables_resampled_for_another_window(tmp_path: Path) -> None:
    _assert_anchor_routes_equal_timm('snnet_swin_tsb', tmp_path, SWIN_KWARGS, dict(img_size=128, window_size=4))


def test_shipped_fmnist_model_at_another_size_and_channel_count() -> None:
    at_32 = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, img_size=32).eval()
    rgb = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, in_chans=3).eval()
    native = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    assert at_32.fixed_input_size == (32, 32) and rgb.in_chans == 3
    assert at_32.routes()[0].macs > native.routes()[0].macs  # MACs follow the size in use
    stored = safetensors.torch.load_file(str(SHIPPED_DIR / 'model.safetensors'))
    for i, adapted in enumerate(rgb.anchors):  # every anchor's stem, as timm adapts a first conv
        expected = adapt_input_conv(3, stored[f'anchors.{i}.patch_embed.proj.weight'], base_chans=1)
        assert torch.equal(adapted.patch_embed.proj.weight, expected.float())
    gray = torch.rand(2, 1, 28, 28)
    with torch.no_grad():  # the adapted stem splits each weight over the channels: a grey image gives the same logits
        assert torch.allclose(rgb(gray.expand(-1, 3, -1, -1), stitch_id=0), native(gray, stitch_id=0), atol=1e-3)
        assert at_32(torch.rand(2, 1, 32, 32)).shape == (2, native.num_classes)


def test_checkpoint_of_another_architecture_still_refused(tmp_path: Path) -> None:
    file = _save(tiny_snnet().state_dict(), tmp_path / 'other.safetensors')
    with pytest.raises(ValueError, match='the weights of another architecture'):
        timm.create_model('snnet_deit_ts', pretrained=True, pretrained_cfg_overlay=dict(file=file))


def test_set_input_size_resamples_each_anchor_and_macs_follow() -> None:
    model = tiny_snnet().eval()
    before = [r.macs for r in model.routes()]
    references = [copy.deepcopy(a) for a in model.anchors]
    model.set_input_size(img_size=48)
    assert model.fixed_input_size == (48, 48)
    assert get_model_input_config(model)['input_size'] == (3, 48, 48)  # what timm's data config resolves
    assert all(a > b for a, b in zip((r.macs for r in model.routes()), before))
    x = tiny_images(2)
    x = torch.nn.functional.interpolate(x, size=(48, 48))
    with torch.no_grad():
        for i, reference in enumerate(references):
            reference.set_input_size(img_size=48)
            assert torch.equal(model(x, stitch_id=i), reference(x))
    with pytest.raises(ValueError, match='48'):
        model(tiny_images(2))


def test_set_input_size_names_anchor_without_it() -> None:
    model = timm_stitch.stitch(['resnet18', 'resnet34'], pretrained_anchors=False)
    with pytest.raises(NotImplementedError, match='anchor 0'):
        model.set_input_size(img_size=64)
    swin, resnet = tiny_models.tiny_swin(16, (2, 2, 6, 2)), tiny_models.tiny_resnet('resnet18')
    with pytest.raises(NotImplementedError, match='anchor 1'):  # refused before the Swin anchor changes
        set_anchors_input_size(torch.nn.ModuleList([swin, resnet]), img_size=64)
    assert swin.patch_embed.img_size == (32, 32)


@pytest.mark.parametrize('arch', sorted(SMALL_ARCHS))
def test_every_anchor_first_conv_adapted_to_in_chans(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    saved = timm.create_model(arch, **SMALL_ARCHS[arch][0])
    file = _save(saved.state_dict(), tmp_path / 'snnet.safetensors')
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file, num_classes=10),
                              in_chans=1, **SMALL_ARCHS[arch][0])
    assert len(model._traits['first_conv']) == len(model.anchors)
    for name in model._traits['first_conv']:
        key = f'{name}.weight'
        assert torch.equal(model.state_dict()[key], adapt_input_conv(1, saved.state_dict()[key])), key


def test_anchor_filters_leave_a_same_size_checkpoint_unchanged(family_net) -> None:
    state = family_net.model.state_dict()
    filtered = filter_anchor_checkpoints(state, family_net.model.anchors)
    assert filtered.keys() == state.keys() and all(torch.equal(filtered[k], v) for k, v in state.items())
