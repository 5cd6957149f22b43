"""Trainer runs that SIGKILL themselves at the k-th file operation (writes, renames, links, deletes, fsyncs) or after
a time, for the exact-resume tests. Each run is a fresh process forked from a server that has imported torch, timm
and the trainer once (no start-up cost; forking the test process itself is unsafe once autograd has run there)."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import safetensors.torch
import torch

from timm_stitch.train import main

FILE_OPS = ((os, ('replace', 'rename', 'symlink', 'link', 'unlink', 'rmdir', 'fsync')), (torch, ('save',)),
            (safetensors.torch, ('save_file',)), (shutil, ('copyfile',)))

_CONTEXT = multiprocessing.get_context('forkserver')
_CONTEXT.set_forkserver_preload(['timm_stitch.train', 'safetensors.torch'])  # the server's path lacks tests/


def _on_file_op(action: Callable[[int], None]) -> None:
    """Call ``action(count)`` before every file operation of this process."""
    count = [0]
    for module, names in FILE_OPS:
        for name in names:
            setattr(module, name, _counted(getattr(module, name), count, action))


def _counted(real: Callable, count: list[int], action: Callable[[int], None]) -> Callable:
    def op(*args, **kwargs):
        count[0] += 1
        action(count[0])
        return real(*args, **kwargs)
    return op


def _train(argv: list[str], kill_at_op: int, kill_after_s: float, pause_at_op: int, paused: Optional[Path]) -> None:
    def action(n: int) -> None:
        if n == kill_at_op:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == pause_at_op:
            paused.touch()
            time.sleep(600)
    torch.set_num_threads(1)  # as the tests' own runs
    _on_file_op(action)
    if kill_after_s:
        threading.Timer(kill_after_s, os.kill, (os.getpid(), signal.SIGKILL)).start()
    sys.exit(main(argv))


def start_trainer(argv: list[str], kill_at_op: int = 0, kill_after_s: float = 0.0, pause_at_op: int = 0,
                  paused: Optional[Path] = None) -> multiprocessing.Process:
    """Start ``timm_stitch.train.main(argv)`` in a fresh process that kills itself at file operation ``kill_at_op``
    or after ``kill_after_s`` seconds, or touches ``paused`` and sleeps at ``pause_at_op`` (0: never)."""
    process = _CONTEXT.Process(target=_train, args=(argv, kill_at_op, kill_after_s, pause_at_op, paused))
    process.start()
    return process


def run_trainer(argv: list[str], **kwargs) -> int:
    """:func:`start_trainer`, then wait: the exit code (``-signal.SIGKILL`` when it killed itself)."""
    process = start_trainer(argv, **kwargs)
    process.join()
    return process.exitcode
