"""Serving several routes of one stitched network at once: mixed-route batches and shared prefixes.

``model(x, stitch_id=ids)`` with one route id per sample groups the samples by route and runs each group as one
batch (:func:`mixed_forward`). In eval mode, stitched routes that start in the same anchor run that anchor's
embedding and the units they all run before their stitches once, for the union of their samples, and the
activations are sliced per route afterwards. In train mode every group runs alone: BatchNorm batch statistics and
dropout draws depend on the batch a layer sees, and a route's definition is its own group's batch.

Nothing here keeps state between calls. On a model with BatchNorm layers a whole mixed batch runs under the model's
BatchNorm lock (:func:`timm_stitch.bn.bn_lock`): a shared prefix runs layers whose statistics another thread's route
may have swapped in, so concurrent calls are serialised and each sees its own routes' statistics.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .bn import bn_lock, route_bn_stats
from .errors import RouteIdError

if TYPE_CHECKING:
    from .macs import AnchorMacs
    from .model import StitchedNet
    from .routes import Route

__all__ = ['RouteIds', 'check_route_ids', 'group_by_route', 'mixed_forward', 'run_route', 'first_segment_length',
           'prefix_macs', 'cascade_stage_macs', 'cascade_resume']

#: one route id per sample: a 1-D integer tensor or a sequence of ints
RouteIds = Union[torch.Tensor, Sequence[int]]


def check_route_ids(model: StitchedNet, ids: RouteIds, batch_size: int) -> torch.Tensor:
    """``ids`` as a 1-D int64 CPU tensor of length ``batch_size``; ``TypeError``/``ValueError`` naming the first
    bad position and the valid range otherwise."""
    valid = f'valid ids are 0..{model.num_routes - 1}'
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f'per-sample stitch_id must have an integer dtype, got {ids.dtype} ({valid})')
        if ids.ndim != 1:
            raise ValueError(f'per-sample stitch_id must be 1-D (one id per sample), got shape {tuple(ids.shape)}')
        ids = ids.detach().to('cpu', torch.int64)
    else:
        for pos, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f'stitch_id[{pos}] must be an int, got {type(value).__name__} {value!r} ({valid})')
        ids = torch.tensor([int(v) for v in ids], dtype=torch.int64)
    if len(ids) != batch_size:
        raise ValueError(f'got {len(ids)} stitch ids for a batch of {batch_size} samples: give one per sample')
    bad = ((ids < 0) | (ids >= model.num_routes)).nonzero()
    if len(bad):
        pos = int(bad[0])
        raise RouteIdError(f'stitch_id[{pos}] = {int(ids[pos])} is out of range: {valid} ({model.num_routes} routes)')
    return ids


def group_by_route(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``(route id, sample positions)`` per route present in ``ids``, by route id; positions in input order."""
    return [(int(k), (ids == k).nonzero().flatten()) for k in torch.unique(ids)]


def first_segment_length(model: StitchedNet, stitch_id: int) -> Optional[int]:
    """How many units of its front anchor route ``stitch_id`` runs before its first stitch (None: anchor route)."""
    segments = model.route_segments(stitch_id)
    return None if segments is None else len(segments[0].units)


def run_route(model: StitchedNet, stitch_id: int, x: torch.Tensor, start: int = 0,
              keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits of stitched route ``stitch_id`` from ``x``: images when ``start`` is 0, else the activation after the
    first ``start`` units of its front anchor. Also returns the activations after the first ``d`` units for each
    ``d`` in ``keep`` (with ``start <= d <= first_segment_length``), for routes that share them."""
    run = model.route_run(stitch_id)
    kept: dict[int, torch.Tensor] = {}

    def collect(step: int, h: torch.Tensor) -> None:
        if step in keep:
            kept[step] = h

    with route_bn_stats(model, stitch_id):
        h = run.run(run.embed(x) if start == 0 else x, start=start, collect=collect if keep else None)
        feats = run.finish(h, model.final_norm_on_stitched_routes)
        return model.forward_head(feats, stitch_id=stitch_id), kept


@torch.compiler.disable  # grouping is data-dependent: under torch.compile it runs eagerly, with no recompiles
def mixed_forward(model: StitchedNet, x: torch.Tensor, ids: RouteIds, share_prefix: bool = True,
                  run: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` with route ``ids[i]`` for sample ``i``: each route's samples run as one batch
    (in input order), outputs returned in input order. With ``share_prefix`` (eval mode only), stitched routes
    that start in the same anchor share its embedding and common units (see the module docstring). ``run(images,
    stitch_id)`` runs one route's group (default: ``model(images, stitch_id=stitch_id)``; ``timm_stitch.compile``
    passes each route's compiled function).

    Under ``torch.compile(model)`` this function is not traced (``torch.compiler.disable``): the grouping depends
    on the ids' values, and tracing it would recompile for every new set of ids."""
    model.check_input(x)
    ids = check_route_ids(model, ids, x.shape[0])
    run = run or (lambda images, stitch_id: model(images, stitch_id=stitch_id))
    if x.shape[0] == 0:
        return run(x, model.stitch_id)  # no sample, no route to group by: the empty logits
    with bn_lock(model):
        return _grouped_forward(model, x, ids, share_prefix, run)


def _grouped_forward(model: StitchedNet, x: torch.Tensor, ids: torch.Tensor, share_prefix: bool,
                     run: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    groups = group_by_route(ids.to(x.device) if x.device.type != 'cpu' else ids)
    share = share_prefix and not model.training
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    by_anchor: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for stitch_id, pos in groups:
        route = model.plan.routes[stitch_id]
        if share and not route.is_anchor:
            by_anchor.setdefault(route.anchors[0], []).append((stitch_id, pos))
        else:
            outputs.append((pos, run(x[pos], stitch_id)))
    for front, members in by_anchor.items():
        if len(members) == 1:
            stitch_id, pos = members[0]
            outputs.append((pos, run(x[pos], stitch_id)))
        else:
            outputs.extend(_shared_prefix_forward(model, front, x, members))
    first = outputs[0][1]
    shapes = {tuple(logits.shape[1:]) for _, logits in outputs}
    if len(shapes) > 1:
        raise ValueError(f'the routes of one mixed batch give outputs of different shapes {sorted(shapes)} (anchors '
                         'with different num_classes): build the network with one num_classes')
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    for pos, logits in outputs:
        out[pos] = logits
    return out


def _shared_prefix_forward(model: StitchedNet, front: int, x: torch.Tensor,
                           members: list[tuple[int, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Routes starting in anchor ``front``: one embedding and one pass per common unit for the union of their
    samples; each route leaves the shared tensor (its rows sliced off) at its first stitch."""
    members = sorted(members, key=lambda m: first_segment_length(model, m[0]))
    sizes = [len(pos) for _, pos in members]
    h = model.route_run(members[0][0]).embed(x[torch.cat([pos for _, pos in members])])
    done, outputs = 0, []
    for i, (stitch_id, pos) in enumerate(members):
        stop = first_segment_length(model, stitch_id)
        h = model.route_run(stitch_id).run(h, start=done, stop=stop)  # the units of ``front`` they share
        done = stop
        rows, h = h[:sizes[i]], h[sizes[i]:]
        outputs.append((pos, run_route(model, stitch_id, rows, start=stop)[0]))
    return outputs


def prefix_macs(anchor: AnchorMacs, depth: int) -> int:
    """MACs (per sample) of an anchor's embedding and its first ``depth`` units."""
    return anchor.embed + sum(anchor.units[:depth])


def cascade_stage_macs(routes: Sequence[Route], anchors: Sequence[AnchorMacs], cascade: Sequence[int],
                       share_prefix: bool = True) -> list[int]:
    """Per-sample MACs of each stage of a cascade over route ids ``cascade``: stage ``i`` costs its route's MACs,
    less (with ``share_prefix``) the prefix it resumes from an earlier stage (see :func:`cascade_resume`). A pure
    function of the counts, e.g. ``routes = model.counted_routes()``, ``anchors = count_anchor_macs(model)[0]``.

    In a mixed batch sharing saves no MACs (each sample still runs its route's units once); it saves passes."""
    stops = [_first_stop(routes[k], anchors) for k in cascade]
    fronts = [routes[k].anchors[0] for k in cascade]
    macs = [routes[k].macs for k in cascade]
    if share_prefix:
        for i, (_, depth) in enumerate(cascade_resume(fronts, stops)):
            macs[i] -= prefix_macs(anchors[fronts[i]], depth) if depth else 0
    return macs


def cascade_resume(fronts: Sequence[int], stops: Sequence[Optional[int]]) -> list[tuple[Optional[int], int]]:
    """Per cascade stage: the earlier stage whose activations it resumes from, and after how many units of their
    common front anchor (``(None, 0)``: from the images). ``stops`` are the stages' first-segment lengths (None
    for anchor routes, which share nothing)."""
    plan: list[tuple[Optional[int], int]] = []
    for i, (front, stop) in enumerate(zip(fronts, stops)):
        best: tuple[Optional[int], int] = (None, 0)
        for j in range(i):
            if stop is not None and stops[j] is not None and fronts[j] == front:
                depth = min(stop, stops[j])
                if depth > best[1]:
                    best = (j, depth)
        plan.append(best)
    return plan


def _first_stop(route: Route, anchors: Sequence[AnchorMacs]) -> Optional[int]:
    if route.is_anchor:
        return None
    ref, (cut, _) = route.stitches[0], route.cuts[0]
    return anchors[route.anchors[0]].block_units[ref.stage][cut] + 1
