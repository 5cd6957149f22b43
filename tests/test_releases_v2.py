"""The SN-Netv2 DeiT-3 releases load through ``timm.create_model(arch, pretrained=True)`` from the authors' Hub repos.

Synthetic files with exactly the official keys (``tests/official_layouts.py``) are served under the real repo ids
and file names by the loopback Hub (``tests/hub_server.py``), which the real ``huggingface_hub`` client reaches
through ``HF_ENDPOINT``. The fast tests use narrow anchors (width 16) of the real depths, so the route structure is
the releases'; one slow test loads a real-size S/B file.
"""
from __future__ import annotations

import argparse
import io
import re

import pytest
import timm
import torch
from official_layouts import official_snnetv2_state, snnetv2_to_timm_stitch
from reported_tables import REPORTED_DIR, read_rows

import timm_stitch.models._loading as release
from timm_stitch.convert import OFFICIAL_FORMATS
from timm_stitch.errors import ReleaseFormatError
from timm_stitch.routes import StitchRef

#: architecture -> anchor depths (small, large)
DEPTHS = {'snnet_deit3_sb': (12, 12), 'snnet_deit3_sl': (12, 24), 'snnet_deit3_bl': (12, 24)}
TINY = dict(embed_dim=16, num_heads=2, img_size=32, num_classes=10, stitch_lora_rank=4)
TINY_FILE = dict(dims=(16, 16), num_classes=10, img_size=32, lora_rank=4)


def _file_bytes(state: dict, wrapper: str) -> bytes:
    """The release file: a plain state dict, ``{'model': ...}`` (as the authors' demo re-saves it), or a training
    checkpoint with optimizer state and pickled ``args``."""
    ckpt = {'plain': lambda: state, 'model': lambda: {'model': state}, 'training': lambda: {
        'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 49,
        'args': argparse.Namespace(lora_r=64, anchors=['deit_small_patch16_LS'])}}[wrapper]()
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


def _serve(hub, arch: str, state: dict, wrapper: str = 'model') -> str:
    repo, filename = OFFICIAL_FORMATS[arch].hf_hub
    hub.put(repo, {filename: _file_bytes(state, wrapper)})
    return f'/{repo}/resolve/main/{filename}'


def _tiny_state(arch: str, **kwargs) -> dict:
    return official_snnetv2_state(depths=DEPTHS[arch], **{**TINY_FILE, **kwargs})


#: official ids -> (anchors, cuts, stitching layers (pair, layer)) of the S/L (12/24 blocks) and S/B (12/12) releases
OFFICIAL_ROUTES = {
    (12, 24): {
        2: ((0, 1), ((0, 2),), ((0, 0),)),
        14: ((1, 0), ((1, 1),), ((1, 0),)),
        25: ((1, 0, 1), ((1, 1), (1, 4)), ((1, 0), (0, 1))),
        80: ((0, 1, 0), ((0, 2), (3, 2)), ((0, 0), (1, 1))),
        134: ((0, 1, 0), ((9, 20), (21, 11)), ((0, 9), (1, 10))),
    },
    (12, 12): {
        2: ((0, 1), ((0, 1),), ((0, 0),)),
        14: ((1, 0), ((0, 1),), ((1, 0),)),
        25: ((1, 0, 1), ((0, 1), (1, 2)), ((1, 0), (0, 1))),
    },
}


@pytest.mark.parametrize('arch, wrapper', [('snnet_deit3_sb', 'plain'), ('snnet_deit3_sl', 'model'),
                                           ('snnet_deit3_bl', 'training')])
def test_release_loads_bit_exact_from_the_authors_hub_repo(hub, arch, wrapper):
    state = _tiny_state(arch)
    path = _serve(hub, arch, state, wrapper)
    model = timm.create_model(arch, pretrained=True, **TINY).eval()
    assert ('GET', path) in hub.requests
    ours, expected = model.state_dict(), snnetv2_to_timm_stitch(state)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    # the v2 route space: 2 anchors, 12 SL, 11 LS, 55 LSL and 55 SLS routes, on layers of the right pair
    routes = model.routes()
    assert len(routes) == 135 and [len(r.anchors) for r in routes] == [1] * 2 + [2] * 23 + [3] * 110
    assert {r.anchors for r in routes[2:14]} == {(0, 1)} and {r.anchors for r in routes[14:25]} == {(1, 0)}
    for k, (anchors, cuts, layers) in OFFICIAL_ROUTES[DEPTHS[arch]].items():
        assert (routes[k].anchors, routes[k].cuts) == (anchors, cuts), k
        assert routes[k].stitches == tuple(StitchRef(0, p, layer) for p, layer in layers), k
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {k: model(x, stitch_id=k) for k in (0, 1, 2, 14, 25, 80, 134)}
    assert all(v.shape == (2, 10) and torch.isfinite(v).all() for v in logits.values())
    assert len({tuple(v.flatten().tolist()) for v in logits.values()}) == len(logits)  # every route its own
    model.train()
    model(x, stitch_id=80).sum().backward()  # small->large->small: both pairs' LoRA factors get gradients
    for ref in routes[80].stitches:
        transform = model.stitch_layer(ref).transform
        assert transform.lora_A.grad is not None and transform.lora_B.grad.abs().sum() > 0, ref


def test_sl_release_carries_the_reported_card(hub):
    _serve(hub, 'snnet_deit3_sl', _tiny_state('snnet_deit3_sl'))
    model = timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)
    reported = {row['cfg_id']: row['acc1'] for row in read_rows(REPORTED_DIR / 'snnet_deit3_sl.jsonl')}
    routes = model.routes()
    assert model.card is not None and {r.id: r.top1 for r in routes if r.top1 is not None} == reported
    assert {r.extra['accuracy']['source'] for r in routes if r.top1 is not None} == {'reported'}
    assert not any(p.endswith('routes.json') for _, p in hub.requests)  # the authors' repos have no card


@pytest.mark.parametrize('arch', ['snnet_deit3_sb', 'snnet_deit3_bl'])
def test_releases_without_published_results_have_no_card(hub, arch):
    _serve(hub, arch, _tiny_state(arch))
    model = timm.create_model(arch, pretrained=True, **TINY)
    assert model.card is None and all(r.top1 is None for r in model.routes())
    assert not any(p.endswith('routes.json') for _, p in hub.requests)  # nothing asked of the Hub but the weights


def test_second_load_offline_reads_the_cached_conversion(hub, monkeypatch):
    state = _tiny_state('snnet_deit3_sl')
    _serve(hub, 'snnet_deit3_sl', state)
    first = timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)
    cached = list(hub.cache_dir.rglob('snnetv2_deit3_s_l.snnet_deit3_sl.*.safetensors'))
    assert len(cached) == 1
    hub.offline()

    def no_conversion(*args, **kwargs):
        raise AssertionError('converted again')

    monkeypatch.setattr(release, 'read_checkpoint', no_conversion)
    second = timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)
    assert second.card is not None
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key


def test_a_file_you_already_have_loads_without_the_hub(hub, tmp_path):
    state = _tiny_state('snnet_deit3_bl')
    (tmp_path / 'snnetv2_deit3_b_l.pth').write_bytes(_file_bytes(state, 'training'))
    model = timm.create_model('snnet_deit3_bl', pretrained=True, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'snnetv2_deit3_b_l.pth')))
    assert hub.requests == []
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in snnetv2_to_timm_stitch(state).items())


def test_offline_with_empty_cache_says_so(hub):
    hub.offline()
    with pytest.raises(OSError, match='cannot load the pretrained weights of snnet_deit3_sl: HF_HUB_OFFLINE=1 is '
                                      'set and they are not in the cache'):
        timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)


def test_missing_and_unexpected_keys_are_named(hub):
    state = _tiny_state('snnet_deit3_sl')
    del state['anchors.1.blocks.3.gamma_2']
    state['stitch_layers.1.11.transform.weight'] = torch.zeros(16, 16)  # large->small has 11 layers, not 12
    _serve(hub, 'snnet_deit3_sl', state)
    with pytest.raises(ReleaseFormatError, match=re.escape('1 unmatched: stitch_layers.1.11.transform.weight; '
                                                           '1 missing: anchors.1.blocks.3.ls2.gamma')) as error:
        timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)
    assert 'ziplab/SN-Netv2 1.0 snnetv2_deit3_s_l.pth' in str(error.value)
    assert not list(hub.cache_dir.rglob('*.safetensors'))  # no conversion cached


def test_truncated_download_names_the_file_and_the_hub_repo(hub):
    repo, filename = OFFICIAL_FORMATS['snnet_deit3_sl'].hf_hub
    data = _file_bytes(_tiny_state('snnet_deit3_sl'), 'model')
    hub.put(repo, {filename: data[:len(data) // 2]})
    with pytest.raises(ReleaseFormatError, match=r'cannot load .*/snnetv2_deit3_s_l\.pth as the pretrained weights of '
                                                 r'snnet_deit3_sl: .*also Hub ziplab/snnetv2_deit3_s_l_imagenet_1k '
                                                 r'snnetv2_deit3_s_l\.pth.*truncated or corrupt.*delete it'):
        timm.create_model('snnet_deit3_sl', pretrained=True, **TINY)


def test_another_lora_rank_is_named_as_mis_shaped(hub):
    _serve(hub, 'snnet_deit3_sb', _tiny_state('snnet_deit3_sb', lora_rank=8))
    with pytest.raises(ReleaseFormatError, match=r'mis-shaped: stitch_layers\.0\.0\.0\.transform\.lora_A \(8, 16\) '
                                                 r'\(expected \(4, 16\)\)'):
        timm.create_model('snnet_deit3_sb', pretrained=True, **TINY)


def test_pretrained_cfgs_name_the_authors_repos_and_the_deit3_weights():
    for arch, pair in (('snnet_deit3_sb', 's_b'), ('snnet_deit3_sl', 's_l'), ('snnet_deit3_bl', 'b_l')):
        cfg = timm.models.get_pretrained_cfg(arch)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.custom_load) == (
            f'ziplab/snnetv2_deit3_{pair}_imagenet_1k', f'snnetv2_deit3_{pair}.pth', 'hf')
        assert cfg.url == f'https://github.com/ziplab/SN-Netv2/releases/download/1.0/snnetv2_deit3_{pair}.pth'
        assert cfg.crop_pct == 1.0
        model = timm.create_model(arch, **TINY)
        assert all(name.endswith('.fb_in22k_ft_in1k') for name in model.anchor_names)


@pytest.mark.slow
def test_real_size_sb_release_loads_bit_exact(hub):
    """The S/B release at its real size (DeiT-3 S and B, rank-64 stitching layers), every tensor as served."""
    state = official_snnetv2_state(dims=(384, 768), depths=(12, 12))
    _serve(hub, 'snnet_deit3_sb', state)
    model = timm.create_model('snnet_deit3_sb', pretrained=True).eval()
    ours = model.state_dict()
    expected = snnetv2_to_timm_stitch(state)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224), stitch_id=80).shape == (1, 1000)
