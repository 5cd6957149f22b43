"""The routes of a stitched network read through its route card: annotation, selection and Pareto fronts.

A card's accuracies hold only for the weights and model arguments they were measured with
(``RouteCard.measured_with``: the weights fingerprint and ``num_classes``, ``in_chans``, ``input_size``,
``final_norm_on_stitched_routes``). The catalogue compares them with the model at query time and reports no accuracy
while they differ, saying why in ``route.extra['accuracy_stale']``. Latency is read from the profile of the model's
current device, dtype and batch size, also at query time, so that ``.to()`` is followed.
"""
from __future__ import annotations

import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from .errors import MissingMeasurementError, StaleCardError
from .fingerprint import weights_fingerprint
from .routes import Route
from .selection import mark_dominated, pareto_front, select_route

if TYPE_CHECKING:
    from .cards import RouteCard
    from .model import StitchedNet

__all__ = ['RouteCatalogue', 'MissingMeasurementError', 'card_routes', 'card_key', 'model_args', 'weights_key',
           'state_key', 'forget_weights', 'staleness']

#: per model: (signature of its tensors, fingerprint), so that routes() hashes the weights only after they change
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: short names of the float dtypes a model can run in, as cards record precisions
_DTYPE_PRECISIONS = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float64: 'fp64'}


def precision(model: StitchedNet) -> str:
    """The precision ``model`` computes in: its quantization scheme (``'int8-dyn'``, ``'int8-wo'``), else its
    float dtype (``'fp32'``, ``'bf16'``, ``'fp16'``)."""
    if model.quant_scheme is not None:
        return model.quant_scheme
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return _DTYPE_PRECISIONS.get(dtype, str(dtype).removeprefix('torch.'))


def model_args(model: StitchedNet) -> dict[str, Any]:
    """The model arguments a card's accuracies depend on besides the weights (the precision among them)."""
    from .input_size import model_input_size
    return {'num_classes': model.num_classes, 'in_chans': model.in_chans,
            'input_size': list(model_input_size(model)),
            'final_norm_on_stitched_routes': model.final_norm_on_stitched_routes, 'precision': precision(model)}


def _signature(state: dict[str, torch.Tensor]) -> Optional[tuple]:
    """Where each tensor lives and how often it was written in place (``_version``): changes whenever a value can
    have changed. None for inference tensors, which keep no version counter."""
    try:
        return tuple((k, v.data_ptr(), v._version, v.dtype, v.device) for k, v in state.items())
    except RuntimeError:
        return None


def weights_key(model: StitchedNet) -> str:
    """The fingerprint a card's accuracies are keyed to: :func:`weights_fingerprint` of the weights in float32, so
    that a move to another device, or a cast that loses nothing (fp16 weights shipped and loaded as float32), keeps
    it. Cached per model until a tensor is replaced or written in place."""
    state = model.state_dict()
    signature = _signature(state)
    cached = _FINGERPRINTS.get(model)
    if signature is not None and cached is not None and cached[0] == signature:
        return cached[1]
    key = state_key(state)
    if signature is not None:
        _FINGERPRINTS[model] = (signature, key)
    return key


def state_key(state: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint :func:`weights_key` gives a model whose state dict is ``state``."""
    return weights_fingerprint({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def forget_weights(model: StitchedNet) -> None:
    """Drop ``model``'s cached fingerprint (its weights were changed through its own API)."""
    _FINGERPRINTS.pop(model, None)


def card_key(model: StitchedNet) -> dict[str, Any]:
    """What a card measured on ``model`` is keyed to: its weights fingerprint and model arguments."""
    return {'weights_fingerprint': weights_key(model), 'model_args': model_args(model)}


def staleness(card: Optional[RouteCard], model: StitchedNet) -> Optional[str]:
    """Why ``card``'s accuracies do not hold for ``model`` (other model arguments, other weights), or None."""
    key = card.measured_with if card is not None else None
    if not key or not card.has_accuracy:
        return None
    now, held = model_args(model), dict(key.get('model_args') or {})
    if model.quant_scheme is not None:
        held.setdefault('precision', 'fp32')  # cards written before precisions were recorded are float32's
    changed = [f'{name}={value!r} (the model has {now.get(name)!r})'
               for name, value in held.items() if now.get(name) != value]
    if changed:
        reason = 'the card was measured with ' + ', '.join(changed)
        if now['precision'] != held.get('precision', now['precision']):
            hint = f' --quantize {now["precision"]}' if model.quant_scheme is not None else ''
            reason += (f'; it holds accuracies at {", ".join(card.held_precisions)}: measure this precision with '
                       f'timm-stitch validate{hint}')
        return reason
    expected = key.get('weights_fingerprint')
    if expected is not None:
        actual = weights_key(model)
        if actual != expected:
            return (f'the card was measured on other weights (fingerprint {expected}, the model has {actual}): '
                    'reset_classifier, init_stitches, load_state_dict, training or a lossy dtype cast change them')
    return None


class RouteCatalogue:
    """Routes (structure, params, MACs) annotated with a card's accuracy and the latency of one profile.

    Args:
        routes: The counted routes.
        card: The route card, or None.
        profile: The latency profile to read (device, dtype and batch size), or None for no latency.
        stale: Why the card's accuracies do not hold (see :func:`staleness`), or None when they do.
        precision: The precision the routes run at (``extra['precision']``), when known.
    """

    def __init__(self, routes: Sequence[Route], card: Optional[RouteCard] = None, profile: Optional[str] = None,
                 stale: Optional[str] = None, precision: Optional[str] = None):
        self.routes, self.card, self.profile, self.stale = list(routes), card, profile, stale
        self.precision = precision

    @classmethod
    def of(cls, model: StitchedNet) -> RouteCatalogue:
        """The catalogue of ``model`` as it is now: its loaded card, checked against its weights and arguments,
        and the latency profile of its current device, dtype and card batch size."""
        card, own = model.card, precision(model)
        if card is not None:
            card = card.at_precision(own)
        return cls(model.counted_routes(), card, model.latency_profile if card is not None else None,
                   staleness(card, model), own)

    def annotated(self) -> list[Route]:
        """The routes with the card's top1/top5 (unless stale) and latency, dominated routes marked."""
        annotated = []
        for route in self.routes:
            entry = self.card.route(route.id) if self.card is not None else None
            if self.precision is not None:
                route = replace(route, extra={**route.extra, 'precision': self.precision})
            if entry is None:
                annotated.append(replace(route, top1=None, top5=None, latency_ms=None))
                continue
            latency = entry.latency.get(self.profile, {}) if self.profile else {}
            stale = self.stale if entry.top1 is not None or entry.top5 is not None else None
            extra = {**route.extra, 'accuracy': None if stale else entry.accuracy, 'accuracy_stale': stale,
                     'latency_profile': self.profile if latency else None,
                     'latency_p90_ms': latency.get('p90_ms'), 'throughput': latency.get('throughput')}
            annotated.append(replace(route, top1=None if stale else entry.top1, top5=None if stale else entry.top5,
                                     latency_ms=latency.get('median_ms'), extra=extra))
        return mark_dominated(annotated)

    def select(
            self,
            max_macs: Optional[float] = None,
            max_params: Optional[float] = None,
            max_latency_ms: Optional[float] = None,
            min_top1: Optional[float] = None,
    ) -> Route:
        """The best route meeting every bound (see :func:`timm_stitch.selection.select_route`). Raises
        ``ValueError`` when a bound needs what the card cannot give: accuracies that are stale, or latencies of a
        profile it does not hold."""
        if min_top1 is not None and self.stale:
            raise StaleCardError(
                f'cannot select by min_top1: the route card is stale, {self.stale}. Measure the routes '
                'again (timm-stitch validate) and load the new card')
        routes = self.annotated()
        if max_latency_ms is not None and self.card is not None:
            self._require(routes, 'latency_ms', 'cannot select by max_latency_ms')
        return select_route(routes, max_macs, max_params, max_latency_ms, min_top1)

    def pareto(self, x: str = 'macs', y: str = 'top1') -> list[Route]:
        """The routes no other route beats on both ``x`` (lower is better) and ``y`` (higher is better), sorted by
        ``x``. Raises ``ValueError`` when ``y`` is an accuracy and the card is stale, and
        :class:`MissingMeasurementError` when no route has an ``x`` or ``y`` value (no latency for the model's
        profile, no accuracies), naming what to measure."""
        if self.stale and y in ('top1', 'top5'):
            raise StaleCardError(f'no {y} Pareto front: the route card is stale, {self.stale}')
        routes = self.annotated()
        pareto_front(routes, x, y)  # checks the field names first
        for field in (x, y):
            self._require(routes, field, f'no {x}/{y} Pareto front')
        return pareto_front(routes, x, y)

    def _require(self, routes: Sequence[Route], field: str, what: str) -> None:
        """Raise :class:`MissingMeasurementError` (``what``, then why and what to do) unless a route has ``field``."""
        if any(getattr(r, field) is not None for r in routes):
            return
        if field == 'latency_ms':
            fix = ('measure them with timm_stitch.profile(model) (or timm-stitch profile) on this device and dtype, '
                   'then load that card')
            if self.card is not None:
                held = ', '.join(self.card.latency_profiles) or 'none'
                raise MissingMeasurementError(
                    f'{what}: the route card has no latency profile {self.profile!r} (it holds: {held}); {fix}, or '
                    'load the card with the latency_profile to use')
            raise MissingMeasurementError(f'{what}: the model has no route card, so no route latency; {fix}')
        if field in ('top1', 'top5'):
            raise MissingMeasurementError(f'{what}: no route has a {field} (load a route card with accuracies: '
                                          'model.load_card(...), or measure them with timm-stitch validate)')


def card_routes(card: RouteCard, latency_profile: Optional[str] = None) -> list[Route]:
    """The card's own entries as ``Route`` records (latency from ``latency_profile``), with ``dominated`` marked."""
    routes = [Route(id=e.id, anchors=tuple(e.anchors or ()), cuts=tuple(map(tuple, e.cuts or ())), stage=e.stage,
                    params=e.params, macs=e.macs) for e in card.routes]
    return RouteCatalogue(routes, card, latency_profile).annotated()
