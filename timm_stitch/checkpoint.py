"""Training checkpoints that are one unit, and the lock that gives a training run its output folder alone.

A checkpoint (weights, EMA weights, training state) is written into a fresh folder ``.checkpoints/{name}-e{epoch}-*``
of the run's output folder, then committed by one atomic step: the symlink ``{name}`` is switched to it. The files
users open, ``{name}.safetensors``, ``{name}_ema.safetensors`` and ``{name}.state.pth``, are symlinks through
``{name}``, so at every moment they belong to one checkpoint: a run killed at any point resumes from the last
committed epoch and repeats the uninterrupted run. The training state holds only tensors and plain containers
(it is read with ``weights_only=True``) and the sha256 of the weights beside it, which resuming checks.

The epoch copies ``checkpoint-{epoch}.safetensors`` (the ``--checkpoint-hist`` best) and ``model_best.safetensors``
are hard links to (or copies of) committed weights, refreshed after each commit and again when a run resumes.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ._io import (
    ForeignFilesError,
    atomic_path,
    atomic_write,
    file_sha256,
    fsync_path,
    full_disk_named,
    is_temp_name,
    listing,
    make_folder,
    plain_permissions,
)
from ._mismatch import WeightsMismatchError, state_dict_mismatch

__all__ = ['save_checkpoint', 'load_state', 'publish', 'output_lock', 'keep_history', 'plain_args', 'trim_summary']

STORE = '.checkpoints'
LOCK_NAME = '.lock'


@contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` (created if missing) for the body; raises ``RuntimeError`` naming
    the folder when another process holds it, and ``ForeignFilesError`` when it holds files but is not a run's
    folder (a run never writes among a user's files). Temp files a killed run left there are removed."""
    import fcntl  # POSIX
    if os.path.isdir(output_dir):
        theirs = [e for e in os.listdir(output_dir) if not is_temp_name(e)]
        if theirs and not {LOCK_NAME, STORE} & set(theirs):
            raise ForeignFilesError(
                f"the output folder {output_dir} holds files that are not a training run's ({listing(theirs)}): "
                'nothing was written. Give the run a new or empty folder '
                '(another --out or --experiment)')
    make_folder(output_dir)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f'the output folder {output_dir} is in use by another training run (it holds {path}); wait for it '
                'to finish, or give this run another --out/--experiment') from None
        for entry in os.listdir(output_dir):  # the lock is ours: no writer uses the temps a killed run left
            if is_temp_name(entry) and os.path.isfile(os.path.join(output_dir, entry)):
                os.unlink(os.path.join(output_dir, entry))
        yield
    finally:
        os.close(fd)  # releases the lock


def plain_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as plain JSON values (what a ``weights_only`` load accepts)."""
    return json.loads(json.dumps(args, default=str))


def keep_history(history: list[tuple[float, int]], metric: float, epoch: int, keep: int, decreasing: bool
                 ) -> list[tuple[float, int]]:
    """The ``keep`` best ``(metric, epoch)`` pairs, best first, after adding this epoch's."""
    return sorted(history + [(metric, epoch)], key=lambda m: m[0], reverse=not decreasing)[:keep]


def trim_summary(path: str, last_epoch: int) -> None:
    """Drop the rows of a ``summary.csv`` after ``last_epoch`` (all for -1): the epochs a run is about to write,
    such as the one a killed run wrote a row for but did not commit."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_epoch]
    if kept != rows:
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write(path, text.getvalue())


def _save_weights(model: nn.Module, path: str, metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path, metadata=metadata)
    return file_sha256(path)


def _replace_with_link(target: str, link: str, hard: bool = False) -> None:
    """Make ``link`` a symlink (``target`` relative to the link's folder) or a hard link (else a copy) to
    ``target`` in one atomic rename, from the store, where a temp file left by a killed run is removed by the next
    :func:`publish`."""
    with atomic_path(link, temp_dir=os.path.join(os.path.dirname(link), STORE), fsync=False) as tmp:
        if not hard:
            os.symlink(target, tmp)
        else:
            try:
                os.link(target, tmp)
            except OSError:
                shutil.copyfile(target, tmp)


def save_checkpoint(path_stem: str, model: nn.Module, state: dict[str, Any], model_ema: Optional[nn.Module] = None
                    ) -> None:
    """Commit ``{stem}.safetensors`` (weights), ``{stem}_ema.safetensors`` and ``{stem}.state.pth`` (``state``
    plus the weights' sha256) together as one checkpoint (see the module docstring), then refresh the epoch copies
    named by ``state['checkpoint_files']`` and ``state['best_epoch']``."""
    folder, name = os.path.split(os.path.abspath(path_stem))
    store = os.path.join(folder, STORE)
    os.makedirs(store, exist_ok=True)
    epoch = state.get('epoch')
    tmp = tempfile.mkdtemp(dir=store, prefix=f'{name}-e{epoch}-', suffix='.tmp')
    try:
        with full_disk_named(path_stem + '.state.pth'):
            meta = {'format': 'pt', 'epoch': str(epoch)}
            state = dict(state, weights_sha256=_save_weights(model, os.path.join(tmp, f'{name}.safetensors'), meta))
            if model_ema is not None:
                state['ema_sha256'] = _save_weights(model_ema, os.path.join(tmp, f'{name}_ema.safetensors'), meta)
            torch.save(state, os.path.join(tmp, f'{name}.state.pth'))
            plain_permissions(tmp)
            for file in os.listdir(tmp):
                fsync_path(os.path.join(tmp, file))
        done = tmp.removesuffix('.tmp')
        os.rename(tmp, done)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(store)
    _replace_with_link(os.path.join(STORE, os.path.basename(done)), os.path.join(folder, name))  # the commit
    fsync_path(folder)
    publish(folder, name, state)


def publish(folder: str, name: str, state: dict[str, Any]) -> None:
    """After a commit (or on resume): the user-facing links of checkpoint ``name``, its epoch copies, and no other
    checkpoint of that name in the store. Idempotent, so a run killed half-way through is repaired on resume."""
    current = os.path.realpath(os.path.join(folder, name))
    for suffix in ('.safetensors', '_ema.safetensors', '.state.pth'):
        link, target = os.path.join(folder, name + suffix), os.path.join(name, name + suffix)
        if os.path.exists(os.path.join(current, name + suffix)):
            if not (os.path.islink(link) and os.readlink(link) == target):
                _replace_with_link(target, link)
        elif os.path.lexists(link):
            os.unlink(link)
    weights = os.path.join(current, f'{name}.safetensors')
    kept = {int(e) for _, e in state.get('checkpoint_files', ())}
    if state.get('epoch') in kept:
        _replace_with_link(weights, os.path.join(folder, f"checkpoint-{state['epoch']}.safetensors"), hard=True)
    for file in os.listdir(folder):
        match = re.fullmatch(r'checkpoint-(\d+)\.safetensors', file)
        if match and int(match.group(1)) not in kept:
            os.unlink(os.path.join(folder, file))
    if state.get('best_epoch') is not None and state.get('best_epoch') == state.get('epoch'):
        _replace_with_link(weights, os.path.join(folder, 'model_best.safetensors'), hard=True)
    store = os.path.join(folder, STORE)
    for entry in os.listdir(store):
        path = os.path.join(store, entry)
        if entry.endswith('.tmp') and not os.path.isdir(path):
            os.unlink(path)
        elif (entry.startswith(f'{name}-') or entry.endswith('.tmp')) and os.path.realpath(path) != current:
            shutil.rmtree(path, ignore_errors=True)


def load_state(path: str, model: nn.Module, model_ema: Optional[nn.Module] = None) -> dict[str, Any]:
    """Load the weights of a checkpoint saved by :func:`save_checkpoint` into ``model`` (and ``model_ema``) and
    return its training state; ``path`` is the ``.state.pth``, its ``.safetensors`` or the run folder. Raises
    ``ValueError`` when the weights are not those the state was saved with."""
    from safetensors.torch import load_file
    if os.path.isdir(path):
        path = os.path.join(path, 'last.state.pth')
    stem = path.removesuffix('.state.pth').removesuffix('.safetensors')
    if not os.path.isfile(stem + '.state.pth'):
        raise FileNotFoundError(f'no training state {stem}.state.pth to resume from')
    real = os.path.realpath(stem + '.state.pth')  # the committed checkpoint's own folder, read from one place
    real_stem = real.removesuffix('.state.pth')
    state = torch.load(real, map_location='cpu', weights_only=True)
    for suffix, key, target in (('.safetensors', 'weights_sha256', model), ('_ema.safetensors', 'ema_sha256',
                                                                              model_ema)):
        file = real_stem + suffix
        if key in state and (not os.path.isfile(file) or file_sha256(file) != state[key]):
            raise ValueError(f'{file} is not the weights {real} was saved with (sha256 {state[key][:16]}...): the '
                             'checkpoint is incomplete or was modified')
        if target is not None and os.path.isfile(file):
            weights = load_file(file)
            mismatch = state_dict_mismatch(weights, target.state_dict())
            if mismatch:
                raise WeightsMismatchError(f'{file} holds the weights of another architecture (or of other model '
                                           f"arguments) than this run's {state.get('arch') or 'model'}: {mismatch}")
            target.load_state_dict(weights)
    return state
