"""Loading official releases and Hub files on a bad network or a bad disk (issue 24, items 2-6 and 14): a loopback
server (tests/hub_server.py) drops, stalls and resets downloads part-way through the real clients (urllib for a
release URL, huggingface_hub for a Hub repo); a file size limit (``ulimit -f``, in a child process) stands in for
a full disk under the real writers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hub_server import HubServer
from huggingface_hub import constants as hf_constants
from image_folders import make_image_folder, write_config
from official_layouts import official_state, save_release
from tiny_models import SMALL_ARCHS

import timm_stitch  # noqa: F401
from timm_stitch._download import DownloadError
from timm_stitch.convert import OFFICIAL_FORMATS
from timm_stitch.hub import WEIGHTS_NAME, save_pretrained

ARCH = 'snnet_deit_tsb'
KWARGS = SMALL_ARCHS[ARCH][0]
NAME = OFFICIAL_FORMATS[ARCH].url.rsplit('/', 1)[-1]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def release(tmp_path_factory) -> bytes:
    """The bytes of a small snnet_deit_tsb release file in the official layout."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **OFFICIAL_FORMATS[ARCH].model_kwargs, **KWARGS)
    return save_release(official_state(model, ARCH), ARCH, tmp_path_factory.mktemp('rel') / NAME).read_bytes()


@pytest.fixture
def mirror(release, tmp_path, monkeypatch):
    """The release served at a mirror URL; timm's download cache (TORCH_HOME) empty; a 1 s download timeout."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_DOWNLOAD_TIMEOUT', 1)
    with HubServer() as server:
        yield server, server.put_file(NAME, release), tmp_path / 'torch' / 'hub' / 'checkpoints'


def _load(url: str, **kwargs):
    return timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(url=url, hf_hub_id=None),
                             **KWARGS, **kwargs)


@pytest.mark.parametrize('fault, why', [
    ('drop', r'the server closed the connection after \d+ of \d+ bytes'),
    ('stall', r'the server sent nothing for 1 s \(after \d+ bytes; the limit is HF_HUB_DOWNLOAD_TIMEOUT'),
    ('reset', r'the connection was lost after \d+ bytes \(ConnectionResetError'),
])
def test_a_failed_download_names_url_and_cache_and_keeps_nothing(mirror, fault, why):
    server, url, cache = mirror
    server.fault(NAME, fault)
    with pytest.raises(DownloadError, match=rf'cannot download the pretrained weights of {ARCH} from {url} into '
                                            rf'{cache / NAME}: {why}.*\. Nothing was written there; try again'):
        _load(url)
    assert not cache.exists() or os.listdir(cache) == []  # no half file under the final name, no temp
    assert _load(url).card is not None  # the retry downloads it whole and converts it
    names = os.listdir(cache)  # the release and its cached conversion
    assert NAME in names and len(names) == 2 and not [n for n in names if n.startswith('.')], names


def test_hub_downloads_resume_or_name_the_url_and_the_cache(hub, tmp_path, monkeypatch):
    """huggingface_hub resumes a download cut short (byte ranges) or stalled (after HF_HUB_DOWNLOAD_TIMEOUT); a
    reset, which it does not retry, is an error naming the URL and the cache; the next try completes the file."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_DOWNLOAD_TIMEOUT', 1)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **KWARGS)
    folder = save_pretrained(model, tmp_path / 'saved')
    hub.put('someone/repo', {f.name: f.read_bytes() for f in folder.iterdir()})
    hub.fault(WEIGHTS_NAME, 'drop', 'stall', 'reset')
    url = f'{hub.endpoint}/someone/repo/resolve/main/{WEIGHTS_NAME}'
    with pytest.raises(DownloadError, match=rf'cannot download the pretrained weights of {ARCH} from {url} into '
                                            rf'the Hub cache {hf_constants.HF_HUB_CACHE}: the connection was lost '
                                            r'\(ReadError: .*Connection reset by peer\)\. The part received is kept'):
        timm.create_model('hf-hub:someone/repo', pretrained=True)
    loaded = timm.create_model('hf-hub:someone/repo', pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert hub.faults[WEIGHTS_NAME] == []


def test_a_truncated_hub_cache_file_is_fetched_again_or_named(hub, tmp_path, caplog):
    torch.manual_seed(0)
    folder = save_pretrained(timm.create_model(ARCH, **KWARGS), tmp_path / 'saved')
    hub.put('someone/repo', {f.name: f.read_bytes() for f in folder.iterdir()})
    timm.create_model('hf-hub:someone/repo', pretrained=True)
    cached = Path(hf_constants.HF_HUB_CACHE).glob('models--someone--repo/snapshots/*/' + WEIGHTS_NAME)
    blob = next(cached).resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a disk error, a killed copy...
    timm.create_model('hf-hub:someone/repo', pretrained=True)  # online: fetched again
    assert blob.stat().st_size == (folder / WEIGHTS_NAME).stat().st_size
    assert 'is truncated or corrupt' in caplog.text and 'downloading it again' in caplog.text
    local = tmp_path / 'local.safetensors'
    local.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf'the pretrained weights of snnet_vit_fmnist_tsb at {local} are truncated '
                                         r'or corrupt \(.*\): copy or download it again'):  # (a release names it too)
        timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, pretrained_cfg_overlay=dict(file=str(local)))
    blob.write_bytes(blob.read_bytes()[:1000])
    hub.offline()
    with pytest.raises(ValueError, match=r'the pretrained weights of .* at .*/snapshots/\w+/model.safetensors are '
                                         r'truncated or corrupt \(.*\): delete it and load again with the Hub'):
        timm.create_model('hf-hub:someone/repo', pretrained=True)


_FULL_DISK = '''
import json, logging, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
logging.basicConfig(level=logging.WARNING, format='%(message)s')
import timm, timm_stitch
args = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (args['limit'], resource.RLIM_INFINITY))
'''


def _run(code: str, **args) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': f'{REPO_ROOT}:{REPO_ROOT / "tests"}'}
    return subprocess.run([sys.executable, '-c', _FULL_DISK + code, json.dumps(args)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=300)


@pytest.fixture(scope='module')
def full_disk(release, tmp_path_factory):
    """One child process on a "full disk": it loads a release whose conversion cannot be cached (twice), saves a
    checkpoint over a committed one, and trains into a new folder."""
    root = tmp_path_factory.mktemp('full')
    (root / 'rel').mkdir()
    (root / 'rel' / NAME).write_bytes(release)
    data = make_image_folder(root / 'images', per_class=(4, 1))
    cfg = write_config(root / 'c.yaml', epochs=1, batch_size=4)
    done = _run(f'''
from timm_stitch.checkpoint import save_checkpoint
from timm_stitch.cli import main
from tiny_models import tiny_snnet
model = tiny_snnet()
save_checkpoint(args['stem'], model, {{'epoch': 0}})
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
for _ in range(2):  # the release file is read, its conversion cannot be written
    m = timm.create_model({ARCH!r}, pretrained=True, pretrained_cfg_overlay=dict(file=args['file']), **{KWARGS!r})
    assert m.card is not None
print('loaded twice')
try:
    save_checkpoint(args['stem'], model, {{'epoch': 1}})
except timm_stitch.DiskFullError as e:
    print(e)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
sys.exit(main(['train', '-c', args['cfg'], '--data-dir', args['data'], '--out', args['out'], '--experiment', 'run']))
''', file=str(root / 'rel' / NAME), stem=str(root / 'ckpt' / 'last'), limit=2**30, cfg=str(cfg), data=str(data),
                out=str(root / 'out'))
    return done, root


def test_an_unwritable_conversion_cache_loads_from_memory_and_warns_once(full_disk):
    """A full (or read-only) cache folder: safetensors raises SafetensorError (not an OSError); the load works."""
    done, root = full_disk
    assert 'loaded twice' in done.stdout, done.stderr
    warnings = [line for line in done.stderr.splitlines() if 'cannot cache the converted weights' in line]
    assert len(warnings) == 1 and f'{root}/rel/' in warnings[0] and 'loaded from memory' in warnings[0], done.stderr
    assert 'corrupt' not in done.stderr and os.listdir(root / 'rel') == [NAME]


def test_a_full_disk_names_the_disk_and_keeps_the_old_checkpoint(full_disk):
    """torch's zip writer says only ``[enforce fail at inline_container.cc:672] . unexpected pos``."""
    done, root = full_disk
    folder = root / 'ckpt'
    assert done.stdout.splitlines()[1].startswith(f'cannot write {folder}/last.state.pth: no space left on the disk '
                                                  f'holding {folder} ('), done.stdout
    assert 'previous version is kept' in done.stdout
    assert torch.load(folder / 'last.state.pth', weights_only=True)['epoch'] == 0
    assert not [e for e in os.listdir(folder / '.checkpoints') if e.endswith('.tmp')]
    run = root / 'out' / 'run'
    assert done.returncode == 1 and f'timm-stitch: error: cannot write {run}/last.state.pth: no space left on the ' \
        f'disk holding {run} (' in done.stderr, done.stderr


def test_a_killed_cache_write_leaves_a_temp_the_next_write_removes(release, tmp_path):
    (tmp_path / NAME).write_bytes(release)
    killed = _run(f'''
import os
replace = os.replace
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if str(dst).endswith('.safetensors') else \\
    replace(src, dst)
timm.create_model({ARCH!r}, pretrained=True, pretrained_cfg_overlay=dict(file=args['file']), **{KWARGS!r})
''', file=str(tmp_path / NAME), limit=2**30)
    assert killed.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
    assert len(left) == 1 and left[0].stat().st_size > 10_000  # the full-size temp of the conversion
    old = left[0].stat().st_mtime - 120  # a minute after its writer died
    os.utime(left[0], (old, old))
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / NAME)), **KWARGS)
    assert model.card is not None
    rest = [n for n in os.listdir(tmp_path) if n != NAME]  # the conversion, and no temp
    assert len(rest) == 1 and rest[0].startswith(f'{Path(NAME).stem}.{ARCH}.') and rest[0].endswith('.safetensors')
