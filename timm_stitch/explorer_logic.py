"""What the route explorer shows and does, free of any web framework: the route table, the scatter's data, budget
selection, image loading and classification, and the page's handlers built on them.

:mod:`timm_stitch.explorer` lays these out as a Gradio page; everything here takes and returns plain values, so
that it is tested without a browser. Budgets select through :meth:`RouteCatalogue.select`, the code
:meth:`StitchedNet.select_stitch` runs, so the page picks the route the library picks. What the card cannot give
(stale accuracies, no latency for this machine's profile) is said in words and never shown as a number.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

from ._modes import eval_mode
from .arguments import parse_count
from .card_readme import describe_route
from .catalogue import RouteCatalogue
from .data import FASHION_MNIST_CLASSES, load_fashion_mnist_sample
from .evaluation import image_mode
from .input_size import model_input_size
from .profiling import latency_stats
from .routes import Route, macs_unit
from .selection import pareto_front

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['ExplorerInputError', 'Prediction', 'label_names', 'catalogue_notes', 'route_table', 'TABLE_HEADERS',
           'figure_data', 'route_summary', 'parse_macs', 'select_for_budget', 'budget_handler', 'shipped_image',
           'shipped_image_count', 'load_image', 'data_config', 'classify', 'classify_handler', 'format_prediction',
           'NOT_MEASURED', 'STALE']

#: what the page shows in place of a latency the card does not hold for this machine, and of stale accuracies
NOT_MEASURED = 'not measured'
STALE = 'stale'
TABLE_HEADERS = ['id', 'route', 'params (M)', 'MACs', 'top-1 (%)', 'latency (ms)', 'Pareto']


class ExplorerInputError(ValueError):
    """A value typed or uploaded in the explorer that cannot be used (not an image, a malformed budget)."""


@dataclass(frozen=True)
class Prediction:
    """One image classified by one route: the top classes ``(index, name, probability)``, best first, and the
    median latency of ``repeats`` batch-1 calls timed just now on ``device``."""
    route: Route
    classes: list[tuple[int, str, float]]
    latency_ms: float
    repeats: int
    device: str

    @property
    def top1(self) -> int:
        return self.classes[0][0]


def label_names(model: StitchedNet) -> list[str]:
    """Class names of ``model``: its pretrained config's ``label_names``, ImageNet's descriptions for an ImageNet
    classifier, else ``'class i'``."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if names and len(names) == model.num_classes:
        return list(names)
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    return [f'class {i}' for i in range(model.num_classes)]


def _latency_missing(catalogue: RouteCatalogue) -> Optional[str]:
    """Why the routes show no latency, or None when the card holds this profile's."""
    if catalogue.card is None:
        return 'no latency: no route card is loaded'
    if catalogue.profile in catalogue.card.latency_profiles:
        return None
    held = ', '.join(catalogue.card.latency_profiles) or 'none'
    return (f'latency not measured for this machine\'s profile `{catalogue.profile}` (the card holds: {held}); '
            'measure it here, or with `timm-stitch profile`')


def catalogue_notes(catalogue: RouteCatalogue) -> list[str]:
    """What the card cannot give, in words: no card, stale accuracies, no latency for this profile."""
    notes = []
    if catalogue.card is None:
        notes.append('no route card: accuracies unknown (pass `--card`, or `--pretrained` for a model that ships one)')
    elif catalogue.stale:
        notes.append(f'accuracies and cascades not shown: the route card is stale, {catalogue.stale}')
    elif not catalogue.card.has_accuracy:
        notes.append('the route card holds no accuracies')
    latency = _latency_missing(catalogue)
    if latency and catalogue.card is not None:
        notes.append(latency)
    return notes


def _accuracy_text(route: Route, unit: str = '') -> str:
    if route.top1 is not None:
        return f'{route.top1:.2f}{unit}'
    return STALE if route.extra.get('accuracy_stale') else 'unknown'


def _latency_text(route: Route, unit: str = '') -> str:
    return NOT_MEASURED if route.latency_ms is None else f'{route.latency_ms:.3f}{unit}'


def route_table(catalogue: RouteCatalogue, names: Sequence[str]) -> list[list[Any]]:
    """One row per route (columns ``TABLE_HEADERS``); unknown values as words (``STALE``, ``NOT_MEASURED``)."""
    routes = catalogue.annotated()
    unit, scale = macs_unit([r.macs for r in routes])
    return [[r.id, describe_route(r, list(names)), round(r.params / 1e6, 3) if r.params is not None else 'unknown',
             f'{r.macs / scale:.3f} {unit[0]}' if r.macs is not None else 'unknown',
             _accuracy_text(r), _latency_text(r), 'yes' if r.dominated is False else '']
            for r in routes]


def route_summary(route: Route, names: Sequence[str]) -> str:
    """The route in one line (Markdown): anchors, cuts, params, MACs, top-1 and latency (words where unknown)."""
    anchors = ' → '.join(names[a] for a in route.anchors)
    cuts = ', '.join(f'({j},{k})' for j, k in route.cuts) or 'none (anchor)'
    unit, scale = macs_unit([route.macs])
    return (f'**route {route.id}**: anchors {anchors}; cuts {cuts}; {route.params / 1e6:.3f} M params; '
            f'{route.macs / scale:.3f} {unit}; top-1 {_accuracy_text(route, " %")}; '
            f'latency {_latency_text(route, " ms")}')


def figure_data(catalogue: RouteCatalogue, names: Sequence[str], x: str = 'macs',
                selected: Optional[int] = None, compared: Optional[int] = None) -> dict[str, Any]:
    """What the scatter draws, as plain values: every route with a known ``x`` (``'macs'`` or ``'latency_ms'``)
    and top-1 (``points``: id, x, y, anchor, front, hover), the Pareto ``front``, the card's ``cascades`` (MACs
    axis only: they record mean MACs, not latency), the ``selected`` and ``compared`` points, axis titles, and
    ``empty`` (why nothing can be drawn) when no route has both values."""
    if x not in ('macs', 'latency_ms'):
        raise ValueError(f"x must be 'macs' or 'latency_ms', got {x!r}")
    routes = catalogue.annotated()
    unit, scale = macs_unit([r.macs for r in routes]) if x == 'macs' else ('ms', 1.0)
    known = [r for r in routes if getattr(r, x) is not None and r.top1 is not None]
    front = {r.id for r in pareto_front(known, x, 'top1')}
    points = [{'id': r.id, 'x': getattr(r, x) / scale, 'y': r.top1, 'anchor': r.is_anchor, 'front': r.id in front,
               'hover': route_summary(r, names).replace('**', '').replace('; ', '<br>')} for r in known]
    by_id = {p['id']: p for p in points}
    cascades = []
    if x == 'macs' and catalogue.card is not None and not catalogue.stale:
        for c in catalogue.card.cascades:
            label = f"cascade {' → '.join(map(str, c['routes']))} ({c['confidence']})"
            cascades.append({'name': label, 'points': [(p['mean_macs'] / scale, p['top1']) for p in c['curve']]})
    empty = None
    if not points:
        empty = (_latency_missing(catalogue) if x == 'latency_ms' and _latency_missing(catalogue) else
                 '; '.join(catalogue_notes(catalogue)) or 'no route has both values')
    x_title = f'{unit} per image' if x == 'macs' else f'latency (ms, batch 1, {catalogue.profile})'
    return {'x': x, 'x_title': x_title, 'y_title': 'top-1 (%)', 'points': points,
            'front': [(by_id[i]['x'], by_id[i]['y']) for i in sorted(front, key=lambda i: by_id[i]['x'])],
            'cascades': cascades, 'selected': by_id.get(selected), 'compared': by_id.get(compared), 'empty': empty}


def _blank(text: Union[str, float, None]) -> bool:
    return text is None or (isinstance(text, str) and not text.strip())


def parse_macs(text: Union[str, float, None]) -> Optional[float]:
    """A MACs budget as typed: blank for none, else a number with an optional k/M/G/T suffix (``'12M'``)."""
    if _blank(text):
        return None
    try:
        return parse_count(str(text))
    except Exception as e:  # argparse.ArgumentTypeError: the same words, a ValueError here
        raise ExplorerInputError(f'max MACs: {e}') from None


def _parse_number(text: Union[str, float, None], what: str, low: float, high: float = float('inf')) -> Optional[float]:
    """A number typed in a budget box, blank for none; ``ExplorerInputError`` outside ``[low, high]``."""
    if _blank(text):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not low <= value <= high:
        valid = f'in [{low:g}, {high:g}]' if high < float('inf') else f'>= {low:g}'
        raise ExplorerInputError(f'{what} must be a number {valid}, got {text!r}')
    return value


def select_for_budget(catalogue: RouteCatalogue, max_macs: Union[str, float, None] = None,
                      max_latency_ms: Union[str, float, None] = None,
                      min_top1: Union[str, float, None] = None) -> Route:
    """The route ``model.select_stitch(max_macs=..., max_latency_ms=..., min_top1=...)`` picks (the same code),
    with the budgets as typed in the page (blank: no bound); raises ``ValueError`` saying why when none fits."""
    return catalogue.select(max_macs=parse_macs(max_macs),
                            max_latency_ms=_parse_number(max_latency_ms, 'max latency (ms)', 0),
                            min_top1=_parse_number(min_top1, 'min top-1 (%)', 0, 100))


def budget_handler(model: StitchedNet, max_macs: Union[str, float, None], max_latency_ms: Union[str, float, None],
                   min_top1: Union[str, float, None]) -> tuple[Optional[int], str]:
    """The page's budget button: ``(route id, message)``, or ``(None, why)`` when no route fits the budgets."""
    catalogue = RouteCatalogue.of(model)
    try:
        route = select_for_budget(catalogue, max_macs, max_latency_ms, min_top1)
    except ValueError as e:
        return None, f'**No route selected.** {e}'
    return route.id, f'Within the budget, `select_stitch` picks route {route.id}.'


@functools.cache
def _shipped() -> tuple:
    return load_fashion_mnist_sample()


def shipped_image_count() -> int:
    """How many test images ship with the package (Fashion-MNIST's first 1,000)."""
    return len(_shipped()[1])


def shipped_image(index: int) -> tuple[Image.Image, int]:
    """Test image ``index`` of the Fashion-MNIST test images shipped with the package, and its label."""
    images, labels = _shipped()
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not float(index).is_integer() or not (
            0 <= index < len(images)):
        raise ExplorerInputError(f'shipped test image index must be an integer in [0, {len(images) - 1}], '
                                 f'got {index!r}')
    return Image.fromarray(images[int(index)]), int(labels[int(index)])


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """The image in the file at ``path`` (an upload), fully read; ``ExplorerInputError`` when it is not one."""
    name = os.path.basename(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = 'not an image Pillow can read' if isinstance(e, UnidentifiedImageError) else str(e)
        raise ExplorerInputError(f'the uploaded file {name!r} is {reason}: upload a PNG, JPEG, BMP, GIF or '
                                 'WebP image') from None


def data_config(model: StitchedNet) -> dict[str, Any]:
    """timm's eval data config of ``model`` (of its first anchor when it has no pretrained config, as a network
    stitched by hand), at the input size the network runs at."""
    config = resolve_data_config(model=model if getattr(model, 'pretrained_cfg', None) else model.anchors[0])
    return {**config, 'input_size': model_input_size(model)}


def classify(model: StitchedNet, image: Image.Image, stitch_id: int, repeats: int = 5,
             top_k: int = 5) -> Prediction:
    """Classify ``image`` (any size and mode: converted and transformed as the model's data config says) with
    route ``stitch_id``; the latency is the median of ``repeats`` more batch-1 calls timed now."""
    stitch_id = model.check_stitch_id(stitch_id)
    transform = create_transform(**data_config(model), is_training=False)
    param = next(model.parameters())
    x = transform(image.convert(image_mode(model.in_chans))).unsqueeze(0).to(param.device, param.dtype)
    times = []
    with eval_mode(model), torch.inference_mode():
        probs = model(x, stitch_id=stitch_id).float().softmax(-1)[0]
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, stitch_id=stitch_id)
            if param.device.type == 'cuda':
                torch.cuda.synchronize(param.device)
            times.append((time.perf_counter() - start) * 1e3)
    names = label_names(model)
    values, indices = probs.topk(min(top_k, probs.numel()))
    classes = [(int(i), names[int(i)], float(v)) for v, i in zip(values, indices)]
    route = RouteCatalogue.of(model).annotated()[stitch_id]
    return Prediction(route, classes, latency_stats(times)['median_ms'], repeats, str(param.device))


def format_prediction(prediction: Prediction, names: Sequence[str], truth: Optional[str] = None) -> str:
    """The answer in words (Markdown): the route that answered, its top-1 and the latency measured now."""
    index, name, p = prediction.classes[0]
    route = prediction.route
    lines = [f'**route {route.id}** ({describe_route(route, list(names))}) answered **{name}** '
             f'(class {index}, {p * 100:.1f} %)',
             f'latency now: {prediction.latency_ms:.2f} ms (median of {prediction.repeats} batch-1 calls on '
             f'{prediction.device})']
    if truth is not None:
        lines.append(f'true label: {truth}')
    return '  \n'.join(lines)


def classify_handler(model: StitchedNet, index: Optional[float], upload: Optional[str],
                     stitch_ids: Sequence[Optional[float]], repeats: int = 5) -> dict[str, Any]:
    """The page's classify button: the input image (the upload, else shipped test image ``index``) classified by
    each route of ``stitch_ids`` (None entries skipped). Returns ``{'image', 'results': [(Prediction or None,
    Markdown)], 'error'}``, ``error`` saying why nothing was classified."""
    out: dict[str, Any] = {'image': None, 'results': [], 'error': None}
    try:
        if upload:
            image, truth = load_image(upload), None
        else:
            image, label = shipped_image(0 if index is None else index)
            truth = FASHION_MNIST_CLASSES[label]
        out['image'] = image
        ids = [i for i in stitch_ids if i is not None]
        if not ids:
            raise ExplorerInputError('select a route first: set a budget, click a point or type a route id')
        for stitch_id in ids:
            if not float(stitch_id).is_integer():
                raise ExplorerInputError(f'route ids are integers, got {stitch_id!r}')
            model.check_stitch_id(int(stitch_id))
    except ValueError as e:
        out['error'] = f'**Not classified.** {e}'
        return out
    names = model.anchor_names
    for stitch_id in ids:
        prediction = classify(model, image, int(stitch_id), repeats=repeats)
        out['results'].append((prediction, format_prediction(prediction, names, truth)))
    return out
