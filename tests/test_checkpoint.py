"""A training checkpoint is one unit: a run killed (SIGKILL) at any moment, even between the weight and state writes,
and resumed each time, ends with the uninterrupted run's weights; a second trainer on a busy output folder is refused;
the state loads with ``weights_only=True`` and resume refuses weights that are not the state's.

Killed runs come from ``kill_points``: each kills itself at its k-th file operation, or after a time.
"""
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from image_folders import ANCHORS, make_image_folder, write_config
from kill_points import run_trainer, start_trainer

from timm_stitch.fingerprint import weights_fingerprint
from timm_stitch.train import load_state, main

EXTRA = ('--model-ema', '--checkpoint-hist', '2', '--val-routes', '0')
EPOCHS = 16  # more than the kills below can complete: every kill point is reached


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'), per_class=(8, 2))


def _argv(tmp_path: Path, data: Path, name: str) -> list[str]:
    cfg = write_config(tmp_path / f'{name}.yaml', epochs=EPOCHS, batch_size=8, log_interval=100)
    run = tmp_path / name
    where = ['--resume', str(run / 'last.state.pth')] if (run / 'last.state.pth').exists() else \
        ['--out', str(tmp_path), '--experiment', name]
    return ['-c', str(cfg), '--data-dir', str(data), *where, *EXTRA]


def _hashes(run: Path) -> tuple[str, str]:
    """Fingerprints of the final weights and EMA weights (tensors by name: safetensors orders its metadata freely)."""
    return tuple(weights_fingerprint(safetensors.torch.load_file(run / file), length=64)
                 for file in ('last.safetensors', 'last_ema.safetensors'))


@pytest.fixture(scope='module')
def expected(tmp_path_factory, data) -> tuple[tuple[str, str], str]:
    """The uninterrupted run's final weights and EMA digests, and its ``summary.csv`` (on the suite's one thread, as
    every run compared with it)."""
    folder = tmp_path_factory.mktemp('full')
    assert main(_argv(folder, data, 'full')) == 0
    return _hashes(folder / 'full'), (folder / 'full' / 'summary.csv').read_text()


@pytest.mark.integration
def test_a_run_killed_anywhere_and_resumed_ends_as_the_uninterrupted_run(tmp_path, data, expected):
    rng = random.Random(0)
    # every file operation of a checkpoint save and a few of the next (a resumed process writes args.yaml, trains
    # one epoch, then saves: about 20 operations), then kills at random times
    codes = [run_trainer(_argv(tmp_path, data, 'killed'), kill_at_op=k) for k in range(1, 25)]
    for _ in range(4):
        run_trainer(_argv(tmp_path, data, 'killed'), kill_after_s=rng.uniform(0.1, 1.5))
    for _ in range(3):
        if run_trainer(_argv(tmp_path, data, 'killed')) == 0:
            break
    run = tmp_path / 'killed'
    assert _hashes(run) == expected[0]
    assert (run / 'summary.csv').read_text() == expected[1]  # one row per epoch, the same numbers
    assert codes == [-signal.SIGKILL] * len(codes)  # each kill point was reached
    state = torch.load(run / 'last.state.pth', weights_only=True)
    assert state['epoch'] == EPOCHS - 1
    names = {p.name for p in run.iterdir()}
    assert 'model_best.safetensors' in names and not any(n.endswith('.tmp') for n in names)
    assert len([n for n in names if n.startswith('checkpoint-')]) == 2


def test_a_second_trainer_on_a_busy_output_folder_is_refused(tmp_path, data):
    paused = tmp_path / 'paused'
    first = start_trainer(_argv(tmp_path, data, 'busy'), pause_at_op=1, paused=paused)
    try:
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert time.monotonic() < deadline and first.is_alive(), 'the first run ended'
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=f'{tmp_path / "busy"}.*in use by another training run'):
            main(_argv(tmp_path, data, 'busy'))
    finally:
        first.kill()
        first.join()
    assert main(_argv(tmp_path, data, 'busy')) == 0  # the lock went with the killed run


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path, data, expected):
    """Plain files side by side, a state without the weights' sha256 (as written before checkpoints were units)."""
    assert main([*_argv(tmp_path, data, 'old'), '--stop-epoch', '3']) == 0
    run = tmp_path / 'old'
    for suffix in ('.safetensors', '_ema.safetensors', '.state.pth'):
        file = run / f'last{suffix}'
        shutil.copyfile(os.path.realpath(file), run / 'copy')
        os.replace(run / 'copy', file)
    os.unlink(run / 'last')
    shutil.rmtree(run / '.checkpoints')
    state = torch.load(run / 'last.state.pth', weights_only=True)
    del state['weights_sha256'], state['ema_sha256']
    torch.save(state, run / 'last.state.pth')
    assert main(_argv(tmp_path, data, 'old')) == 0
    assert _hashes(run) == expected[0]
    assert os.path.islink(run / 'last.safetensors')


def test_resume_checks_the_state_and_its_weights(tmp_path, data):
    assert main([*_argv(tmp_path, data, 'run'), '--epochs', '1']) == 0
    run = tmp_path / 'run'
    torch.load(run / 'last.state.pth', weights_only=True)
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    weights = os.path.realpath(run / 'last.safetensors')
    tensors = safetensors.torch.load_file(weights)
    tensors = {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}
    os.chmod(weights, 0o644)
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(ValueError, match='is not the weights'):
        load_state(str(run / 'last.state.pth'), model)
