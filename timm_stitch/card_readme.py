"""Rendering a route card: the Hugging Face model card (``README.md``), the MACs-accuracy plot, the card folder.

The one README renderer of timm-stitch: ``timm-stitch card`` and ``save_pretrained``/``push_to_hub`` both use it.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from ._io import ForeignFilesError, atomic_write
from .cards import PathLike, RouteCard
from .catalogue import card_routes
from .routes import Route, macs_unit
from .selection import pareto_front

__all__ = ['render_readme', 'plot_card', 'write_card_dir', 'is_rendered_readme', 'describe_route', 'PLOT_NAME']

PLOT_NAME = 'macs_top1.png'

_CITATION = '''@inproceedings{pan2023stitchable,
  title={Stitchable Neural Networks},
  author={Pan, Zizheng and Cai, Jianfei and Zhuang, Bohan},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}'''


def _short_names(card: RouteCard) -> list[str]:
    """Anchor names without their pretrained tag (or the anchor index when the card names none)."""
    if card.anchors:
        return [a['name'].split('.')[0] for a in card.anchors]
    return [str(i) for i in range(1 + max((a for r in card.routes for a in (r.anchors or ())), default=0))]


def describe_route(route: Route, names: list[str]) -> str:
    """A route in words, as cards and the explorer show it: ``'Ti → S (5,4)'``, ``'B (anchor)'``."""
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


def render_readme(card: RouteCard, plot_name: Optional[str] = PLOT_NAME, repo_id: Optional[str] = None,
                  license: str = 'apache-2.0') -> str:
    """The Hugging Face model card (``README.md``) of ``card``: ``huggingface_hub`` card data (license,
    ``library_name: timm``, tags, datasets) and a summary, usage, plot, route table and provenance. ``repo_id`` is
    the Hub repo the card is published to (the usage example then loads ``hf-hub:REPO_ID``)."""
    names = _short_names(card)
    profile = card.latency_profiles[0] if card.latency_profiles else None
    routes = card_routes(card, profile)
    accuracy = next((r.accuracy for r in card.routes if r.accuracy), None)
    name = card.model or 'stitched network'
    datasets = sorted({_dataset_tag(r.accuracy['dataset']) for r in card.routes if r.accuracy})
    data = ModelCardData(license=license, library_name='timm', pipeline_tag='image-classification',
                         tags=['image-classification', 'timm', 'timm-stitch', 'stitchable-neural-networks'],
                         datasets=datasets or None)

    macs = [r.macs for r in routes if r.macs is not None]
    params = [r.params for r in routes if r.params is not None]
    unit, scale = macs_unit(macs)
    size = card.settings.get('input_size')
    lines = [f'# Model card for {repo_id or name}', '',
             f'A stitchable neural network (SN-Net, Pan et al., CVPR 2023) `{name}` over the timm anchors '
             f'{", ".join(f"`{n}`" for n in names)}: one set of weights, {len(routes)} routes from the smallest '
             'anchor to the largest, switchable at run time with `model.set_stitch(id)`. Built with timm-stitch for '
             '[timm](https://github.com/huggingface/pytorch-image-models).', '', '## Model details', '']
    for a in card.anchors:
        weights = a.get('weights') if a.get('weights') not in (None, a['name']) else None
        lines.append(f"- Anchor `{a['name']}`" + (f' (initial weights `{weights}`)' if weights else ''))
    if macs:
        lines.append(f'- MACs: {min(macs) / scale:.2f} to {max(macs) / scale:.2f} {unit[0]} per image'
                     + (f' at {"x".join(map(str, size))}' if size else '')
                     + ' (fvcore convention, counted by timm-stitch)')
    if params:
        lines.append(f'- Params: {min(params) / 1e6:.1f} to {max(params) / 1e6:.1f} M per route (what the route runs)')
    if card.settings.get('route_space') == 'two_way':
        lines.append('- Routes: two-way (SN-Netv2: small to large, large to small, and back)')
    if 'final_norm_on_stitched_routes' in card.settings:
        lines.append(f"- Final norm on stitched routes: {card.settings['final_norm_on_stitched_routes']}")
    if accuracy:
        how = ('reported by their authors, not measured here' if accuracy['source'] == 'reported'
               else 'measured with timm-stitch')
        lines.append(f"- Accuracy: {accuracy['dataset']}, {how}")
    if profile:
        lines.append(f'- Latency: median over repeated batch runs on `{profile}`')
    args = [repr(f'hf-hub:{repo_id}' if repo_id else name)]
    args += ['pretrained=True'] if accuracy or repo_id else []
    budget = sorted(macs)[len(macs) // 2] if macs else 5e9  # the usage example's budget: the median route
    if card.settings.get('final_norm_on_stitched_routes') is False and not repo_id:
        args.append('final_norm_on_stitched_routes=False')
    load_card = [] if repo_id else ["model.load_card('routes.json')  # accuracy and latency of every route"]
    lines += ['', '## Usage', '', '```python', 'import timm', 'import timm_stitch', '',
              f"model = timm.create_model({', '.join(args)}).eval()", *load_card,
              f'route = model.select_stitch(max_macs={budget:.3g})  # best route within a budget, made active',
              'print(timm_stitch.format_route_table(model.pareto(), model.anchor_names))', '```', '']
    if plot_name:
        what = 'accuracy' if accuracy else 'params'
        lines += [f'## MACs and {what}', '', f'![MACs vs {what} of every route]({plot_name})', '']
    lat = f' | {profile} ms' if profile else ''
    others = {p: {r.id: r.top1 for r in card_routes(card.at_precision(p))} for p in card.held_precisions[1:]}
    own = f' ({card.precision})' if others else ''
    lines += ['## Routes', '', f'`*` marks routes on the MACs/top-1{own} Pareto front. The full card is `routes.json`.',
              '', f'| id | route | params (M) | {unit} | top-1{own} | top-5{own}'
              + ''.join(f' | top-1 ({p})' for p in others) + f'{lat} |',
              '|---:|---|---:|---:|---:|---:|' + '---:|' * (len(others) + bool(profile))]
    for r in routes:
        mark = '*' if r.dominated is False else ''
        row = (f'| {r.id}{mark} | {describe_route(r, names)} | {_fmt(r.params, 1e6)} | {_fmt(r.macs, scale, 3)} | '
               f'{_fmt(r.top1)} | {_fmt(r.top5)} |' + ''.join(f' {_fmt(top1.get(r.id))} |' for top1 in others.values()))
        lines.append(row + (f' {_fmt(r.latency_ms)} |' if profile else ''))
    if others:
        lines += ['', 'MACs/top-1 Pareto front per precision (each measured on the network quantized or cast once):',
                  '']
        lines += [f'- {p}: routes ' + ', '.join(str(r.id) for r in _front(card.at_precision(p)))
                  for p in card.held_precisions]
    lines += ['', '## Provenance', '']
    for record in card.provenance:
        lines.append('- ' + ', '.join(f'{k}: {v}' for k, v in record.items() if v is not None))
    lines += ['', '## Citation', '', '```bibtex', _CITATION, '```', '']
    return str(ModelCard(f'---\n{data.to_yaml()}\n---\n' + '\n'.join(lines)))


def _front(card: RouteCard) -> list:
    """The MACs/top-1 Pareto front of the card's own routes."""
    return pareto_front([r for r in card_routes(card) if r.macs is not None and r.top1 is not None], 'macs', 'top1')


def plot_card(card: RouteCard, path: PathLike) -> None:
    """Save a PNG of every route's MACs against top-1 (or params when no accuracy is known), anchors starred, the
    Pareto front (one per precision the card holds) and the card's cascade curves (mean MACs) drawn. Needs matplotlib
    (``pip install timm-stitch[plot]``)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plotting a route card needs matplotlib: pip install "timm-stitch[plot]"') from e
    import io

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
        own = f' ({card.precision})' if card.precisions else ''
        ax.step([r.macs / scale for r in front], [r.top1 for r in front], where='post', c='grey', lw=0.8,
                label=f'Pareto front{own}', zorder=1)
        for other in card.held_precisions[1:]:
            front = _front(card.at_precision(other))
            ax.step([r.macs / scale for r in front], [r.top1 for r in front], where='post', lw=1, ls='--',
                    label=f'Pareto front ({other})', zorder=1)
        for cascade in card.cascades:
            curve = sorted(cascade['curve'], key=lambda p: p['mean_macs'])
            label = (f"cascade {' → '.join(str(k) for k in cascade['routes'])} ({cascade['confidence']}, "
                     f"{cascade['dataset']})")
            ax.plot([p['mean_macs'] / scale for p in curve], [p['top1'] for p in curve], lw=1, label=label, zorder=2)
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


def is_rendered_readme(path: PathLike) -> bool:
    """Whether ``path`` is a ``README.md`` model card timm-stitch rendered (its card data carries the
    ``timm-stitch`` tag), which a writer may replace."""
    try:
        with open(path, encoding='utf-8') as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    front = head.split('\n---', 1)[0] if head.startswith('---') else ''
    return re.search(r'^\s*-\s*timm-stitch\s*$', front, re.MULTILINE) is not None


def write_card_dir(card: RouteCard, out_dir: PathLike, plot: bool = True) -> list[str]:
    """Write ``routes.json``, ``README.md`` and (when ``plot``) the PNG plot into ``out_dir``; returns the paths.
    Each file is written atomically. A ``README.md`` already there is replaced only when timm-stitch rendered it
    (else ``ForeignFilesError`` and nothing is written)."""
    paths = [os.path.join(out_dir, 'routes.json'), os.path.join(out_dir, 'README.md')]
    if os.path.lexists(paths[1]) and not is_rendered_readme(paths[1]):
        raise ForeignFilesError(f'{paths[1]} is not a model card timm-stitch wrote: nothing was written. Write the '
                                'card into another folder (or move that README.md away)')
    if plot:
        paths.append(os.path.join(out_dir, PLOT_NAME))
        plot_card(card, paths[2])
    card.save(paths[0])
    atomic_write(paths[1], render_readme(card, PLOT_NAME if plot else None))
    return paths
