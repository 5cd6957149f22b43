"""Checks of route card contents as they are read or merged: types, finite values, ids in range.

A card value of the wrong type or out of range (a ``NaN`` top-1, a string top-1, an id ``"3"``) would otherwise
surface much later, or not at all (``NaN`` compares false with everything, so a NaN route wins selections). Every
way a card is made (``routes.json``, official JSON-lines results, pretrained and Hub cards, which are read with
:meth:`RouteCard.load`, merges of accuracies and latencies) runs these checks and raises :class:`CardError`,
naming the route and the field.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

from .errors import CardError

__all__ = ['CardError', 'check_route_fields', 'check_routes', 'check_number']

#: top-1/top-5 are percentages
ACCURACY_RANGE = (0.0, 100.0)


def check_number(value: Any, what: str, low: float = 0.0, high: float = math.inf, integer: bool = False) -> None:
    """Raise :class:`CardError` naming ``what`` unless ``value`` is a finite real number (an int when ``integer``)
    in ``[low, high]``."""
    kind = 'an int' if integer else 'a finite number'
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise CardError(f'{what} must be {kind}, got {type(value).__name__} {value!r}')
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f'>= {low:g}' if high == math.inf else f'in [{low:g}, {high:g}]'
        raise CardError(f'{what} must be {kind} {bounds}, got {value!r}')


def _int_list(value: Any, what: str, depth: int = 1) -> None:
    if not isinstance(value, (list, tuple)):
        raise CardError(f'{what} must be a list, got {type(value).__name__} {value!r}')
    for i, item in enumerate(value):
        if depth > 1:
            _int_list(item, f'{what}[{i}]', depth - 1)
        else:
            check_number(item, f'{what}[{i}]', integer=True)


def check_route_fields(entry: Any, where: Optional[str] = None) -> None:
    """Check one card route's fields (a ``CardRoute``); ``where`` names it (default: ``route {id}``)."""
    where = where or f'route {entry.id!r}'
    check_number(entry.id, f'{where}: field id', integer=True)
    for name in ('anchors', 'stage', 'cuts'):
        value = getattr(entry, name)
        if value is None:
            continue
        if name == 'stage':
            check_number(value, f'{where}: field stage', integer=True)
        else:
            _int_list(value, f'{where}: field {name}', depth=2 if name == 'cuts' else 1)
    for name in ('macs', 'params'):
        if getattr(entry, name) is not None:
            check_number(getattr(entry, name), f'{where}: field {name}')
    for name in ('top1', 'top5'):
        if getattr(entry, name) is not None:
            check_number(getattr(entry, name), f'{where}: field {name} (a percentage)', *ACCURACY_RANGE)
    if entry.accuracy is not None and not isinstance(entry.accuracy, Mapping):
        raise CardError(f'{where}: field accuracy must be a mapping, got {type(entry.accuracy).__name__}')
    if not isinstance(entry.latency, Mapping):
        raise CardError(f'{where}: field latency must be a mapping of profiles, got {type(entry.latency).__name__}')
    for profile, stats in entry.latency.items():
        if not isinstance(stats, Mapping):
            raise CardError(f'{where}: field latency[{profile!r}] must be a mapping, got {type(stats).__name__}')
        for key, value in stats.items():
            check_number(value, f'{where}: field latency[{profile!r}][{key!r}]')


def check_routes(routes: list, settings: Mapping[str, Any], cascades: list) -> None:
    """Check a card's routes as a whole (ids unique and below ``settings['num_routes']`` when given) and the
    numbers of its cascade curves."""
    num_routes = settings.get('num_routes')
    if num_routes is not None:
        check_number(num_routes, 'settings: field num_routes', integer=True)
    seen: set[int] = set()
    for entry in routes:
        if entry.id in seen:
            raise CardError(f'route {entry.id}: field id repeats an earlier route of the card')
        seen.add(entry.id)
        if num_routes is not None and entry.id >= num_routes:
            raise CardError(f'route {entry.id}: field id is out of range: the card has routes 0..{num_routes - 1}')
    for i, cascade in enumerate(cascades):
        if not isinstance(cascade, Mapping) or not isinstance(cascade.get('curve', []), list):
            raise CardError(f'cascades[{i}] must be a mapping with a list curve, got {cascade!r}')
        for j, point in enumerate(cascade.get('curve', [])):
            for key, (low, high) in (('threshold', (-math.inf, math.inf)), ('top1', ACCURACY_RANGE),
                                     ('mean_macs', (0, math.inf))):
                if key in point:
                    check_number(point[key], f'cascades[{i}] curve[{j}]: field {key}', low, high)
