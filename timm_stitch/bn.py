"""BatchNorm statistics for stitched routes (ResNet, LeViT, any anchor family with BatchNorm).

A BatchNorm layer's running statistics describe the activations its own anchor feeds it. On a stitched route,
the end anchor's layers after the stitch see the stitching layer's output instead, whose statistics differ
(untrained stitches especially), and one set of statistics cannot suit every route that shares the layer.
The front anchor's layers before the stitch see exactly what they see in their own anchor, so they are fine.

So timm-stitch keeps **per-route statistics**: :func:`recalibrate_bn` re-estimates, for one stitched route, the
running mean and variance of every BatchNorm layer that route runs after its first stitch (a short pass over
data, cumulative average), and stores them beside the model; the layers' own buffers keep the anchor's
statistics, so anchor routes and other routes are unaffected. An eval-mode forward of a calibrated route swaps
its statistics in (tensor references, no copies) for the duration of the call, under a lock shared by all
stitched networks, so concurrent calls on one model stay correct (they are serialised while any route of the
model has its own statistics). In train mode BatchNorm uses batch statistics and updates the layers' own
buffers, as in the official SN-Net training, where every route shares one set of running statistics.

An eval-mode forward of a stitched route that runs BatchNorm layers after its stitch without its own statistics
warns once per route (``warnings.warn``; filter it for a model trained jointly with shared statistics, such as
the official SN-Net checkpoints). Per-route statistics are not part of the ``state_dict``: recalibrate after
loading weights.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from .ls_init import image_batches
from .macs import model_input_size

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['recalibrate_bn', 'stitched_bn_layers', 'route_bn_stats', 'clear_bn_stats']

_LOCK = threading.RLock()


def stitched_bn_layers(model: StitchedNet, stitch_id: int) -> tuple[_BatchNorm, ...]:
    """The BatchNorm layers route ``stitch_id`` runs after its first stitching layer, in call order (cached)."""
    cache: dict[int, tuple[_BatchNorm, ...]] = model.__dict__.setdefault('_stitched_bn', {})
    if stitch_id not in cache:
        cache[stitch_id] = ()  # the tracing forward below must not trace again
        try:
            cache[stitch_id] = _trace_stitched_bn(model, stitch_id)
        except BaseException:
            del cache[stitch_id]
            raise
    return cache[stitch_id]


def _trace_stitched_bn(model: StitchedNet, stitch_id: int) -> tuple[_BatchNorm, ...]:
    route = model.plan.routes[stitch_id]
    if route.is_anchor or not any(isinstance(m, _BatchNorm) for m in model.anchors.modules()):
        return ()
    called: list[_BatchNorm] = []
    stitched = [False]

    def on_stitch(*_):
        stitched[0] = True

    def on_bn(module, *_):
        if stitched[0] and module not in called:
            called.append(module)

    first_stitch = model.stitch_layer(route.stitches[0])
    handles = [first_stitch.register_forward_hook(on_stitch)]
    handles += [m.register_forward_pre_hook(on_bn) for m in model.anchors.modules() if isinstance(m, _BatchNorm)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        param = next(model.parameters())
        size = model_input_size(model)[-2:]
        with torch.no_grad():
            model(torch.zeros(1, model.in_chans, *size, device=param.device, dtype=param.dtype), stitch_id=stitch_id)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return tuple(called)


def _bn_stats(model: StitchedNet) -> dict[int, dict[_BatchNorm, tuple[torch.Tensor, torch.Tensor]]]:
    return model.__dict__.setdefault('_route_bn_stats', {})


def clear_bn_stats(model: StitchedNet, stitch_id: Optional[int] = None) -> None:
    """Forget the per-route statistics of ``stitch_id`` (default: of every route)."""
    stats = _bn_stats(model)
    if stitch_id is None:
        stats.clear()
    else:
        stats.pop(stitch_id, None)


def route_bn_stats(model: StitchedNet, stitch_id: int) -> contextlib.AbstractContextManager:
    """A context running the body with route ``stitch_id``'s BatchNorm statistics (eval mode, BN families only)."""
    has_bn = model.__dict__.get('_has_bn')
    if has_bn is None:
        has_bn = model.__dict__['_has_bn'] = any(isinstance(m, _BatchNorm) for m in model.anchors.modules())
    if model.training or not has_bn:
        return contextlib.nullcontext()
    return _swap_bn_stats(model, stitch_id)


@contextlib.contextmanager
def _swap_bn_stats(model: StitchedNet, stitch_id: int) -> Iterator[None]:
    stats = _bn_stats(model)
    layers = stitched_bn_layers(model, stitch_id)
    if layers and stitch_id not in stats:
        _warn_uncalibrated(model, stitch_id, len(layers))
    if not stats:
        yield
        return
    with _LOCK:
        own = stats.get(stitch_id, {})
        saved = [(m, m.running_mean, m.running_var) for m in own]
        try:
            for m, (mean, var) in own.items():
                m.running_mean, m.running_var = mean.to(m.running_mean), var.to(m.running_var)
            yield
        finally:
            for m, mean, var in saved:
                m.running_mean, m.running_var = mean, var


def _warn_uncalibrated(model: StitchedNet, stitch_id: int, num_layers: int) -> None:
    warned: set[int] = model.__dict__.setdefault('_bn_warned', set())
    if stitch_id in warned:
        return
    warned.add(stitch_id)
    warnings.warn(
        f'route {stitch_id} runs {num_layers} BatchNorm layers after its stitch with the end anchor\'s own running '
        f'statistics; call model.recalibrate_bn(loader, stitch_id={stitch_id}) to estimate statistics for this '
        'route', UserWarning, stacklevel=4)


@torch.no_grad()
def recalibrate_bn(
        model: StitchedNet,
        data: Union[torch.Tensor, Iterable],
        stitch_id: Optional[int] = None,
        num_batches: Optional[int] = 10,
        batch_size: int = 32,
        progress: bool = True,
) -> int:
    """Estimate route ``stitch_id``'s own BatchNorm statistics from a short pass over ``data``.

    Every BatchNorm layer the route runs after its first stitch gets a fresh running mean and variance,
    averaged over all batches (``momentum=None``), while the rest of the model stays in eval mode. The estimates
    are kept as the route's own statistics; the layers' buffers are restored, so no other route changes.

    Args:
        model: The stitched network.
        data: An image tensor (N, C, H, W) or an iterable of image batches / ``(images, targets)`` tuples
            (un-augmented images, e.g. a validation-transform loader over training data).
        stitch_id: The route (default: the active route). Anchor routes keep their own statistics.
        num_batches: Stop after this many batches (None: all).
        batch_size: Chunk size when ``data`` is a tensor.
        progress: Show a progress bar.

    Returns:
        The number of BatchNorm layers recalibrated (0 for routes or families without any after the stitch).
    """
    stitch_id = model._resolve(stitch_id)
    layers = stitched_bn_layers(model, stitch_id)
    if not layers:
        return 0
    _bn_stats(model).pop(stitch_id, None)
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.running_mean, m.running_var, m.num_batches_tracked, m.momentum) for m in layers}
    model.eval()
    seen = 0
    try:
        for m in layers:
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
            m.num_batches_tracked = m.num_batches_tracked.clone()
            m.reset_running_stats()
            m.momentum = None
            m.train()
        device = next(model.parameters()).device
        batches = itertools.islice(image_batches(data, batch_size), num_batches)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            for images in tqdm(batches, desc=f'BN route {stitch_id}', total=num_batches, disable=not progress):
                model(images.to(device), stitch_id=stitch_id)
                seen += 1
        if seen == 0:
            raise ValueError('recalibrate_bn got no batches from data')
        _bn_stats(model)[stitch_id] = {m: (m.running_mean, m.running_var) for m in layers}
    finally:
        for m, (mean, var, tracked, momentum) in saved.items():
            m.running_mean, m.running_var, m.num_batches_tracked, m.momentum = mean, var, tracked, momentum
        for m, training in modes.items():
            m.training = training
    return len(layers)
