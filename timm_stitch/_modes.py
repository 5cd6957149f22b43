"""Temporary modes that give every submodule its train/eval flag, and every parameter its requires_grad, back."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ['eval_mode', 'frozen_parameters']


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


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with no parameter of ``model`` requiring grad, then give each its flag back (counting MACs:
    torch's module tracker hooks the backward of every tensor that requires grad, and fails on some)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
