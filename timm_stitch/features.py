"""timm's feature API on every route: ``forward_intermediates``, ``feature_info`` and ``features_only`` models.

Indexing: an anchor route has exactly its timm anchor's intermediates (same indices, same tensors). A stitched route
is indexed over its *own* sequence, with no mapping between anchor depths:

* plain token families (ViT, DeiT, EVA): one intermediate per block the route runs, in order: the front anchor's
  blocks up to the stitch (in the front anchor's width, normed by its norm), then the end anchor's blocks from the
  stitch on. A route running 3 + 7 blocks has intermediates ``0..9``.
* hierarchical families (Swin, ResNet, ConvNeXt, LeViT, ResNet->Swin): one intermediate per stage, the stage output
  the route feeds on (the end anchor's when the stitch lies inside that stage), plus the stem first where the
  route's first anchor has one (ResNet), so a stitched route has as many as its first anchor and an FPN takes it.
* a CNN stage into a ViT (anchors of different stage structures): the CNN's stem and the stage outputs before the
  stitch, then one per ViT block the route runs.

A route that resamples to a finer patch grid (ViT/16 -> ViT/14) has intermediates whose reduction decreases at the
stitch: ``forward_intermediates`` gives them; a ``features_only`` backbone refuses it (timm's ``FeatureInfo`` needs
non-decreasing reductions).

``feature_info`` of a route gives each intermediate's channels, reduction and module (the anchor's own entry, its
module prefixed with ``anchors.{i}.``), so channels follow the route.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence, Union

import torch
from timm.models import FeatureInfo
from torch import nn

from ._timm_compat import feature_take_indices
from .bn import route_bn_stats
from .runner import route_spans

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['StitchedFeatures', 'prune_route_intermediates', 'route_feature_info', 'route_intermediates',
           'take_indices']

Indices = Optional[Union[int, Sequence[int]]]


class _Point(NamedTuple):
    step: int  # units run before it (-1: the stem, inside the embedding)
    anchor: int
    info: int  # index into the anchor's own feature_info


def _points(net: StitchedNet, stitch_id: int) -> list[_Point]:
    """The intermediates of route ``stitch_id`` in index order."""
    points: list[_Point] = []
    by_stage: dict[int, int] = {}
    base = 0
    for n, (anchor, start, stop) in enumerate(route_spans(net.plan.routes[stitch_id], net.adapters)):
        for end, info, stage in net.adapters[anchor].feature_points():
            if end == -1 and n == 0:
                point = _Point(-1, anchor, info)
            elif start < end <= stop:
                point = _Point(base + end - start, anchor, info)
            else:
                continue
            if stage is not None and stage in by_stage:
                points[by_stage[stage]] = point  # the stage output the route goes on with
                continue
            if stage is not None:
                by_stage[stage] = len(points)
            points.append(point)
        base += stop - start
    return points


def take_indices(net: StitchedNet, stitch_id: int, indices: Indices) -> list[int]:
    """``indices`` (timm's: None all, an int the last n, or a sequence, negatives from the end) as absolute indices
    of route ``stitch_id``'s intermediates, through timm's ``feature_take_indices``; ``ValueError`` naming the
    route's valid range."""
    n = len(_points(net, stitch_id))
    if n == 0:
        raise ValueError(f'route {stitch_id} has no intermediates: none of its anchors\' feature_info entries is the '
                         'output of one of its units (e.g. VGG names the ReLUs inside its units)')
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= n:
            raise ValueError(f'last-n indices {indices} out of range for route {stitch_id}: it has {n} '
                             f'intermediates, so n must be in 1..{n}')
    elif indices is not None:
        indices = list(indices)
        if not indices:
            return []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f'intermediate index {i!r} out of range for route {stitch_id}: valid indices are '
                                 f'0..{n - 1} (or -{n}..-1)')
    return feature_take_indices(n, indices)[0]


def route_feature_info(net: StitchedNet, stitch_id: int) -> list[dict]:
    """timm ``feature_info`` entries (``num_chs``, ``reduction``, ``module``) of route ``stitch_id``'s
    intermediates, in index order."""
    infos = []
    for point in _points(net, stitch_id):
        info = dict(net.anchors[point.anchor].feature_info[point.info])
        info['module'] = f'anchors.{point.anchor}.{info["module"]}'
        infos.append(info)
    return infos


def route_intermediates(
        net: StitchedNet,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        output_fmt: str = 'NCHW',
        intermediates_only: bool = False,
        stitch_id: Optional[int] = None,
        stop_early: bool = False,
) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """``forward_intermediates`` of route ``stitch_id`` (default: the active one); see the module docstring. With
    ``stop_early`` the route stops after the last unit an index needs, and (unless ``intermediates_only``) the
    features are the finish of the anchor it stopped in, as timm's models end early. Units are checkpointed as in
    ``forward`` when the model's gradient checkpointing is on."""
    stitch_id = net.resolve_stitch_id(stitch_id)
    taken = take_indices(net, stitch_id, indices)
    route = net.plan.routes[stitch_id]
    formats = [f for f in ('NCHW', 'NLC') if all(f in net.adapters[a].intermediate_formats for a in route.anchors)]
    if output_fmt not in formats:
        raise ValueError(f'output_fmt {output_fmt!r} is not one route {stitch_id} gives: valid are {formats}')
    net.check_input(x)
    with route_bn_stats(net, stitch_id):
        if route.is_anchor:
            return net.anchors[route.anchors[0]].forward_intermediates(
                x, indices=taken, norm=norm, output_fmt=output_fmt, intermediates_only=intermediates_only,
                stop_early=stop_early)
        points = _points(net, stitch_id)
        wanted: dict[int, list[int]] = {}
        for i in taken:
            wanted.setdefault(points[i].step, []).append(i)
        img_size = (x.shape[-2], x.shape[-1])
        out: dict[int, torch.Tensor] = {}

        def collect(step: int, y: torch.Tensor) -> None:
            for i in wanted.get(step, ()):
                out[i] = net.adapters[points[i].anchor].intermediate(y, points[i].info, norm, output_fmt, img_size)

        run = net.route_run(stitch_id)
        last = max([0] + [points[i].step for i in taken])  # the last unit an index needs
        stop = last if stop_early and last < run.num_units else None  # None: the whole route, stitches and all
        x = run.run(run.embed(x, collect), stop=stop, collect=collect, checkpointing=net.checkpointing)
        intermediates = [out[i] for i in taken]
        if intermediates_only:
            return intermediates
        return run.finish(x, net.final_norm_on_stitched_routes, stop), intermediates


def prune_route_intermediates(net: StitchedNet, indices: Indices = 1, prune_norm: bool = False,
                              prune_head: bool = True, stitch_id: Optional[int] = None) -> list[int]:
    """timm's ``prune_intermediate_layers`` for a stitched network: the absolute indices of ``indices`` on route
    ``stitch_id``, and with ``prune_head`` the classifiers reset to identity. Blocks and norms are shared by other
    routes, so none is removed (``prune_norm`` is accepted for timm's signature and leaves norms in place)."""
    taken = take_indices(net, net.resolve_stitch_id(stitch_id), indices)
    if prune_head:
        net.reset_classifier(0)
    return taken


class StitchedFeatures(nn.Module):
    """A stitched network as a timm ``features_only`` backbone: ``forward`` returns the intermediates
    ``out_indices`` of the active route (or of the per-call ``stitch_id``), and ``feature_info`` follows the active
    route (``set_stitch``), so that a neck reads the channels of the route in use.

    Args:
        model: The stitched network (shared, not copied).
        out_indices: timm's ``out_indices``: None (every intermediate), an int (the last n) or a sequence (negative
            from the end); checked against each route as it becomes active or is called.
        norm: Apply the anchors' final norms as timm's ``forward_intermediates`` does.
        output_fmt: ``'NCHW'``, or ``'NLC'`` for plain token families.
    """

    def __init__(self, model: StitchedNet, out_indices: Indices = None, norm: bool = False,
                 output_fmt: str = 'NCHW'):
        super().__init__()
        self.model = model
        self.out_indices = tuple(out_indices) if isinstance(out_indices, (list, tuple)) else out_indices
        self.norm, self.output_fmt = norm, output_fmt
        take_indices(model, model.stitch_id, self.out_indices)

    @property
    def stitch_id(self) -> int:
        return self.model.stitch_id

    def set_stitch(self, stitch_id: int) -> None:
        """Make route ``stitch_id`` active; raises (leaving the route unchanged) when ``out_indices`` do not fit it."""
        take_indices(self.model, self.model.check_stitch_id(stitch_id), self.out_indices)
        self.model.set_stitch(stitch_id)

    def resolve_stitch_id(self, stitch_id: Optional[int]) -> int:
        return self.model.resolve_stitch_id(stitch_id)

    def route_feature_info(self, stitch_id: Optional[int] = None) -> FeatureInfo:
        """``feature_info`` of the outputs of route ``stitch_id`` (default: the active one)."""
        stitch_id = self.model.resolve_stitch_id(stitch_id)
        info = route_feature_info(self.model, stitch_id)
        reductions = [i['reduction'] for i in info]
        if reductions != sorted(reductions):
            raise ValueError(f'route {stitch_id} resamples to a finer grid at its stitch (reductions {reductions}): '
                             "timm's FeatureInfo needs non-decreasing reductions; take its intermediates with "
                             'forward_intermediates')
        return FeatureInfo(info, take_indices(self.model, stitch_id, self.out_indices))

    @property
    def feature_info(self) -> FeatureInfo:
        return self.route_feature_info()

    def forward(self, x: torch.Tensor, stitch_id: Optional[int] = None) -> list[torch.Tensor]:
        return route_intermediates(self.model, x, self.out_indices, norm=self.norm, output_fmt=self.output_fmt,
                                   intermediates_only=True, stitch_id=stitch_id)
