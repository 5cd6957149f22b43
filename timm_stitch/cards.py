"""Route cards: a versioned JSON record (``routes.json``) of every route's cost, accuracy and latency.

A card names the architecture and its anchors (with weight tags), lists each route (id, anchors, cuts, MACs,
params, top-1/top-5 with the dataset and whether they were measured here or reported elsewhere, latency per device
profile) and keeps provenance records (what was measured, by whom or what, when, on which checkpoint). Readers
also accept the official SN-Net JSON-lines results (``cfg_id``, ``flops``, ``params``, ``acc1``, ``acc5``).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ._io import atomic_write, file_sha256
from .routes import macs_unit
from .unwrap import unwrap, unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = [
    'RouteCard', 'CardRoute', 'SCHEMA_VERSION', 'model_name', 'file_sha256', 'atomic_write', 'card_routes',
    'render_readme', 'plot_card', 'write_card_dir',
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


@dataclass
class RouteCard:
    """Costs, accuracy and latency of every route of one stitched architecture (``routes.json``)."""
    model: Optional[str]
    routes: list[CardRoute]
    anchors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    # ---- building ----

    @classmethod
    def from_model(cls, model: StitchedNet, checkpoint: Optional[PathLike] = None) -> RouteCard:
        """A card with the structure, MACs and params of ``model`` (counted by timm-stitch); ``checkpoint``, when
        given, is the weights file whose sha256 the provenance records. A wrapped model (``torch.compile``, DDP)
        is counted as the model inside."""
        from . import __version__
        from .macs import model_input_size
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
        }
        record = {'what': _COUNTED, 'who': f'timm-stitch {__version__}', 'when': _now(),
                  'how': 'fvcore convention at batch 1 (timm_stitch.macs); params a route forward touches',
                  'checkpoint_sha256': file_sha256(checkpoint) if checkpoint is not None else None}
        return cls(model=model_name(model), routes=routes, anchors=anchors, settings=settings, provenance=[record])

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
        provenance."""
        if source not in ('measured', 'reported'):
            raise ValueError(f"source must be 'measured' or 'reported', got {source!r}")
        if isinstance(values, RouteCard):
            values = {r.id: (r.top1, r.top5) for r in values.routes if r.top1 is not None or r.top5 is not None}
        card = copy.deepcopy(self)
        card._drop_replaced_accuracy(values)
        for stitch_id, (top1, top5) in values.items():
            entry = card._entry(stitch_id)
            entry.top1, entry.top5 = top1, top5
            entry.accuracy = {'dataset': dataset, 'source': source}
        card.provenance.append({'what': 'accuracy', 'dataset': dataset, 'source': source, 'when': _now(), **record})
        return card

    def with_measurements(self, other: RouteCard) -> RouteCard:
        """A copy with the accuracies (where ``other`` has any), latency profiles and provenance records of
        ``other`` merged in; everything ``other`` does not hold is kept. ``other``'s MACs, params and structure are
        not taken: this card's own counts stand."""
        card = copy.deepcopy(self)
        accuracy = {r.id: r for r in other.routes if r.top1 is not None or r.top5 is not None}
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
        return card

    def with_latency(self, profile: str, stats: Mapping[int, Mapping[str, float]], record: Mapping[str, Any]
                     ) -> RouteCard:
        """A copy with ``stats[id]`` (median_ms, p90_ms, throughput) stored under ``profile`` for each route."""
        card = copy.deepcopy(self)
        for stitch_id, values in stats.items():
            card._entry(stitch_id).latency[profile] = {k: round(float(v), 4) for k, v in values.items()}
        card.provenance = [p for p in card.provenance if p.get('profile') != profile] + [dict(record)]
        return card

    def _drop_replaced_accuracy(self, ids: Mapping[int, Any]) -> None:
        """Forget the accuracy provenance once every route holding an accuracy gets a new one from ``ids``."""
        if {r.id for r in self.routes if r.top1 is not None or r.top5 is not None} <= set(ids):
            self.provenance = [p for p in self.provenance if p.get('what') != 'accuracy']

    def _entry(self, stitch_id: int) -> CardRoute:
        entry = self.route(stitch_id)
        if entry is None:
            entry = CardRoute(id=stitch_id)
            self.routes.append(entry)
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
        if final_norm is not None and final_norm != model.final_norm_on_stitched_routes:
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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteCard:
        version = data.get('schema_version')
        if version != SCHEMA_VERSION:
            raise ValueError(f'unsupported route card schema_version {version!r}: this timm-stitch reads version '
                             f'{SCHEMA_VERSION}')
        return cls(
            model=data.get('model'),
            routes=[CardRoute(**r) for r in data.get('routes', [])],
            anchors=list(data.get('anchors', [])),
            settings=dict(data.get('settings', {})),
            provenance=list(data.get('provenance', [])),
        )

    def save(self, path: PathLike) -> None:
        """Write ``routes.json`` atomically (a temp file renamed into place)."""
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
        if isinstance(data, dict) and 'schema_version' in data:
            return cls.from_dict(data)
        return cls.from_jsonl(text, model=model, dataset=dataset, source_name=os.fspath(path))

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
                id=int(r['cfg_id']), macs=r.get('flops'), params=r.get('params'), top1=r.get('acc1'),
                top5=r.get('acc5'), accuracy={'dataset': dataset, 'source': 'reported'} if has_acc else None))
        routes.sort(key=lambda e: e.id)
        record = {'what': 'macs, params, accuracy', 'who': 'official SN-Net results file', 'source': source_name,
                  'when': None}
        return cls(model=model, routes=routes, provenance=[record])


def model_name(model: StitchedNet) -> str:
    """The registered architecture name of ``model``, or a name built from its anchors."""
    model = unwrap(model)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or 'stitched(' + ', '.join(model.anchor_names) + ')'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


# ---- rendering: README.md (Hugging Face model card) and the MACs-accuracy plot ----

PLOT_NAME = 'macs_top1.png'

_CITATION = '''@inproceedings{pan2023stitchable,
  title={Stitchable Neural Networks},
  author={Pan, Zizheng and Cai, Jianfei and Zhuang, Bohan},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}'''


def card_routes(card: RouteCard, latency_profile: Optional[str] = None) -> list:
    """The card's entries as ``Route`` records (latency from ``latency_profile``), with ``dominated`` marked."""
    from .routes import Route
    from .selection import mark_dominated
    routes = []
    for e in card.routes:
        latency = e.latency.get(latency_profile, {}) if latency_profile else {}
        routes.append(Route(id=e.id, anchors=tuple(e.anchors or ()), cuts=tuple(map(tuple, e.cuts or ())),
                            stage=e.stage, params=e.params, macs=e.macs, top1=e.top1, top5=e.top5,
                            latency_ms=latency.get('median_ms')))
    return mark_dominated(routes)


def _short_names(card: RouteCard) -> list[str]:
    """Anchor names without their pretrained tag (or the anchor index when the card names none)."""
    if card.anchors:
        return [a['name'].split('.')[0] for a in card.anchors]
    return [str(i) for i in range(1 + max((a for r in card.routes for a in (r.anchors or ())), default=0))]


def _describe(route, names: list[str]) -> str:
    if not route.anchors:
        return '-'
    if route.is_anchor:
        return f'{names[route.anchors[0]]} (anchor)'
    stage = f' stage {route.stage}' if route.stage else ''
    return ' → '.join(names[a] for a in route.anchors) + stage + ' ' + ' '.join(f'({j},{k})' for j, k in route.cuts)


def _fmt(value: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
    return '–' if value is None else f'{value / scale:.{digits}f}'


def _dataset_tag(dataset: str) -> str:
    """The Hub dataset tag of a timm dataset name: 'imagenet/val' -> 'imagenet', 'torch/fashion_mnist/test' ->
    'fashion_mnist' (timm's reader prefixes dropped)."""
    parts = dataset.split('/')
    return parts[1] if len(parts) > 1 and parts[0] in ('torch', 'hfds', 'hfids', 'tfds', 'wds') else parts[0]


def render_readme(card: RouteCard, plot_name: Optional[str] = PLOT_NAME) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for ``card``: summary, usage, plot, route table,
    provenance."""
    names = _short_names(card)
    profile = card.latency_profiles[0] if card.latency_profiles else None
    routes = card_routes(card, profile)
    accuracy = next((r.accuracy for r in card.routes if r.accuracy), None)
    name = card.model or 'stitched network'
    datasets = sorted({_dataset_tag(r.accuracy['dataset']) for r in card.routes if r.accuracy})
    front = ['---', 'license: apache-2.0', 'library_name: timm', 'pipeline_tag: image-classification', 'tags:',
             '- image-classification', '- timm', '- timm-stitch', '- stitchable-neural-networks']
    if datasets:
        front += ['datasets:', *(f'- {d}' for d in datasets)]
    front.append('---')

    macs = [r.macs for r in routes if r.macs is not None]
    params = [r.params for r in routes if r.params is not None]
    unit, scale = macs_unit(macs)
    size = card.settings.get('input_size')
    lines = [*front, f'# Model card for {name}', '',
             f'A stitchable neural network (SN-Net) over the timm anchors {", ".join(f"`{n}`" for n in names)}: '
             f'one set of weights, {len(routes)} routes from the smallest anchor to the largest, switchable at run '
             'time with `model.set_stitch(id)`.', '', '## Model details', '']
    for a in card.anchors:
        weights = a.get('weights') if a.get('weights') not in (None, a['name']) else None
        lines.append(f"- Anchor `{a['name']}`" + (f' (initial weights `{weights}`)' if weights else ''))
    if macs:
        lines.append(f'- MACs: {min(macs) / scale:.2f} to {max(macs) / scale:.2f} {unit[0]} per image'
                     + (f' at {"x".join(map(str, size))}' if size else '')
                     + ' (fvcore convention, counted by timm-stitch)')
    if params:
        lines.append(f'- Params: {min(params) / 1e6:.1f} to {max(params) / 1e6:.1f} M per route (what the route runs)')
    if 'final_norm_on_stitched_routes' in card.settings:
        lines.append(f"- Final norm on stitched routes: {card.settings['final_norm_on_stitched_routes']}")
    if accuracy:
        how = ('reported by their authors, not measured here' if accuracy['source'] == 'reported'
               else 'measured with timm-stitch')
        lines.append(f"- Accuracy: {accuracy['dataset']}, {how}")
    if profile:
        lines.append(f'- Latency: median over repeated batch runs on `{profile}`')
    args = [repr(name), 'pretrained=True'] if accuracy else [repr(name)]
    budget = sorted(macs)[len(macs) // 2] if macs else 5e9  # the usage example's budget: the median route
    if card.settings.get('final_norm_on_stitched_routes') is False:
        args.append('final_norm_on_stitched_routes=False')
    lines += ['', '## Usage', '', '```python', 'import timm', 'import timm_stitch', '',
              f"model = timm.create_model({', '.join(args)}).eval()",
              "model.load_card('routes.json')  # accuracy and latency of every route",
              f'route = model.select_stitch(max_macs={budget:.3g})  # best route within a budget, made active',
              'print(timm_stitch.format_route_table(model.pareto(), model.anchor_names))', '```', '']
    if plot_name:
        what = 'accuracy' if accuracy else 'params'
        lines += [f'## MACs and {what}', '', f'![MACs vs {what} of every route]({plot_name})', '']
    lat = f' | {profile} ms' if profile else ''
    lines += ['## Routes', '', '`*` marks routes on the MACs/top-1 Pareto front.', '',
              f'| id | route | params (M) | {unit} | top-1 | top-5{lat} |',
              '|---:|---|---:|---:|---:|---:|' + ('---:|' if profile else '')]
    for r in routes:
        mark = '*' if r.dominated is False else ''
        row = (f'| {r.id}{mark} | {_describe(r, names)} | {_fmt(r.params, 1e6)} | {_fmt(r.macs, scale, 3)} | '
               f'{_fmt(r.top1)} | {_fmt(r.top5)} |')
        lines.append(row + (f' {_fmt(r.latency_ms)} |' if profile else ''))
    lines += ['', '## Provenance', '']
    for record in card.provenance:
        lines.append('- ' + ', '.join(f'{k}: {v}' for k, v in record.items() if v is not None))
    lines += ['', '## Citation', '', '```bibtex', _CITATION, '```', '']
    return '\n'.join(lines)


def plot_card(card: RouteCard, path: PathLike) -> None:
    """Save a PNG of every route's MACs against top-1 (or params when no accuracy is known), anchors starred and
    the Pareto front drawn. Needs matplotlib (``pip install timm-stitch[plot]``)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plotting a route card needs matplotlib: pip install "timm-stitch[plot]"') from e
    import io

    from .selection import pareto_front
    routes = [r for r in card_routes(card) if r.macs is not None]
    has_acc = any(r.top1 is not None for r in routes)
    y_of = (lambda r: r.top1) if has_acc else (lambda r: None if r.params is None else r.params / 1e6)
    routes = [r for r in routes if y_of(r) is not None]
    names = _short_names(card)
    unit, scale = macs_unit([r.macs for r in routes])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    groups: dict[tuple, list] = {}
    for r in routes:
        groups.setdefault(r.anchors if not r.is_anchor else ('anchor',), []).append(r)
    for key, members in groups.items():
        if key == ('anchor',):
            continue
        label = ' → '.join(names[a] for a in key) if key else 'routes'
        ax.scatter([r.macs / scale for r in members], [y_of(r) for r in members], s=18, alpha=0.8, label=label)
    anchors = groups.get(('anchor',), [])
    ax.scatter([r.macs / scale for r in anchors], [y_of(r) for r in anchors], marker='*', s=160, c='black',
               label='anchors', zorder=3)
    for r in anchors:
        ax.annotate(names[r.anchors[0]], (r.macs / scale, y_of(r)), fontsize=7,
                    xytext=(4, -10), textcoords='offset points')
    if has_acc:
        front = pareto_front(routes, 'macs', 'top1')
        ax.step([r.macs / scale for r in front], [r.top1 for r in front], where='post', c='grey', lw=0.8,
                label='Pareto front', zorder=1)
    source = next((r.accuracy for r in card.routes if r.accuracy), None)
    ylabel = 'top-1 (%)' if has_acc else 'params (M)'
    if source:
        ylabel += f" ({source['dataset']}, {source['source']})"
    ax.set(xlabel=f'{unit} per image', ylabel=ylabel, title=card.model or 'stitched network')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def write_card_dir(card: RouteCard, out_dir: PathLike, plot: bool = True) -> list[str]:
    """Write ``routes.json``, ``README.md`` and (when ``plot``) the PNG plot into ``out_dir``; returns the paths.
    Each file is written atomically."""
    paths = [os.path.join(out_dir, 'routes.json'), os.path.join(out_dir, 'README.md')]
    if plot:
        paths.append(os.path.join(out_dir, PLOT_NAME))
        plot_card(card, paths[2])
    card.save(paths[0])
    atomic_write(paths[1], render_readme(card, PLOT_NAME if plot else None))
    return paths
