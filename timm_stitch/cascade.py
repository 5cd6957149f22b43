"""Confidence cascades over the routes of one stitched network.

A :class:`Cascade` runs its first (cheap) route on every sample and sends the samples it is unsure of (confidence
below the threshold) to the next route, and so on; the last route answers whatever is left. A later route that
starts in the same anchor as an earlier one resumes from the activations the earlier one computed for the units
they share, so an escalated sample pays only for the rest of its new route.

Calibration: :func:`route_logits` computes each route's logits on held-out data once; :func:`sweep_thresholds` is
then a pure function of those logits giving the accuracy / mean-MACs curve, which :func:`add_cascade_curve` writes
into a route card (``RouteCard.cascades``) and :func:`select_cascade` reads to pick a cascade under a MACs budget.
"""
from __future__ import annotations

import copy
import numbers
from typing import TYPE_CHECKING, Any, Iterable, Literal, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._modes import eval_mode
from .errors import StaleCardError
from .serving import cascade_resume, cascade_stage_macs, first_segment_length, run_route
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .cards import RouteCard
    from .model import StitchedNet

__all__ = ['Cascade', 'CascadeOutput', 'confidence', 'route_logits', 'sweep_thresholds', 'add_cascade_curve',
           'select_cascade', 'stage_macs_of', 'Confidence']

Confidence = Literal['max_softmax', 'margin']
CONFIDENCES = ('max_softmax', 'margin')


def confidence(logits: torch.Tensor, kind: Confidence = 'max_softmax') -> torch.Tensor:
    """Per-sample confidence of ``logits``: the top softmax probability (``'max_softmax'``) or the gap between the
    top two (``'margin'``)."""
    if kind not in CONFIDENCES:
        raise ValueError(f'unknown confidence {kind!r}: valid are {", ".join(CONFIDENCES)}')
    probs = logits.float().softmax(-1)
    if kind == 'max_softmax':
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


class CascadeOutput(NamedTuple):
    """A cascade's logits, and the route id that answered each sample."""
    logits: torch.Tensor
    route: torch.Tensor


class Cascade:
    """Run ``routes`` of an eval-mode ``model`` in turn, each answering the samples whose confidence reaches its
    threshold (the last answers the rest).

    Args:
        model: The stitched network (in eval mode).
        routes: Route ids, cheapest first usually.
        threshold: One threshold for every stage but the last, or one per such stage.
        confidence: ``'max_softmax'`` or ``'margin'``.
    """

    def __init__(self, model: StitchedNet, routes: Sequence[int], threshold: Union[float, Sequence[float]],
                 confidence: Confidence = 'max_softmax') -> None:
        model = unwrap_stitched(model, 'Cascade')
        routes = routes.tolist() if isinstance(routes, (torch.Tensor, np.ndarray)) else list(routes)
        if not routes:
            raise ValueError('a cascade needs at least one route')
        if confidence not in CONFIDENCES:
            raise ValueError(f'unknown confidence {confidence!r}: valid are {", ".join(CONFIDENCES)}')
        self.model = model
        self.routes = [model.check_stitch_id(k) for k in routes]
        if len(set(self.routes)) != len(self.routes):
            raise ValueError(f'routes {self.routes} repeat a route: a later stage would answer nothing new')
        stages = len(self.routes) - 1
        if isinstance(threshold, (torch.Tensor, np.ndarray)):
            threshold = threshold.tolist()
        thresholds = [threshold] * stages if isinstance(threshold, numbers.Number) else list(threshold)
        if len(thresholds) != stages:
            raise ValueError(f'got {len(thresholds)} thresholds for a cascade of {len(self.routes)} routes: give '
                             f'one, or one per route but the last ({stages})')
        for t in thresholds:
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0:
                raise ValueError(f'threshold {t!r} is not a confidence: expected a number in [0, 1] (the {confidence} '
                                 'of a softmax)')
        self.thresholds = [float(t) for t in thresholds]
        self.confidence = confidence
        fronts = [model.plan.routes[k].anchors[0] for k in self.routes]
        self.resume = cascade_resume(fronts, [first_segment_length(model, k) for k in self.routes])
        self.keep: list[set[int]] = [set() for _ in self.routes]
        for source, depth in self.resume:
            if source is not None:
                self.keep[source].add(depth)

    @classmethod
    def select(cls, model: StitchedNet, max_macs: float) -> Cascade:
        """The most accurate cascade recorded in ``model``'s loaded card whose mean MACs fit ``max_macs`` (see
        :func:`select_cascade`); ``ValueError`` when the model has no card or no recorded cascade fits."""
        from .catalogue import staleness
        model = unwrap_stitched(model, 'Cascade.select')
        if model.card is None:
            raise ValueError('the model has no route card: load one with model.load_card(...)')
        stale = staleness(model.card, model)
        if stale:
            raise StaleCardError(
                f'the route card is stale ({stale}): its cascade curves were measured on other weights')
        point = select_cascade(model.card, max_macs)
        return cls(model, point['routes'], point['threshold'], confidence=point['confidence'])

    def __call__(self, x: torch.Tensor) -> CascadeOutput:
        model = self.model
        if model.training:
            raise RuntimeError('a Cascade runs an eval-mode model: call model.eval() first')
        model.check_input(x)
        n = x.shape[0]
        answered = torch.full((n,), -1, dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)
        saved: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        out = None
        for i, stitch_id in enumerate(self.routes):
            source, depth = self.resume[i]
            if model.plan.routes[stitch_id].is_anchor:
                logits, kept = model(x[active], stitch_id=stitch_id), {}
            elif source is None:
                logits, kept = run_route(model, stitch_id, x[active], keep=sorted(self.keep[i]))
            else:
                positions, activations = saved[source]
                rows = torch.searchsorted(positions, active)
                logits, kept = run_route(model, stitch_id, activations[depth][rows], start=depth,
                                         keep=sorted(self.keep[i]))
            saved[i] = (active, kept)
            if out is None:
                out = logits.new_empty((n, *logits.shape[1:]))
            last = i == len(self.routes) - 1
            take = (torch.ones(len(active), dtype=torch.bool, device=x.device) if last
                    else confidence(logits, self.confidence) >= self.thresholds[i])
            out[active[take]] = logits[take]
            answered[active[take]] = stitch_id
            active = active[~take]
            if not len(active):
                break
        return CascadeOutput(out, answered)


@torch.no_grad()
def route_logits(model: StitchedNet, routes: Sequence[int], data: Iterable, progress: bool = True,
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each route's logits on every sample of ``data`` (an iterable of ``(images, targets)`` batches), computed
    once, and the targets: the input of :func:`sweep_thresholds`."""
    device = next(model.parameters()).device
    logits: list[list[torch.Tensor]] = [[] for _ in routes]
    targets = []
    with eval_mode(model):
        for images, target in tqdm(data, desc='route logits', disable=not progress):
            images = images.to(device)
            for i, k in enumerate(routes):
                logits[i].append(model(images, stitch_id=k).float().cpu())
            targets.append(torch.as_tensor(target).cpu())
    return [torch.cat(x) for x in logits], torch.cat(targets)


def sweep_thresholds(logits: Sequence[torch.Tensor], targets: torch.Tensor, stage_macs: Sequence[float],
                     thresholds: Sequence[float], confidence_kind: Confidence = 'max_softmax',
                     ) -> list[dict[str, float]]:
    """The accuracy / mean-MACs curve of a cascade over routes whose logits are ``logits`` (one tensor per stage),
    one point per threshold (the same for every stage but the last): ``{'threshold', 'top1' (%), 'mean_macs'}``.
    ``stage_macs[i]`` is what stage ``i`` costs a sample that reaches it (see
    :func:`timm_stitch.serving.cascade_stage_macs`). Pure: no model runs."""
    if len(logits) != len(stage_macs):
        raise ValueError(f'got logits of {len(logits)} stages but MACs of {len(stage_macs)}')
    conf = [confidence(x, confidence_kind) for x in logits]
    hits = [x.argmax(-1) == targets for x in logits]
    n = len(targets)
    curve = []
    for t in thresholds:
        active = torch.ones(n, dtype=torch.bool)
        correct, macs = 0, 0.0
        for i in range(len(logits)):
            macs += stage_macs[i] * int(active.sum())
            take = active if i == len(logits) - 1 else active & (conf[i] >= t)
            correct += int((hits[i] & take).sum())
            active = active & ~take
        curve.append({'threshold': float(t), 'top1': 100.0 * correct / n, 'mean_macs': macs / n})
    return curve


def add_cascade_curve(card: RouteCard, routes: Sequence[int], confidence_kind: Confidence,
                      curve: Sequence[dict[str, float]], dataset: str, note: Optional[str] = None) -> RouteCard:
    """A copy of ``card`` with the cascade curve of ``routes`` recorded (replacing one of the same routes and
    confidence): ``{'routes', 'confidence', 'dataset', 'curve', 'note'}``."""
    card = copy.deepcopy(card)
    entry: dict[str, Any] = {'routes': list(routes), 'confidence': confidence_kind, 'dataset': dataset,
                             'curve': [dict(p) for p in curve]}
    if note:
        entry['note'] = note
    card.cascades = [c for c in card.cascades
                     if (c['routes'], c['confidence']) != (entry['routes'], confidence_kind)] + [entry]
    return card


def select_cascade(card: RouteCard, max_macs: float) -> dict[str, Any]:
    """The recorded cascade point with the highest top-1 whose mean MACs fit ``max_macs``:
    ``{'routes', 'confidence', 'threshold', 'top1', 'mean_macs'}``; ``ValueError`` when none fits."""
    best = None
    for cascade in card.cascades:
        for point in cascade['curve']:
            if point['mean_macs'] <= max_macs and (best is None or point['top1'] > best['top1']):
                best = {'routes': cascade['routes'], 'confidence': cascade['confidence'], **point}
    if best is None:
        fewest = min((p['mean_macs'] for c in card.cascades for p in c['curve']), default=None)
        raise ValueError(f'no recorded cascade fits max_macs={max_macs:g}' + (
            f' (the cheapest needs {fewest:g})' if fewest is not None else ' (the card records no cascade)'))
    return best


def stage_macs_of(model: StitchedNet, routes: Sequence[int]) -> list[int]:
    """:func:`timm_stitch.serving.cascade_stage_macs` of ``model``'s counted routes."""
    from .macs import count_anchor_macs
    return cascade_stage_macs(model.counted_routes(), count_anchor_macs(model)[0], routes)
