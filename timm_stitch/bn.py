"""BatchNorm statistics for stitched routes (ResNet, LeViT, any anchor family with BatchNorm).

A BatchNorm layer's running statistics describe the activations its own anchor feeds it. On a stitched route,
the end anchor's layers after the stitch see the stitching layer's output instead, whose statistics differ
(untrained stitches especially), and one set of statistics cannot suit every route that shares the layer.
The front anchor's layers before the stitch see exactly what they see in their own anchor, so they are fine.

So timm-stitch keeps **per-route statistics**: :func:`recalibrate_bn` re-estimates, for one stitched route, the
running mean and variance of every BatchNorm layer that route runs after its first stitch (a short pass over
data, cumulative average). They are registered buffers of the model's ``route_bn`` submodule (a
:class:`RouteBatchNormStats`), so they are in the ``state_dict`` (keys ``route_bn.{stitch_id}.running_mean_{i}``
and ``running_var_{i}`` for the route's ``i``-th layer of :func:`stitched_bn_layers`), move with ``.to()`` and are
saved and loaded with the weights. The layers' own buffers keep the anchor's statistics, so anchor routes and
other routes are unaffected. An eval-mode forward of a calibrated route swaps its statistics in (tensor
references, no copies) for the duration of the call, under the model's own lock. Every eval-mode call of a model
with BatchNorm layers holds that lock for all the modules it runs (:func:`bn_lock`: a route's own forward, a
mixed-route batch with its shared prefixes, a cascade, ``forward_intermediates``, ``export_stitch``, the least-squares
init's anchor passes), and :func:`recalibrate_bn` holds it while it swaps fresh statistics in, so concurrent calls
on one model stay correct: they are serialised (models without BatchNorm run concurrently). In train mode BatchNorm
uses batch statistics and updates the layers' own buffers, as in the official SN-Net training, where every route
shares one set of running statistics.

An eval-mode forward of a stitched route that runs BatchNorm layers after its stitch without its own statistics
warns once per route (``warnings.warn``; filter it for a model trained jointly with shared statistics, such as
the official SN-Net checkpoints, or for a checkpoint saved before per-route statistics were saved with the
weights). Loading a state dict replaces every route's statistics with those it holds (none for such a checkpoint).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ._modes import eval_mode
from .ls_init import image_batches
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['recalibrate_bn', 'stitched_bn_layers', 'route_bn_stats', 'bn_lock', 'clear_bn_stats',
           'RouteBatchNormStats', 'is_route_bn_key']

#: the ``StitchedNet`` attribute (and ``state_dict`` key prefix) holding the per-route statistics
ROUTE_BN_NAME = 'route_bn'


class RouteBatchNormStats(nn.Module):
    """Per-route BatchNorm running statistics of a stitched network, as registered buffers.

    Child ``'{stitch_id}'`` holds ``running_mean_{i}`` and ``running_var_{i}`` of the ``i``-th layer of
    ``stitched_bn_layers(model, stitch_id)``. Also holds the model's lock for swapping statistics in, and caches of
    what is derived from the model's structure (not state).
    """

    def __init__(self, anchors: nn.Module) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.layers: dict[int, tuple[_BatchNorm, ...]] = {}
        self.warned: set[int] = set()
        #: whether the anchors have any BatchNorm layer (fixed at creation: a compiled forward guards on it)
        self.has_bn = any(isinstance(m, _BatchNorm) for m in anchors.modules())

    def __getstate__(self) -> dict[str, Any]:  # deepcopy and pickle: a lock cannot be copied
        state = self.__dict__.copy()
        del state['lock']
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.lock = threading.RLock()

    def exclusive(self, training: bool) -> contextlib.AbstractContextManager:
        """The lock as a context for a pass in ``training`` mode: held in eval mode on BatchNorm families only."""
        return contextlib.nullcontext() if training or not self.has_bn else self.lock

    def get(self, stitch_id: int) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Route ``stitch_id``'s ``(running_mean, running_var)`` per layer, or None when it has none."""
        stats = self._modules.get(str(stitch_id))
        if stats is None:
            return None
        count = len(stats._buffers) // 2
        return [(stats._buffers[f'running_mean_{i}'], stats._buffers[f'running_var_{i}']) for i in range(count)]

    def set(self, stitch_id: int, stats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Register ``(running_mean, running_var)`` per layer as route ``stitch_id``'s statistics."""
        holder = nn.Module()
        for i, (mean, var) in enumerate(stats):
            holder.register_buffer(f'running_mean_{i}', mean)
            holder.register_buffer(f'running_var_{i}', var)
        self.add_module(str(stitch_id), holder)

    def discard(self, stitch_id: Optional[int] = None) -> None:
        """Forget the statistics of ``stitch_id`` (default: of every route)."""
        for key in [str(stitch_id)] if stitch_id is not None else list(self._modules):
            self._modules.pop(key, None)


def is_route_bn_key(key: str) -> bool:
    """Whether a stitched network's ``state_dict`` key holds per-route BatchNorm statistics."""
    return key.startswith(ROUTE_BN_NAME + '.')


def _container(model: StitchedNet) -> RouteBatchNormStats:
    return getattr(model, ROUTE_BN_NAME)


def stitched_bn_layers(model: StitchedNet, stitch_id: int) -> tuple[_BatchNorm, ...]:
    """The BatchNorm layers route ``stitch_id`` runs after its first stitching layer: those of every segment after
    the first, then the last anchor's head (final norm, classifier), in module order (cached)."""
    cache = _container(model).layers
    if stitch_id not in cache:
        cache[stitch_id] = _find_stitched_bn(model, stitch_id)
    return cache[stitch_id]


def _find_stitched_bn(model: StitchedNet, stitch_id: int) -> tuple[_BatchNorm, ...]:
    segments = model.route_segments(stitch_id)
    if segments is None:
        return ()
    modules = [m for s in segments[1:] for unit in s.units for m in unit.modules()]
    modules += [m for s in segments if s.stitch is not None for m in s.stitch.modules()]
    last = model.plan.routes[stitch_id].anchors[-1]
    head = {id(p) for p in model.adapters[last].head_parameters(model.final_norm_on_stitched_routes)}
    modules += [m for m in model.anchors[last].modules() if any(id(p) in head for p in m.parameters(recurse=False))]
    layers = {id(m): m for m in modules if isinstance(m, _BatchNorm)}
    return tuple(layers.values())


def clear_bn_stats(model: StitchedNet, stitch_id: Optional[int] = None) -> None:
    """Forget the per-route statistics of ``stitch_id`` (default: of every route)."""
    _container(model).discard(stitch_id)


def prepare_load(model: StitchedNet, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Before ``model`` loads ``state_dict``: replace its per-route statistics by empty buffers for those the state
    dict holds (shaped, placed and typed like the layers' own), so that a strict load fills them and an old
    checkpoint without them loads too. Entries of unknown routes are left for the load to report as unexpected."""
    container = _container(model)
    container.discard()
    head = prefix + ROUTE_BN_NAME + '.'
    routes = {k[len(head):].split('.', 1)[0] for k in state_dict if k.startswith(head)}
    for key in routes:
        if not key.isdigit() or int(key) >= model.num_routes:
            continue
        layers = stitched_bn_layers(model, int(key))
        if layers:
            container.set(int(key), [(torch.empty_like(m.running_mean), torch.empty_like(m.running_var))
                                     for m in layers])


def bn_lock(model: StitchedNet) -> contextlib.AbstractContextManager:
    """A context holding ``model``'s BatchNorm lock (eval mode, BN families only; reentrant): the body may run any
    module whose running statistics another thread's route swaps (see the module docstring)."""
    return _container(model).exclusive(model.training)


def route_bn_stats(model: StitchedNet, stitch_id: int) -> contextlib.AbstractContextManager:
    """A context running the body with route ``stitch_id``'s BatchNorm statistics, under :func:`bn_lock` (eval
    mode, BN families only)."""
    container = _container(model)
    if model.training or not container.has_bn:
        return contextlib.nullcontext()
    return _swap_bn_stats(model, container, stitch_id)


@contextlib.contextmanager
def _swap_bn_stats(model: StitchedNet, container: RouteBatchNormStats, stitch_id: int) -> Iterator[None]:
    layers = stitched_bn_layers(model, stitch_id)
    own = container.get(stitch_id)
    if layers and own is None:
        _warn_uncalibrated(container, stitch_id, len(layers))
    with container.lock:
        pairs = list(zip(layers, own or ()))
        saved = [(m, m.running_mean, m.running_var) for m, _ in pairs]
        try:
            for m, (mean, var) in pairs:
                m.running_mean, m.running_var = mean.to(m.running_mean), var.to(m.running_var)
            yield
        finally:
            for m, mean, var in saved:
                m.running_mean, m.running_var = mean, var


def _warn_uncalibrated(container: RouteBatchNormStats, stitch_id: int, num_layers: int) -> None:
    if stitch_id in container.warned:
        return
    container.warned.add(stitch_id)
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
    are registered as the route's own statistics (in the ``state_dict``); the layers' buffers are restored, so no
    other route changes.

    Args:
        model: The stitched network (also inside ``torch.compile``, DDP or DataParallel).
        data: An image tensor (N, C, H, W) or an iterable of image batches / ``(images, targets)`` tuples
            (un-augmented images, e.g. a validation-transform loader over training data).
        stitch_id: The route (default: the active route). Anchor routes keep their own statistics.
        num_batches: Stop after this many batches (None: all).
        batch_size: Chunk size when ``data`` is a tensor.
        progress: Show a progress bar.

    Returns:
        The number of BatchNorm layers recalibrated (0 for routes or families without any after the stitch).
    """
    model = unwrap_stitched(model, 'recalibrate_bn')
    stitch_id = model.resolve_stitch_id(stitch_id)
    layers = stitched_bn_layers(model, stitch_id)
    if not layers:
        return 0
    container = _container(model)
    with container.lock:  # other threads' eval calls wait: the layers run in train mode with fresh buffers meanwhile
        return _recalibrate(model, container, layers, stitch_id, data, num_batches, batch_size, progress)


def _recalibrate(model: StitchedNet, container: RouteBatchNormStats, layers: tuple[_BatchNorm, ...], stitch_id: int,
                 data: Union[torch.Tensor, Iterable], num_batches: Optional[int], batch_size: int,
                 progress: bool) -> int:
    container.discard(stitch_id)
    saved = {m: (m.running_mean, m.running_var, m.num_batches_tracked, m.momentum) for m in layers}
    seen = 0
    with eval_mode(model):
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
            container.set(stitch_id, [(m.running_mean, m.running_var) for m in layers])
        finally:
            for m, (mean, var, tracked, momentum) in saved.items():
                m.running_mean, m.running_var, m.num_batches_tracked, m.momentum = mean, var, tracked, momentum
    return len(layers)
