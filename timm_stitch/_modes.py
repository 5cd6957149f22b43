"""Temporary eval mode that gives every submodule its own train/eval flag back afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ['eval_mode']


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode, then restore each submodule's own mode.

    ``model.train(was_training)`` would flatten a mixed state (e.g. frozen BatchNorm layers kept in eval inside a
    training model); this restores the flag of every module as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
