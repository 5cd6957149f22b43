"""Weights that do not fit a model, said in one line: how many keys are missing, unexpected or of another shape,
with the first few of each, wherever a checkpoint is loaded into a model (the CLI, validate, resuming, the Hub and
release loaders)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from .errors import WeightsMismatchError

__all__ = ['WeightsMismatchError', 'mismatch_summary', 'state_dict_mismatch', 'torch_mismatch']

SHOWN = 3

_SIZE = re.compile(r'size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, '
                   r'the shape in current model is torch\.Size\(\[([^\]]*)\]\)')


def mismatch_summary(missing: Sequence[str] = (), unexpected: Sequence[str] = (), misshaped: Sequence[str] = (),
                     shown: int = SHOWN) -> str:
    """``'2 missing (e.g. a, b); 40 mis-shaped (e.g. ...)'``: a count and the first ``shown`` of each kind."""
    parts = [f'{len(items)} {what} (e.g. {", ".join(items[:shown])}{", ..." if len(items) > shown else ""})'
             for what, items in (('mis-shaped', misshaped), ('missing', missing), ('unexpected', unexpected)) if items]
    return '; '.join(parts)


def state_dict_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """What differs between a checkpoint's ``state`` and a model's ``expected`` state dict ('' when they fit)."""
    return mismatch_summary(
        [k for k in expected if k not in state], [k for k in state if k not in expected],
        [f'{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model' for k, v in expected.items()
         if k in state and state[k].shape != v.shape])


def torch_mismatch(error: BaseException) -> str:
    """torch's ``load_state_dict`` error (one line per mis-shaped key, however many) summarised as
    :func:`mismatch_summary` does; '' for any other error."""
    text = str(error)
    if not text.startswith('Error(s) in loading state_dict'):
        return ''
    keys = {}
    for kind in ('Missing', 'Unexpected'):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f'{kind} key(s)')), '')
        keys[kind] = re.findall(r'"([^"]+)"', line)
    misshaped = [f'{k} ({a}) in the file, ({b}) in the model' for k, a, b in _SIZE.findall(text)]
    return mismatch_summary(keys['Missing'], keys['Unexpected'], misshaped)
