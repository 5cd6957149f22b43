"""The official SN-Net releases load through ``timm.create_model(arch, pretrained=True)`` (timm's url + custom_load).

Each release is served, in its official file layout (wrapper keys, pickled ``args``/``config``), by an HTTP server on
127.0.0.1 and reached with ``pretrained_cfg_overlay=dict(url=..., hf_hub_id=None)``, as a mirror would be. The
models are narrow or small-input variants with the releases' route structure, so that the reported cards attach.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from official_layouts import official_levit_state, official_state, save_release
from tiny_models import SMALL_ARCHS as SMALL

from timm_stitch.convert import OFFICIAL_FORMATS, convert_official
from timm_stitch.errors import ReleaseFormatError
from timm_stitch.fingerprint import weights_fingerprint
from timm_stitch.models._loading import converted_path

ARCHS = list(SMALL)
REPO_ROOT = Path(__file__).resolve().parents[1]


class FileServer:
    """GitHub-release-style downloads from 127.0.0.1: ``files`` maps a URL path to bytes; ``requests`` records
    every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header('Content-Length', str(len(body or b'')))
                self.end_headers()
                self.wfile.write(body or b'')

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.base = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def put(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base + path

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


def _release_name(arch: str) -> str:
    return OFFICIAL_FORMATS[arch].url.rsplit('/', 1)[-1]


@pytest.fixture(scope='module')
def releases(tmp_path_factory):
    """Every release's synthetic official file, served; TORCH_HOME (timm's download cache) in a temp folder."""
    root = tmp_path_factory.mktemp('releases')
    server = FileServer()
    served = {}
    for arch, (kwargs, _) in SMALL.items():
        if arch == 'snnet_levit_192_256':
            state = official_levit_state(num_classes=10, img_size=64)
        else:
            torch.manual_seed(0)
            state = official_state(timm.create_model(arch, **OFFICIAL_FORMATS[arch].model_kwargs, **kwargs), arch)
        path = save_release(state, arch, root / _release_name(arch))
        served[arch] = (server.put(f'/mirror/{arch}/{path.name}', path.read_bytes()), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCH_HOME', str(root / 'torch'))
        yield server, served, root / 'torch' / 'hub' / 'checkpoints'
    server.close()


def _create(arch: str, url: str, **kwargs):
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(url=url, hf_hub_id=None),
                             **SMALL[arch][0], **kwargs)


@pytest.mark.filterwarnings('ignore:route .* BatchNorm', 'ignore:route .* runs')
@pytest.mark.parametrize('arch', ARCHS)
@torch.no_grad()
def test_release_loads_through_timm(arch, releases):
    server, served, cache = releases
    url, original = served[arch]
    model = _create(arch, url).eval()
    reference = convert_official(original, arch, **SMALL[arch][0])
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    # the release's compat settings, applied: final norm (DeiT) and layer mapping (in the route plan)
    assert model.final_norm_on_stitched_routes is (arch != 'snnet_deit_tsb')
    assert model.plan == reference.plan
    if 'layer_mapping' in OFFICIAL_FORMATS[arch].model_kwargs:
        assert model.plan != timm.create_model(arch, **SMALL[arch][0], layer_mapping='corrected').plan
    # downloaded into timm's cache, the conversion cached beside it
    download = cache / _release_name(arch)
    assert download.is_file() and converted_path(download, model).is_file()
    # the reported card: top-1 on every route, selection by accuracy
    routes = model.routes()
    assert model.card is not None and all(r.top1 is not None for r in routes)
    assert {r.extra['accuracy']['source'] for r in routes} == {'reported'}
    reported = [json.loads(line) for line in (REPO_ROOT / 'timm_stitch' / 'data' / 'reported' / f'{arch}.jsonl')
                .read_text().splitlines()]
    assert [r.top1 for r in routes] == [row['acc1'] for row in sorted(reported, key=lambda r: r['cfg_id'])]
    best = max(r.top1 for r in routes)
    assert model.select_stitch(min_top1=best - 1e-6).top1 == best
    size = SMALL[arch][1]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for k in range(model.num_routes):
        assert torch.isfinite(model(x, stitch_id=k)).all(), k


_SECOND_LOAD = '''
import json, sys, timm, timm_stitch
import timm_stitch.models._loading as release
from timm_stitch.fingerprint import weights_fingerprint
def no_conversion(*args, **kwargs):
    raise AssertionError('converted again')
release.read_checkpoint = no_conversion
out = {}
for arch, url, kwargs in json.loads(sys.argv[1]):
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(url=url, hf_hub_id=None), **kwargs)
    out[arch] = [model.card is not None, weights_fingerprint(model)]
print(json.dumps(out))
'''


@pytest.mark.integration
@pytest.mark.filterwarnings('ignore:route .* BatchNorm')
def test_second_load_in_a_new_process_makes_no_request(releases):
    server, served, _ = releases
    expected = {}
    for arch in ARCHS:  # downloads and converts (unless an earlier test already did)
        model = _create(arch, served[arch][0])
        expected[arch] = [True, weights_fingerprint(model)]  # every tensor bit for bit
    server.requests.clear()
    jobs = json.dumps([(arch, served[arch][0], SMALL[arch][0]) for arch in ARCHS])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
    done = subprocess.run([sys.executable, '-c', _SECOND_LOAD, jobs], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == json.loads(json.dumps(expected))
    assert server.requests == []


def test_offline_with_empty_cache_names_url_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    for arch, fmt in OFFICIAL_FORMATS.items():
        if fmt.hf_hub is not None:  # Hub releases: see test_releases_v2
            continue
        cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / _release_name(arch)
        with pytest.raises(OSError, match=f'HF_HUB_OFFLINE=1 is set and {fmt.url} is not in the cache '
                                          rf'\(looked for {cached}\)'):
            timm.create_model(arch, pretrained=True)  # the plain name: the release is the default tag


def test_unreachable_mirror_names_url_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    url = 'http://127.0.0.1:9/v1.0/snnet_deit.pth'  # nothing listens on the discard port
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'snnet_deit.pth'
    with pytest.raises(OSError, match=f'from {url} into {cached}'):
        _create('snnet_deit_tsb', url)
    assert not cached.exists()


@pytest.mark.parametrize('damage', ['truncated', 'json', 'random', 'other checkpoint'])
def test_damaged_or_foreign_file_names_file_and_release(damage, releases, tmp_path, monkeypatch):
    server, served, _ = releases
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    data = served['snnet_deit_tsb'][1].read_bytes()
    if damage == 'other checkpoint':
        torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    body = {'truncated': data[:len(data) // 2], 'json': b'{"model": "snnet_deit"}', 'random': os.urandom(4096),
            'other checkpoint': (tmp_path / 'other.pth').read_bytes() if damage == 'other checkpoint' else b''}[damage]
    url = server.put(f'/damaged/{damage.replace(" ", "-")}/snnet_deit.pth', body)
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'snnet_deit.pth'
    with pytest.raises(ReleaseFormatError,
                       match=rf'cannot load {cached} .*ziplab/SN-Net v1.0 snnet_deit.pth.*delete it'):
        _create('snnet_deit_tsb', url)


def test_legacy_format_release_and_converted_mirror(releases, tmp_path, monkeypatch):
    """A release saved in torch's legacy (non-zip) format loads too, from a URL or a local file; a converted
    safetensors file at a mirror URL loads as it is."""
    server, served, _ = releases
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    reference = convert_official(served['snnet_deit_tsb'][1], 'snnet_deit_tsb', **SMALL['snnet_deit_tsb'][0])
    legacy = save_release(official_state(reference, 'snnet_deit_tsb'), 'snnet_deit_tsb', tmp_path / 'legacy.pth',
                          legacy=True)
    assert not legacy.read_bytes().startswith(b'PK')
    loaded = _create('snnet_deit_tsb', server.put('/legacy/snnet_deit.pth', legacy.read_bytes()))
    safetensors.torch.save_file(reference.state_dict(), str(tmp_path / 'model.safetensors'))
    mirrored = _create('snnet_deit_tsb', server.put('/converted/model.safetensors',
                                                    (tmp_path / 'model.safetensors').read_bytes()))
    local = timm.create_model('snnet_deit_tsb', pretrained=True, pretrained_cfg_overlay=dict(file=str(legacy)),
                              **SMALL['snnet_deit_tsb'][0])  # a release file you already have
    assert local.card is not None and converted_path(legacy, local).is_file()
    for model in (loaded, mirrored, local):
        ours = model.state_dict()
        for k, v in reference.state_dict().items():
            assert torch.equal(ours[k], v), k


def test_pretrained_anchors_offline_names_the_anchors(hub):
    """Offline with an empty Hub cache, pretrained_anchors=True says which anchors' weights are missing."""
    hub.offline()
    with pytest.raises(OSError, match=r'pretrained_anchors=True.*anchors deit_tiny_patch16_224 '
                                      r'\(timm/deit_tiny_patch16_224\.fb_in1k\), deit_small_patch16_224 .*'
                                      r'online to cache them.*built anchor models'):
        timm.create_model('snnet_deit_ts', pretrained_anchors=True, depth=1, img_size=32)


def test_other_num_classes_resets_the_heads(releases, tmp_path, monkeypatch):
    """As for any timm model: pretrained weights with another num_classes keep everything but the heads."""
    server, served, _ = releases
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    url, original = served['snnet_resnet_18_50']
    kwargs = dict(SMALL['snnet_resnet_18_50'][0], num_classes=7)
    model = timm.create_model('snnet_resnet_18_50', pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(url=url, hf_hub_id=None))
    reference = convert_official(original, 'snnet_resnet_18_50', **SMALL['snnet_resnet_18_50'][0]).state_dict()
    ours = model.state_dict()
    assert ours['anchors.1.fc.weight'].shape == (7, 256) and model.card is None  # reported top-1 is not for new heads
    assert all(torch.equal(ours[k], v) for k, v in reference.items() if not k.endswith(('fc.weight', 'fc.bias')))
    assert [p.name for p in (tmp_path / 'torch' / 'hub' / 'checkpoints').iterdir()] == ['resnet_18_50.pth']
    safetensors.torch.save_file(reference, str(tmp_path / 'model.safetensors'))  # a converted mirror, too
    mirrored = timm.create_model('snnet_resnet_18_50', pretrained=True, **kwargs,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors')))
    assert torch.equal(mirrored.state_dict()['anchors.0.conv1.weight'], reference['anchors.0.conv1.weight'])
