"""Least-squares initialisation of stitching layers from anchor activations."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Optional, Union

import torch
from tqdm.auto import tqdm

from ._modes import eval_mode
from .routes import StitchGroup, StitchPosition
from .stitching import LeastSquaresFit
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['init_stitches', 'image_batches']


def image_batches(data: Union[torch.Tensor, Iterable], batch_size: int) -> Iterator[torch.Tensor]:
    """Image batches from a tensor (split into ``batch_size`` chunks) or a loader of tensors / (images, ...)."""
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _unit_outputs(model: StitchedNet, anchor: int, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the embedding (index 0) and of every unit (index u + 1) of one anchor, with its own BatchNorm
    statistics (under the lock that another thread's route holds while its statistics are swapped in)."""
    adapter = model.adapters[anchor]
    with model.route_bn.exclusive(model.training):
        outputs = [adapter.embed(x)]
        for unit in adapter.units:
            outputs.append(unit(outputs[-1]))
    return outputs


def _fit_key(group: StitchGroup, position: StitchPosition, mode: str) -> tuple:
    """Positions that share a fit: all of a layer's (joint), or each position alone (average)."""
    key = (group.stage, group.pair, position.layer)
    return key if mode == 'joint' else key + (position.front, position.end)


@torch.no_grad()
def init_stitches(
        model: StitchedNet,
        data: Union[torch.Tensor, Iterable],
        num_batches: Optional[int] = None,
        batch_size: int = 64,
        mode: Literal['joint', 'average'] = 'joint',
        progress: bool = True,
) -> None:
    """Fit every stitching layer to map front-anchor activations onto the end anchor's, by least squares.

    For position ``(j, k)`` the input is the front anchor's output of block ``j`` and the target is the end
    anchor's input of block ``k``. Runs in eval mode (no dropout, drop-path or BatchNorm updates) on the images
    as given (pass un-augmented ones), accumulating float64 normal equations over all batches. With
    ``mode='joint'`` (default) each shared layer gets one least-squares solve over all of its positions; with
    ``'average'`` each position is solved alone and the solutions averaged, as the official code does. A low-rank
    stitching layer's frozen base weight takes the fit and its update is reset to zero, so that the layer computes
    the fit.

    Args:
        model: The stitched network (also inside ``torch.compile``, DDP or DataParallel).
        data: An image tensor (N, C, H, W) or an iterable of image batches / ``(images, targets)`` tuples.
        num_batches: Stop after this many batches (default: all).
        batch_size: Chunk size when ``data`` is a tensor.
        mode: ``'joint'`` or ``'average'``.
        progress: Show a progress bar.
    """
    if mode not in ('joint', 'average'):
        raise ValueError(f"mode must be 'joint' or 'average', got {mode!r}")
    model = unwrap_stitched(model, 'init_stitches')
    groups = model.plan.groups
    if not groups:
        return
    # one fit per shared layer (joint) or per position (average)
    fits: dict[tuple, LeastSquaresFit] = {}
    for g in groups:
        for p in g.positions:
            key = _fit_key(g, p, mode)
            if key not in fits:
                layer = model.stitch_layers[str(g.stage)][g.pair][p.layer]
                fits[key] = LeastSquaresFit(layer.in_dim, layer.out_dim)

    new_tokens: dict[tuple, tuple[torch.Tensor, int]] = {}  # per layer: sum and count of new-token targets
    anchors_used = sorted({a for g in groups for a in (g.front_anchor, g.end_anchor)})
    with eval_mode(model):
        device = next(model.parameters()).device
        batches = itertools.islice(image_batches(data, batch_size), num_batches)
        for images in tqdm(batches, desc='LS init', total=num_batches, disable=not progress):
            model.check_input(images)
            images = images.to(device)
            outputs = {a: _unit_outputs(model, a, images) for a in anchors_used}
            for g in groups:
                front, end = model.adapters[g.front_anchor], model.adapters[g.end_anchor]
                for p in g.positions:
                    x = outputs[g.front_anchor][front.unit_index(g.stage, p.front) + 1]
                    y = outputs[g.end_anchor][end.unit_index(g.resume_stage, p.end)]
                    layer = model.stitch_layers[str(g.stage)][g.pair][p.layer]
                    x, y, new = layer.ls_rows(x, y)
                    key = _fit_key(g, p, mode)
                    fits[key].add(x, y)
                    if new is not None:  # prefix tokens only the end anchor has: their mean activation
                        total, count = new_tokens.get(key[:3], (0, 0))
                        new_tokens[key[:3]] = (total + new.double().sum(0).cpu(), count + new.shape[0])

    solutions: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, fit in fits.items():
        solutions.setdefault(key[:3], []).append(fit.solve())
    for (stage, pair, layer), solved in solutions.items():
        weight = torch.stack([w for w, _ in solved]).mean(0)
        bias = torch.stack([b for _, b in solved]).mean(0)
        total, count = new_tokens.get((stage, pair, layer), (None, 0))
        model.stitch_layers[str(stage)][pair][layer].set_affine(weight, bias, None if total is None else total / count)
