"""Route cards: a versioned JSON record (``routes.json``) of every route's cost, accuracy and latency.

A card names the architecture and its anchors (with weight tags), lists each route (id, anchors, cuts, MACs,
params, top-1/top-5 with the dataset and whether they were measured here or reported elsewhere, latency per device
profile) and keeps provenance records (what was measured, by whom or what, when, on which checkpoint). Readers
also accept the official SN-Net JSON-lines results (``cfg_id``, ``flops``, ``params``, ``acc1``, ``acc5``).

``measured_with`` keys the accuracies to the weights fingerprint and the model arguments they were measured with
(see :mod:`timm_stitch.catalogue`): a model reports them only while both match. A card without it (written before
timm-stitch recorded it, or official results) is keyed to the model it is first loaded on, with a warning.
Rendering (README.md, plot) lives in :mod:`timm_stitch.card_readme`.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ._io import ForeignFilesError, atomic_write, file_sha256
from .card_checks import CardError, check_route_fields, check_routes
from .catalogue import card_key
from .unwrap import unwrap, unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = [
    'RouteCard', 'CardRoute', 'CardError', 'SCHEMA_VERSION', 'model_name',
]

SCHEMA_VERSION = 1
_COUNTED = 'macs, params'  # the provenance 'what' of the counts from_model makes
PathLike = Union[str, os.PathLike]


@dataclass
class CardRoute:
    """One route of a card. ``accuracy`` says where top1/top5 come from: ``{'dataset', 'source', ...}`` with
    ``source`` ``'measured'`` (here) or ``'reported'`` (by others); ``latency`` maps a device profile to
    ``{'median_ms', 'p90_ms', 'throughput'}``. Structure fields are ``None`` when the source gave none."""
    id: int
    anchors: Optional[list[int]] = None
    stage: Optional[int] = None
    cuts: Optional[list[list[int]]] = None
    macs: Optional[int] = None
    params: Optional[int] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    accuracy: Optional[dict[str, Any]] = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_route_fields(self)


@dataclass
class RouteCard:
    """Costs, accuracy and latency of every route of one stitched architecture (``routes.json``)."""
    model: Optional[str]
    routes: list[CardRoute]
    anchors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    #: what the accuracies hold for: ``{'weights_fingerprint': ..., 'model_args': {...}}``, or None (unknown)
    measured_with: Optional[dict[str, Any]] = None
    #: confidence cascades measured on this card's weights: ``{'routes', 'confidence', 'dataset', 'curve'}`` with
    #: ``curve`` a list of ``{'threshold', 'top1', 'mean_macs'}`` (see :mod:`timm_stitch.cascade`)
    cascades: list[dict[str, Any]] = field(default_factory=list)
    #: accuracies measured at other precisions than ``precision``'s (a quantized network's, a bf16 run's): per
    #: precision, ``{'measured_with': ..., 'routes': [{'id', 'top1', 'top5', 'accuracy'}, ...]}``
    precisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_routes(self.routes, self.settings, self.cascades)

    # ---- building ----

    @classmethod
    def from_model(cls, model: StitchedNet, checkpoint: Optional[PathLike] = None) -> RouteCard:
        """A card with the structure, MACs and params of ``model`` (counted by timm-stitch); ``checkpoint``, when
        given, is the weights file whose sha256 the provenance records. A wrapped model (``torch.compile``, DDP)
        is counted as the model inside."""
        from . import __version__
        from .input_size import model_input_size
        model = unwrap_stitched(model, 'RouteCard.from_model')
        routes = [
            CardRoute(id=r.id, anchors=list(r.anchors), stage=r.stage, cuts=[list(c) for c in r.cuts],
                      macs=r.macs, params=r.params)
            for r in model.routes()
        ]
        anchors = []
        for name, anchor in zip(model.anchor_names, model.anchors):
            cfg = getattr(anchor, 'pretrained_cfg', None) or {}
            tag = cfg.get('tag')
            anchors.append({'name': name, 'weights': f"{cfg.get('architecture', name)}.{tag}" if tag else None})
        settings = {
            'num_routes': model.num_routes,
            'input_size': list(model_input_size(model)),
            'final_norm_on_stitched_routes': model.final_norm_on_stitched_routes,
            'route_space': model.route_space,
        }
        record = {'what': _COUNTED, 'who': f'timm-stitch {__version__}', 'when': _now(),
                  'how': 'fvcore convention at batch 1 (timm_stitch.macs); params a route forward touches',
                  'checkpoint_sha256': file_sha256(checkpoint) if checkpoint is not None else None}
        return cls(model=model_name(model), routes=routes, anchors=anchors, settings=settings, provenance=[record],
                   measured_with=card_key(model))

    def keyed_to(self, model: StitchedNet) -> RouteCard:
        """A copy whose accuracies are keyed to ``model``'s current weights and arguments (for a card known to
        describe them, such as the reported card of an official release just loaded)."""
        card = copy.deepcopy(self)
        card.measured_with = card_key(unwrap_stitched(model, 'RouteCard.keyed_to'))
        return card

    def without_accuracy(self) -> RouteCard:
        """A copy with no accuracies (nor their provenance and key): what still holds when they are stale."""
        card = copy.deepcopy(self)
        for entry in card.routes:
            entry.top1 = entry.top5 = entry.accuracy = None
        card.cascades, card.precisions = [], {}
        card.provenance = [p for p in card.provenance if p.get('what') != 'accuracy']
        card.measured_with = None
        return card

    @property
    def precision(self) -> str:
        """The precision ``top1``/``top5`` were measured at (``'fp32'`` for cards that record none)."""
        return ((self.measured_with or {}).get('model_args') or {}).get('precision', 'fp32')

    @property
    def held_precisions(self) -> list[str]:
        """Every precision this card holds accuracies of, its own first."""
        return ([self.precision] if self.has_accuracy else []) + sorted(set(self.precisions) - {self.precision})

    def at_precision(self, precision: str) -> RouteCard:
        """The card as seen at ``precision``: a copy whose top1/top5 (and ``measured_with``) are those measured
        at that precision, the others kept in ``precisions``; this card itself when it holds none there."""
        if precision == self.precision or precision not in self.precisions:
            return self
        card = copy.deepcopy(self)
        section = card.precisions.pop(precision)
        if card.has_accuracy:
            card.precisions[card.precision] = card._section()
        entries = {r['id']: r for r in section['routes']}
        for entry in card.routes:
            values = entries.get(entry.id, {})
            entry.top1, entry.top5, entry.accuracy = values.get('top1'), values.get('top5'), values.get('accuracy')
        card.measured_with = section['measured_with']
        card.cascades = []  # measured with the other precision's weights
        return card

    def _section(self) -> dict[str, Any]:
        """This card's own accuracies as an entry of ``precisions``."""
        return {'measured_with': copy.deepcopy(self.measured_with),
                'routes': [{'id': r.id, 'top1': r.top1, 'top5': r.top5, 'accuracy': copy.deepcopy(r.accuracy)}
                           for r in self.routes if r.top1 is not None or r.top5 is not None]}

    @property
    def has_accuracy(self) -> bool:
        return any(r.top1 is not None or r.top5 is not None for r in self.routes)

    def route(self, stitch_id: int) -> Optional[CardRoute]:
        """The entry for route ``stitch_id``, or None when the card has none."""
        return next((r for r in self.routes if r.id == stitch_id), None)

    @property
    def latency_profiles(self) -> list[str]:
        return sorted({p for r in self.routes for p in r.latency})

    def with_accuracy(
            self, values: Union[RouteCard, Mapping[int, tuple[Optional[float], Optional[float]]]],
            dataset: str, source: str, **record: Any,
    ) -> RouteCard:
        """A copy with top1/top5 from ``values`` (another card or ``{id: (top1, top5)}``), tagged with the dataset
        and ``source`` (``'measured'`` or ``'reported'``); ``record`` (who, checkpoint_sha256, ...) goes into the
        provenance. The copy's ``measured_with`` is that of a ``values`` card holding one, else this card's for
        ``'measured'`` values (measured on this card's model), else None: reported values are for weights this card
        cannot name (see :meth:`keyed_to`)."""
        if source not in ('measured', 'reported'):
            raise ValueError(f"source must be 'measured' or 'reported', got {source!r}")
        card = copy.deepcopy(self)
        if isinstance(values, RouteCard) and values.measured_with is not None:
            card._take_key(values)
        elif source == 'reported':
            card.measured_with = None
        if isinstance(values, RouteCard):
            values = {r.id: (r.top1, r.top5) for r in values.routes if r.top1 is not None or r.top5 is not None}
        card._drop_replaced_accuracy(values)
        for stitch_id, (top1, top5) in values.items():
            entry = card._entry(stitch_id)
            entry.top1, entry.top5 = top1, top5
            entry.accuracy = {'dataset': dataset, 'source': source}
            check_route_fields(entry)
        card.provenance.append({'what': 'accuracy', 'dataset': dataset, 'source': source, 'when': _now(), **record})
        return card

    def with_measurements(self, other: RouteCard) -> RouteCard:
        """A copy with the accuracies (where ``other`` has any), latency profiles, provenance records and cascade
        curves of ``other`` merged in; everything ``other`` does not hold is kept. ``other``'s MACs, params and
        structure are not taken: this card's own counts stand. Accuracies (and cascades) travel with their
        ``measured_with``: the copy takes ``other``'s, and those of this card measured with another one are
        dropped; but accuracies measured at another precision than this card's are kept beside its own
        (``precisions``), so that one card holds a front per precision."""
        card, other = copy.deepcopy(self), copy.deepcopy(other)
        card.precisions.update((k, v) for k, v in other.precisions.items() if k != card.precision)
        if other.has_accuracy and self.has_accuracy and other.precision != self.precision:
            card.precisions[other.precision] = other._section()  # kept beside this card's own precision
            for entry in other.routes:
                entry.top1 = entry.top5 = None
        accuracy = {r.id: r for r in other.routes if r.top1 is not None or r.top5 is not None}
        if accuracy:
            card._take_key(other)
        card._drop_replaced_accuracy(accuracy)
        profiles = set(other.latency_profiles)
        card.provenance = [p for p in card.provenance if p.get('profile') not in profiles]
        for source in other.routes:
            if source.id not in accuracy and not source.latency:
                continue
            entry = card._entry(source.id)
            if source.id in accuracy:
                entry.top1, entry.top5 = source.top1, source.top5
                entry.accuracy = copy.deepcopy(source.accuracy)
            entry.latency.update(copy.deepcopy(source.latency))
        card.provenance += [copy.deepcopy(p) for p in other.provenance
                            if p.get('what') != _COUNTED and p not in card.provenance]
        merged = {(tuple(c['routes']), c['confidence']) for c in other.cascades}
        card.cascades = [c for c in card.cascades if (tuple(c['routes']), c['confidence']) not in merged
                         ] + copy.deepcopy(other.cascades)
        return card

    def with_latency(self, profile: str, stats: Mapping[int, Mapping[str, float]], record: Mapping[str, Any]
                     ) -> RouteCard:
        """A copy with ``stats[id]`` (median_ms, p90_ms, throughput) stored under ``profile`` for each route."""
        card = copy.deepcopy(self)
        for stitch_id, values in stats.items():
            entry = card._entry(stitch_id)
            entry.latency[profile] = dict(values)
            check_route_fields(entry)
            entry.latency[profile] = {k: round(float(v), 4) for k, v in values.items()}
        card.provenance = [p for p in card.provenance if p.get('profile') != profile] + [dict(record)]
        return card

    def _take_key(self, other: RouteCard) -> None:
        """Adopt ``other``'s ``measured_with`` (when it has one), forgetting accuracies measured with another."""
        if other.measured_with is None or other.measured_with == self.measured_with:
            return
        if self.has_accuracy and self.measured_with is not None:
            warnings.warn('merging accuracies measured on other weights or model arguments: the older ones are '
                          'dropped', stacklevel=3)
            cleared = self.without_accuracy()
            self.routes, self.provenance, self.cascades = cleared.routes, cleared.provenance, cleared.cascades
        self.measured_with = copy.deepcopy(other.measured_with)

    def _drop_replaced_accuracy(self, ids: Mapping[int, Any]) -> None:
        """Forget the accuracy provenance once every route holding an accuracy gets a new one from ``ids``."""
        if {r.id for r in self.routes if r.top1 is not None or r.top5 is not None} <= set(ids):
            self.provenance = [p for p in self.provenance if p.get('what') != 'accuracy']

    def _entry(self, stitch_id: int) -> CardRoute:
        entry = self.route(stitch_id)
        if entry is None:
            entry = CardRoute(id=stitch_id)
            self.routes.append(entry)
            check_routes(self.routes, self.settings, [])
            self.routes.sort(key=lambda r: r.id)
        return entry

    # ---- checking against a model ----

    def check_model(self, model: StitchedNet) -> None:
        """Raise ``ValueError`` unless this card describes ``model`` (same architecture, anchors and routes)."""
        model = unwrap_stitched(model, 'RouteCard.check_model')
        name = model_name(model)
        if self.model is not None and self.model != name:
            raise ValueError(f'this route card is for {self.model!r}, not for {name!r}')
        names = [a.get('name') for a in self.anchors]
        if names and names != list(model.anchor_names):
            raise ValueError(f'this route card is for anchors {names}, the model has {list(model.anchor_names)}')
        space = self.settings.get('route_space')
        if space is not None and space != model.route_space:
            raise ValueError(f'this route card is for route_space={space!r}, the model has {model.route_space!r}')
        expected = self.settings.get('num_routes')
        if expected is not None and expected != model.num_routes:
            raise ValueError(f'this route card has {expected} routes, the model has {model.num_routes}')
        for entry in self.routes:
            if not 0 <= entry.id < model.num_routes:
                raise ValueError(f'route card entry {entry.id} is out of range: the model has routes '
                                 f'0..{model.num_routes - 1}')
            route = model.plan.routes[entry.id]
            if entry.anchors is not None and (tuple(entry.anchors) != route.anchors
                                              or tuple(map(tuple, entry.cuts or ())) != route.cuts):
                raise ValueError(f'route card entry {entry.id} ({entry.anchors}, cuts {entry.cuts}) does not match '
                                 f'the model route ({list(route.anchors)}, cuts {list(route.cuts)})')
        final_norm = self.settings.get('final_norm_on_stitched_routes')
        if final_norm is not None and final_norm != model.final_norm_on_stitched_routes and not self.measured_with:
            warnings.warn(f'route card was made with final_norm_on_stitched_routes={final_norm}, the model has '
                          f'{model.final_norm_on_stitched_routes}: its accuracies may not apply', stacklevel=3)

    # ---- reading and writing ----

    def to_dict(self) -> dict[str, Any]:
        return {
            'schema_version': self.schema_version,
            'model': self.model,
            'anchors': self.anchors,
            'settings': self.settings,
            'routes': [asdict(r) for r in self.routes],
            'provenance': self.provenance,
            'measured_with': self.measured_with,
            'cascades': self.cascades,
            'precisions': self.precisions,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteCard:
        """A card from its ``to_dict`` form; :class:`CardError` (a ``ValueError``) naming the route and field of a
        value of the wrong type or out of range."""
        version = data.get('schema_version')
        if version != SCHEMA_VERSION:
            raise ValueError(f'unsupported route card schema_version {version!r}: this timm-stitch reads version '
                             f'{SCHEMA_VERSION}')
        routes = data.get('routes', [])
        if not isinstance(routes, list):
            raise CardError(f'field routes must be a list, got {type(routes).__name__}')
        return cls(
            model=data.get('model'),
            routes=[_card_route(r, f'routes[{i}]') for i, r in enumerate(routes)],
            anchors=list(data.get('anchors', [])),
            settings=dict(data.get('settings', {})),
            provenance=list(data.get('provenance', [])),
            measured_with=data.get('measured_with'),
            cascades=list(data.get('cascades', [])),
            precisions=dict(data.get('precisions', {})),
        )

    def save(self, path: PathLike) -> None:
        """Write ``routes.json`` atomically (a temp file renamed into place); an existing file is replaced only when
        it is a route card (:func:`check_card_target`)."""
        check_card_target(path)
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + '\n')

    @classmethod
    def load(cls, path: PathLike, model: Optional[str] = None, dataset: str = 'imagenet-1k/validation') -> RouteCard:
        """Read a ``routes.json`` card, or official SN-Net JSON-lines results (one object per line with
        ``cfg_id``/``flops``/``acc1``...; ``model`` names the architecture and ``dataset`` the accuracy's
        dataset, since that format records neither)."""
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        try:
            if isinstance(data, dict) and 'schema_version' in data:
                return cls.from_dict(data)
            return cls.from_jsonl(text, model=model, dataset=dataset, source_name=os.fspath(path))
        except CardError as e:
            raise CardError(f'route card {os.fspath(path)}: {e}') from None

    @classmethod
    def from_jsonl(cls, text: str, model: Optional[str] = None, dataset: str = 'imagenet-1k/validation',
                   source_name: str = '<text>') -> RouteCard:
        """A card from official JSON-lines results; accuracies are marked ``reported``. A truncated last line
        (an interrupted evaluation) is skipped with a warning."""
        lines = [line for line in text.splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1 and rows:
                    warnings.warn(f'{source_name}: skipping a truncated last line', stacklevel=3)
                    break
                raise ValueError(f'{source_name} line {i + 1} is neither a route card nor JSON-lines results: {e}'
                                 ) from e
        if not rows or not all(isinstance(r, dict) and 'cfg_id' in r for r in rows):
            raise ValueError(f'{source_name}: expected a routes.json card (with schema_version) or JSON lines '
                             'with a cfg_id each')
        routes = []
        for r in rows:
            has_acc = r.get('acc1') is not None or r.get('acc5') is not None
            routes.append(CardRoute(
                id=r['cfg_id'], macs=r.get('flops'), params=r.get('params'), top1=r.get('acc1'),
                top5=r.get('acc5'), accuracy={'dataset': dataset, 'source': 'reported'} if has_acc else None))
        routes.sort(key=lambda e: e.id)
        record = {'what': 'macs, params, accuracy', 'who': 'official SN-Net results file', 'source': source_name,
                  'when': None}
        return cls(model=model, routes=routes, provenance=[record])


def _card_route(data: Any, where: str) -> CardRoute:
    """A ``CardRoute`` from its dict, with a :class:`CardError` naming ``where`` and the field when it is bad."""
    if not isinstance(data, Mapping):
        raise CardError(f'{where} must be a mapping, got {type(data).__name__} {data!r}')
    unknown = set(data) - set(CardRoute.__dataclass_fields__)
    if unknown or 'id' not in data:
        what = f'unknown fields {sorted(unknown)}' if unknown else 'no field id'
        raise CardError(f'{where} (route {data.get("id")!r}) has {what}: valid are '
                        f'{", ".join(CardRoute.__dataclass_fields__)}')
    return CardRoute(**data)


def model_name(model: StitchedNet) -> str:
    """The registered architecture name of ``model``, or a name built from its anchors."""
    model = unwrap(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or 'stitched(' + ', '.join(model.anchor_names) + ')'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


def check_card_target(path: PathLike) -> None:
    """Refuse to write a card to ``path`` when it is a folder, or a file that is not a route card (a user's file of
    that name is never replaced): raises before anything is written or measured."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path} is a folder: give the card a file name, e.g. '
                                f'{os.path.join(path, "routes.json")}')
    if not os.path.lexists(path):
        return
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and 'schema_version' in data):
        raise ForeignFilesError(f'{path} is not a route card timm-stitch wrote: nothing was written. Write the card '
                                'to another file (or move that one away)')
