"""The registered architectures over timm-pretrained anchors (``timm_stitch/models/snnet_zoo.py``).

Every architecture is built full size on the meta device (its route count as its table row and docstring state, its
anchors named by their timm tags; the three slowest to probe in the slow suite) and its default cfg is checked
against the anchors' own. For a token family (DINOv2), a CNN (FastViT) and a hierarchical transformer (Swin V2), the
last two through the generic adapter, tiny stand-in anchor weights are served under the anchors' real ``timm/``
repo ids by the loopback Hub (``tests/hub_server.py``): ``pretrained_anchors=True`` downloads each through timm's own
pretrained path and the real ``huggingface_hub`` client, and every anchor route equals the timm model loaded from
the same weights, bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from timm_stitch.hub import WEIGHTS_NAME, save_pretrained
from timm_stitch.models._factory import ANCHOR_DATA_KEYS
from timm_stitch.models.snnet_zoo import ZOO_ARCHS

#: architectures whose full-size meta build takes 10-20 s on a 2-core CPU (the generic adapter probes every op):
#: their full-size structure is checked in the slow suite (the quick suite keeps DINOv2's); FastViT and Swin V2 also
#: run tiny through the Hub below (FastViT in the slow suite)
SLOW_TO_PROBE = ('snnet_mobilenetv4_mhl', 'snnet_fastvit_sa12_sa36', 'snnet_swinv2_tsb', 'snnet_regnety_004_032',
                 'snnet_efficientnet_b0_b2', 'snnet_eva02_tsb', 'snnet_convnextv2_ntb')

#: timm kwargs of the tiny stand-in anchors (passed through to every anchor)
TINY = {
    'snnet_dinov2_sbl': dict(embed_dim=32, num_heads=2, depth=2, img_size=28),
    'snnet_fastvit_sa12_sa36': dict(layers=(1, 2, 2, 1), embed_dims=(8, 16, 32, 64)),
    'snnet_swinv2_tsb': dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1), img_size=64),
}


def test_every_architecture_is_registered():
    assert set(timm.list_models('snnet*')) >= set(ZOO_ARCHS)
    assert all(timm.models.model_entrypoint(name).__doc__ == arch.doc for name, arch in ZOO_ARCHS.items())


@pytest.mark.parametrize('name', list(ZOO_ARCHS))
def test_default_cfg_is_the_anchors(name):
    """The smallest anchor's data settings, every anchor's classifier, and the anchors named; the anchors agree on
    what their inputs must be (mean/std, interpolation; the input size where it is fixed)."""
    anchors = ZOO_ARCHS[name].anchors
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    own = [timm.models.get_pretrained_cfg(tag).to_dict() for tag in anchors]
    assert all(own), 'every anchor is a pretrained timm tag'
    assert {k: cfg.get(k) for k in ANCHOR_DATA_KEYS} == {k: own[0].get(k) for k in ANCHOR_DATA_KEYS}
    for key in ('mean', 'std', 'interpolation', 'num_classes', 'fixed_input_size'):
        assert len({c[key] for c in own}) == 1, key
    if cfg['fixed_input_size']:
        assert len({c['input_size'] for c in own}) == 1
    assert cfg['classifier'] == tuple(f'anchors.{i}.{c["classifier"]}' for i, c in enumerate(own))
    assert all(tag in cfg['description'] for tag in anchors)
    assert cfg['architecture'] == name and not cfg.get('url') and not cfg.get('hf_hub_id')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_PROBE else n
                                  for n in ZOO_ARCHS])
def test_full_size_structure(name):
    """Full size on the meta device: the anchors of the table, as many routes as it (and the docstring) says."""
    model = timm.create_model(name, device='meta')
    assert model.anchor_names == list(ZOO_ARCHS[name].anchors)
    assert model.num_routes == ZOO_ARCHS[name].routes
    size = timm.models.get_pretrained_cfg(name).input_size
    assert [a.pretrained_cfg['input_size'] for a in model.anchors] == [size] * len(model.anchors)
    assert model.num_classes == timm.models.get_pretrained_cfg(name).num_classes


def _serve_stand_ins(hub, tmp_path, name: str) -> list[dict[str, torch.Tensor]]:
    """Tiny random anchors of ``name``, their weights served under the anchors' ``timm/`` repo ids."""
    states = []
    for i, tag in enumerate(ZOO_ARCHS[name].anchors):
        torch.manual_seed(i)
        state = timm.create_model(tag.split('.')[0], **TINY[name]).state_dict()
        safetensors.torch.save_file(state, str(tmp_path / WEIGHTS_NAME))
        hub.put(f'timm/{tag}', {WEIGHTS_NAME: (tmp_path / WEIGHTS_NAME).read_bytes()})
        states.append(state)
    return states


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'snnet_fastvit_sa12_sa36' else n
                                  for n in TINY])
def test_pretrained_anchors_through_the_loopback_hub(hub, tmp_path, name):
    """``pretrained_anchors=True`` fetches every anchor's own weights from its timm Hub repo; each anchor route then
    equals the timm model loaded from those weights, and a stitched route runs."""
    states = _serve_stand_ins(hub, tmp_path, name)
    model = timm.create_model(name, pretrained_anchors=True, **TINY[name]).eval()
    for tag in ZOO_ARCHS[name].anchors:
        assert ('GET', f'/timm/{tag}/resolve/main/{WEIGHTS_NAME}') in hub.requests
    size = (TINY[name].get('img_size', 64),) * 2  # CNNs take any size: a small one
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    anchor_routes = [r.id for r in model.plan.routes if r.is_anchor]
    assert len(anchor_routes) == len(states)
    with torch.no_grad():
        for i, (tag, state, route) in enumerate(zip(ZOO_ARCHS[name].anchors, states, anchor_routes)):
            assert all(torch.equal(v, model.anchors[i].state_dict()[k]) for k, v in state.items())
            reference = timm.create_model(tag, pretrained=True, **TINY[name]).eval()
            assert torch.equal(model(x, stitch_id=route), reference(x)), tag
        stitched = next(r.id for r in model.plan.routes if not r.is_anchor)
        assert torch.isfinite(model(x, stitch_id=stitched)).all()


def test_pretrained_anchors_offline_from_the_hub_cache(hub, tmp_path):
    """Once downloaded, ``HF_HUB_OFFLINE=1`` builds the same anchors from the Hub cache, asking nothing."""
    name = 'snnet_dinov2_sbl'
    _serve_stand_ins(hub, tmp_path, name)
    model = timm.create_model(name, pretrained_anchors=True, **TINY[name])
    hub.offline()
    asked = len(hub.requests)
    again = timm.create_model(name, pretrained_anchors=True, **TINY[name])
    assert len(hub.requests) == asked
    assert all(torch.equal(v, again.anchors.state_dict()[k]) for k, v in model.anchors.state_dict().items())


def test_random_anchors_download_nothing(hub, tmp_path):
    """``pretrained_anchors=False`` (the default) builds the random network without asking the Hub; there are no
    SN-Net weights to load with ``pretrained=True`` unless saved ones are named."""
    model = timm.create_model('snnet_dinov2_sbl', **TINY['snnet_dinov2_sbl']).eval()
    assert model.num_routes > len(ZOO_ARCHS['snnet_dinov2_sbl'].anchors)
    with pytest.raises(ValueError, match='snnet_dinov2_sbl has no SN-Net weights of its own: pass '
                                         'pretrained_anchors=True'):
        timm.create_model('snnet_dinov2_sbl', pretrained=True, **TINY['snnet_dinov2_sbl'])
    assert hub.requests == []
    folder = save_pretrained(model, tmp_path / 'saved')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(1, 3, 28, 28)
    assert loaded.pretrained_cfg['architecture'] == 'snnet_dinov2_sbl'
    assert torch.equal(loaded(x, stitch_id=4), model(x, stitch_id=4))
    file = dict(file=str(folder / WEIGHTS_NAME))
    loaded = timm.create_model('snnet_dinov2_sbl', pretrained=True, pretrained_cfg_overlay=file,
                               **TINY['snnet_dinov2_sbl']).eval()
    assert torch.equal(loaded(x, stitch_id=4), model(x, stitch_id=4))



def test_readme_lists_every_architecture():
    """The README's table names each architecture with its route count."""
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    for name, arch in ZOO_ARCHS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f'| `{name}` |')), None)
        assert row is not None, name
        assert row.endswith(f'| {arch.routes} |'), row
