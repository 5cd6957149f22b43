"""Publishing and loading stitched models through the real huggingface_hub client and a local Hub (hub_server.py).

The registered ``snnet_deit_tsb`` is built with one block per anchor at 32 px, so that its weights (~43 MB) travel
through timm's own pretrained machinery quickly; ``FROM_HUB`` points ``timm.create_model`` at a repo of the local Hub
(the registered cfg names the official release URL, see test_releases.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

from timm_stitch._mismatch import WeightsMismatchError
from timm_stitch.cards import RouteCard
from timm_stitch.hub import CARD_NAME, CONFIG_NAME, README_NAME, WEIGHTS_NAME, push_to_hub, save_pretrained

SMALL = dict(depth=1, img_size=32)  # snnet_deit_tsb with 1-block anchors: 5 routes
REPO = 'someone/snnet_deit_tsb.in1k'
FROM_HUB = dict(pretrained_cfg_overlay=dict(hf_hub_id=REPO))
ANCHOR_REPOS = ('timm/deit_tiny_patch16_224.fb_in1k', 'timm/deit_small_patch16_224.fb_in1k',
                'timm/deit_base_patch16_224.fb_in1k')
TOP1 = {0: 70.5, 1: 79.4, 2: 81.9, 3: 75.25, 4: 80.125}



def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A trained-looking snnet_deit_tsb (official flag: no final norm on stitched routes) saved with a card."""
    torch.manual_seed(0)
    model = timm.create_model('snnet_deit_tsb', final_norm_on_stitched_routes=False, **SMALL).eval()
    card = RouteCard.from_model(model).with_accuracy({i: (t, None) for i, t in TOP1.items()},
                                                      dataset='imagenet-1k/validation', source='measured')
    model.load_card(card)
    folder = save_pretrained(model, tmp_path_factory.mktemp('pub') / 'snnet')
    return model, folder


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_saved_folder(published):
    model, folder = published
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, README_NAME])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith('.')]  # no temp folders left
    config = json.loads((folder / CONFIG_NAME).read_text())["model_args"]
    assert config['depth'] == 1 and config['final_norm_on_stitched_routes'] is False
    card = RouteCard.load(folder / CARD_NAME)
    assert [r.top1 for r in card.routes] == [TOP1[i] for i in range(5)]
    assert card.routes[3].macs == model.routes()[3].macs and card.routes[3].params == model.routes()[3].params
    readme = (folder / README_NAME).read_text()
    assert readme.startswith('---\n') and 'library_name: timm' in readme and '75.25' in readme


def test_pretrained_from_hub(hub, published):
    model, folder = published
    hub.put(REPO, _files(folder))
    loaded = timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB).eval()
    _assert_same_weights(model, loaded)
    assert loaded.final_norm_on_stitched_routes is False
    assert [r.top1 for r in loaded.routes()] == [TOP1[i] for i in range(5)]
    assert loaded.card.routes[4].accuracy['source'] == 'measured'
    x = _images()
    for k in range(model.num_routes):
        assert torch.equal(loaded(x, stitch_id=k), model(x, stitch_id=k))
    fetched = {p.rsplit('/', 1)[-1] for m, p in hub.requests if m == 'GET' and '/resolve/' in p}
    assert fetched == {WEIGHTS_NAME, CARD_NAME}

    # cached: offline loads the same weights and card without a single request
    hub.requests.clear()
    hub.offline()
    again = timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)
    _assert_same_weights(model, again)
    assert again.card is not None and hub.requests == []


def test_offline_without_cache(hub):
    hub.offline()
    with pytest.raises(OSError, match='HF_HUB_OFFLINE=1 is set.*pretrained_cfg_overlay'):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)


def test_unreachable_hub(hub, monkeypatch):
    monkeypatch.setattr('huggingface_hub.utils._http.time.sleep', lambda seconds: None)  # skip retry back-off
    monkeypatch.setattr('huggingface_hub.constants.ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr('huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE',
                        'http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}')
    with pytest.raises(OSError, match=r'Hub \(http://127.0.0.1:9\) is unreachable.*HF_HUB_OFFLINE=1'):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)


def test_push_then_load_hf_hub(hub, published):
    model, _ = published
    info = push_to_hub(model, 'someone/my-snnet')
    assert hub.repos['someone/my-snnet'].head == info.oid
    assert {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, README_NAME} <= set(hub.files('someone/my-snnet'))
    readme = ModelCard(hub.files('someone/my-snnet')[README_NAME].decode())  # upload_folder with the card data
    assert (readme.data.library_name, readme.data.license) == ('timm', 'apache-2.0')
    assert "timm.create_model('hf-hub:someone/my-snnet'" in readme.text

    loaded = timm.create_model('hf-hub:someone/my-snnet', pretrained=True).eval()
    _assert_same_weights(model, loaded)  # model_args (depth, img_size, flag) came from config.json
    assert loaded.final_norm_on_stitched_routes is False and loaded.num_routes == 5
    assert loaded.routes()[3].top1 == TOP1[3]
    x = _images()
    for k in range(model.num_routes):
        assert torch.equal(loaded(x, stitch_id=k), model(x, stitch_id=k))

    # the loaded model publishes again with its card; a second push is a second commit
    second = push_to_hub(loaded, 'someone/my-snnet', commit_message='again')
    assert second.oid != info.oid
    assert RouteCard.from_dict(json.loads(hub.files('someone/my-snnet')[CARD_NAME])).routes[3].top1 == TOP1[3]


def test_local_file(hub, published):
    model, folder = published
    loaded = timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL,
                               pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME)))
    _assert_same_weights(model, loaded)
    assert loaded.routes()[4].top1 == TOP1[4]  # the card next to the file
    assert hub.requests == []


def test_num_classes_resets_every_head(hub, published):
    model, folder = published
    hub.put(REPO, _files(folder))
    loaded = timm.create_model('snnet_deit_tsb', pretrained=True, num_classes=7, **SMALL, **FROM_HUB)
    heads = tuple(f'anchors.{i}.head.' for i in range(3))
    sd, ref = loaded.state_dict(), model.state_dict()
    for k, v in sd.items():
        if k.startswith(heads):
            assert v.shape[0] == 7
        else:
            assert torch.equal(v, ref[k]), k
    assert all(a.num_classes == 7 for a in loaded.anchors)


def test_corrupt_weights(hub, published):
    _, folder = published
    files = _files(folder)
    hub.put(REPO, {**files, WEIGHTS_NAME: files[WEIGHTS_NAME][:len(files[WEIGHTS_NAME]) // 2]})
    with pytest.raises(ValueError, match='corrupt or truncated'):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)


def test_checkpoint_of_another_architecture(hub, published, tmp_path):
    _, folder = published
    other = timm.create_model('snnet_deit_sb', final_norm_on_stitched_routes=False, **SMALL)
    safetensors.torch.save_file(other.state_dict(), str(tmp_path / WEIGHTS_NAME))
    hub.put(REPO, {**_files(folder), WEIGHTS_NAME: (tmp_path / WEIGHTS_NAME).read_bytes()})
    with pytest.raises(WeightsMismatchError, match=r'weights of another architecture \(or of other model arguments\) '
                                                   r'than snnet_deit_tsb: \d+ mis-shaped'):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)


def test_card_for_another_model(hub, published, tmp_path):
    _, folder = published
    other = timm.create_model('snnet_deit_sb', **SMALL)
    RouteCard.from_model(other).save(tmp_path / CARD_NAME)
    hub.put(REPO, {**_files(folder), CARD_NAME: (tmp_path / CARD_NAME).read_bytes()})
    with pytest.raises(ValueError, match="card is for 'snnet_deit_sb', not for 'snnet_deit_tsb'"):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)


def test_missing_card_warns(hub, published, caplog):
    model, folder = published
    hub.put(REPO, {k: v for k, v in _files(folder).items() if k != CARD_NAME})
    loaded = timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL, **FROM_HUB)
    _assert_same_weights(model, loaded)
    assert loaded.card is None and 'no routes.json route card' in caplog.text


def test_failed_save_leaves_old_folder(published, tmp_path, monkeypatch):
    model, folder = published
    target = tmp_path / 'out'
    save_pretrained(model, target)
    before = _files(target)

    def fail(*args, **kwargs):
        raise RuntimeError('disk full')
    monkeypatch.setattr(RouteCard, 'save', fail)
    with pytest.raises(RuntimeError, match='disk full'):
        save_pretrained(model, target)
    with pytest.raises(RuntimeError, match='disk full'):
        save_pretrained(model, tmp_path / 'new')
    assert _files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_save_needs_registered_architecture(tmp_path):
    from tiny_models import tiny_snnet
    with pytest.raises(ValueError, match='registered architecture'):
        save_pretrained(tiny_snnet(), tmp_path / 'x')
    assert list(tmp_path.iterdir()) == []


def test_pretrained_anchors(hub, tmp_path):
    """``pretrained_anchors=True`` starts a new SN-Net from each anchor's own timm weights (timm's hf_hub_ids)."""
    torch.manual_seed(0)
    names = ['deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224']
    anchors = [timm.create_model(n, **SMALL) for n in names]
    for repo, anchor in zip(ANCHOR_REPOS, anchors):
        safetensors.torch.save_file(anchor.state_dict(), str(tmp_path / WEIGHTS_NAME))
        hub.put(repo, {WEIGHTS_NAME: (tmp_path / WEIGHTS_NAME).read_bytes()})
    model = timm.create_model('snnet_deit_tsb', pretrained_anchors=True, **SMALL)
    for anchor, ours in zip(anchors, model.anchors):
        _assert_same_weights(anchor, ours)
    assert model.card is None


def test_snapshot_download_then_local_dir(hub, published):
    """The whole repo through ``snapshot_download`` (repo info, tree, resolve), then timm's ``local-dir:`` source."""
    from huggingface_hub import snapshot_download
    model, folder = published
    hub.put('someone/snap', _files(folder))
    path = snapshot_download('someone/snap')
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, README_NAME])
    loaded = timm.create_model(f'local-dir:{path}', pretrained=True)
    _assert_same_weights(model, loaded)
    assert loaded.routes()[2].top1 == TOP1[2]
    hub.offline()
    assert snapshot_download('someone/snap') == path


def test_the_active_route_is_saved_with_the_model(tmp_path):
    """config.json records the active route (its num_features is that route's), and the reloaded model runs it."""
    model = timm.create_model('snnet_deit_tsb', **SMALL).eval()
    model.set_stitch(3)
    folder = save_pretrained(model, tmp_path / 'saved')
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config['model_args']['stitch_id'] == 3 and config['num_features'] == model.num_features
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert loaded.stitch_id == 3 and loaded.num_features == config['num_features']
    x = _images()
    assert torch.equal(loaded(x), model(x))
