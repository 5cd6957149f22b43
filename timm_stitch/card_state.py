"""What a stitched network knows of its routes' measurements, and the queries that read it.

:class:`RouteCardMixin` holds a model's route card, the latency profile it reads and the fingerprint of its weights
(cached on the model itself, keyed by where each tensor lives and how often it was written, so that it never
outlives the weights it was taken of), and gives the model ``routes()``, ``select_stitch``, ``pareto`` and
``load_card``. It sits below :mod:`timm_stitch.model`: the model runs routes, this reads cards about them.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Optional, Union

import torch

from .cards import RouteCard, model_name
from .catalogue import RouteCatalogue, state_key
from .profiling import device_profile
from .routes import Route
from .selection import Budget

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['RouteCardMixin']


def _signature(state: dict[str, torch.Tensor]) -> Optional[tuple]:
    """Where each tensor lives and how often it was written in place (``_version``): changes whenever a value can
    have changed. None for inference tensors, which keep no version counter."""
    try:
        return tuple((k, v.data_ptr(), v._version, v.dtype, v.device) for k, v in state.items())
    except RuntimeError:
        return None


class RouteCardMixin:
    """The route card, latency profile and weights fingerprint of a stitched network, and the queries over them.

    Mixed into :class:`timm_stitch.StitchedNet` (an ``nn.Module`` with ``counted_routes``, ``set_stitch`` and
    ``quant_scheme``).
    """

    _card: Optional[RouteCard] = None
    _card_latency: tuple[Optional[str], int] = (None, 1)
    #: (signature of the tensors, fingerprint): the fingerprint while the signature holds
    _weights_key_cache: Optional[tuple[tuple, str]] = None

    @property
    def card(self) -> Optional[RouteCard]:
        """The loaded route card (accuracy and latency of the routes), or None."""
        return self._card

    @property
    def latency_profile(self: StitchedNet) -> str:
        """The latency profile ``routes()`` reads: the one given to ``load_card``, else that of this model's
        current device and dtype (or quantization scheme) at the card's batch size."""
        pinned, batch_size = self._card_latency
        if pinned is not None:
            return pinned
        param = next(p for p in self.parameters() if p.is_floating_point())
        return device_profile(param.device, batch_size, param.dtype, self.quant_scheme)

    def load_card(self: StitchedNet, card: Union[RouteCard, str, os.PathLike], latency_profile: Optional[str] = None,
                  batch_size: int = 1) -> None:
        """Attach a route card (a ``RouteCard``, a ``routes.json`` path or official JSON-lines results) so that
        ``routes()`` reports its top1/top5 (while its weights and model arguments are this model's) and the latency
        measured under ``latency_profile`` (default: this model's device and dtype at the time of the call, at
        ``batch_size``). A card that records no weights (older cards, official results) is keyed to this model's
        current weights, with a warning. Raises ``ValueError`` when the card is for another model."""
        if not isinstance(card, RouteCard):
            card = RouteCard.load(card, model=model_name(self))
        card.check_model(self)
        if card.measured_with is None and card.has_accuracy:
            warnings.warn('the route card records no weights fingerprint: its accuracies are taken to be those of '
                          'the weights the model has now', stacklevel=2)
            card = card.keyed_to(self)
        self._card, self._card_latency = card, (latency_profile, batch_size)

    def routes(self: StitchedNet) -> list[Route]:
        """Every route with its anchors, cuts, the parameters its forward uses and its MACs; top1/top5/latency_ms/
        dominated come from the loaded card (see ``load_card``), read now: accuracy only while the card's weights
        and model arguments match the model's (else ``extra['accuracy_stale']`` says why), latency of the model's
        current device and dtype."""
        return RouteCatalogue.of(self).annotated()

    def route(self: StitchedNet, stitch_id: Optional[int] = None) -> Route:
        """The route record of ``stitch_id`` (default: the active route)."""
        return self.routes()[self.resolve_stitch_id(stitch_id)]

    def select_stitch(
            self: StitchedNet,
            max_macs: Optional[float] = None,
            max_params: Optional[float] = None,
            max_latency_ms: Optional[float] = None,
            min_top1: Optional[float] = None,
    ) -> Route:
        """Make the route the bounds ask for active and return it: the most accurate within the budgets (``max_*``),
        or with ``min_top1`` (percent) alone the cheapest reaching it (see :mod:`timm_stitch.selection`); raises
        ``ValueError`` when no route fits, for a fractional ``min_top1``, or when a bound needs stale accuracies or
        a latency profile the card lacks."""
        route = RouteCatalogue.of(self).select(Budget(max_macs, max_params, max_latency_ms, min_top1))
        self.set_stitch(route.id)
        return route

    def pareto(self: StitchedNet, x: str = 'macs', y: str = 'top1') -> list[Route]:
        """The routes no other route beats on both ``x`` (``'macs'``, ``'params'``, ``'latency_ms'``; lower is
        better) and ``y`` (``'top1'``, ``'top5'``), sorted by ``x``; ``MissingMeasurementError`` (a ``ValueError``)
        naming the profile or card needed when no route has an ``x`` or ``y`` value."""
        return RouteCatalogue.of(self).pareto(x, y)

    def weights_key(self: StitchedNet) -> str:
        """The fingerprint a card's accuracies are keyed to (:func:`timm_stitch.catalogue.state_key` of the state
        dict), cached until a tensor is replaced or written in place."""
        state = self.state_dict()
        signature = _signature(state)
        cached = self._weights_key_cache
        if signature is not None and cached is not None and cached[0] == signature:
            return cached[1]
        key = state_key(state)
        self._weights_key_cache = None if signature is None else (signature, key)
        return key

    def _weights_changed(self) -> None:
        """Forget the cached weights fingerprint, so that the card's accuracies are checked against the new ones."""
        self._weights_key_cache = None
