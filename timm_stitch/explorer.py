"""The route explorer: a local Gradio page to see a stitched network's trade-offs, pick a route and try it.

``timm-stitch explore MODEL`` or ``timm_stitch.explore(model)`` serves it on 127.0.0.1 (``pip install
'timm-stitch[explore]'``). This module only lays the page out and wires it to the handlers of
:mod:`timm_stitch.explorer_logic`, where selection, the table, the scatter's data and classification live. Gradio's
analytics and version check are turned off before it is imported, and nothing is shared, so the page works offline.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image

from .card_readme import describe_route
from .catalogue import RouteCatalogue
from .explorer_logic import (
    TABLE_HEADERS,
    budget_handler,
    catalogue_notes,
    classify_handler,
    figure_data,
    route_summary,
    route_table,
    shipped_image_count,
)
from .profiling import MAX_SPREAD, UnstableTimingWarning, profile

if TYPE_CHECKING:
    import gradio
    import plotly.graph_objects

    from .model import StitchedNet

__all__ = ['build_app', 'launch', 'explore', 'plotly_figure', 'PAGE_OPTIONS']

#: set (unless already set) before Gradio is imported: no analytics, version check or Hub telemetry
OFFLINE_ENV = {'GRADIO_ANALYTICS_ENABLED': 'False', 'HF_HUB_DISABLE_TELEMETRY': '1'}

# a click on a route in the scatter types its id into the "selected route" box, as a user would
_CLICK_JS = """
() => {
  const attach = () => {
    for (const plot of document.querySelectorAll('#route-plot .js-plotly-plot')) {
      if (plot.dataset.routeClick || typeof plot.on !== 'function') continue;
      plot.dataset.routeClick = '1';
      plot.on('plotly_click', (event) => {
        const point = event.points && event.points[0];
        if (!point || point.customdata === undefined || point.customdata === null) return;
        const id = Array.isArray(point.customdata) ? point.customdata[0] : point.customdata;
        const box = document.querySelector('#selected-route input');
        box.value = String(id);
        box.dispatchEvent(new Event('input', {bubbles: true}));
        box.dispatchEvent(new Event('change', {bubbles: true}));
      });
    }
  };
  setInterval(attach, 300);
}
"""
_CSS = '#route-plot {min-height: 480px}'
#: what ``launch`` passes to Gradio's ``launch`` besides the server options: the click bridge and the style
PAGE_OPTIONS = {'js': _CLICK_JS, 'css': _CSS}


def _gradio():
    """Gradio, imported with its network features off; a clear message when the extra is not installed."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
        import plotly  # noqa: F401  (the scatter)
    except ImportError as e:
        raise ImportError(f"the route explorer needs Gradio and Plotly ({e}): pip install 'timm-stitch[explore]'") \
            from None
    return gradio


def plotly_figure(data: dict[str, Any]) -> plotly.graph_objects.Figure:
    """The scatter of :func:`timm_stitch.explorer_logic.figure_data` as a Plotly figure: routes (anchors as
    squares), the Pareto front, cascade curves, the selected (star) and compared (diamond) routes; a note
    instead of axes when nothing can be drawn."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(template='plotly_white', height=480, margin=dict(l=60, r=20, t=30, b=50), clickmode='event',
                      hovermode='closest', legend=dict(orientation='h', y=-0.18),
                      xaxis_title=data['x_title'], yaxis_title=data['y_title'])
    if data['empty']:
        fig.add_annotation(text=data['empty'], x=0.5, y=0.5, xref='paper', yref='paper', showarrow=False)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return fig

    def points(trace_points: list[dict], **style: Any) -> None:
        fig.add_scatter(x=[p['x'] for p in trace_points], y=[p['y'] for p in trace_points], mode='markers',
                        customdata=[[p['id']] for p in trace_points], hovertext=[p['hover'] for p in trace_points],
                        hoverinfo='text', **style)

    front = data['front']
    fig.add_scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode='lines', name='Pareto front',
                    line=dict(color='#2a9d8f', width=2), hoverinfo='skip')
    for cascade in data['cascades']:
        fig.add_scatter(x=[p[0] for p in cascade['points']], y=[p[1] for p in cascade['points']], mode='lines',
                        name=cascade['name'], line=dict(color='#8d99ae', dash='dash'),
                        hovertemplate=cascade['name'] + '<br>%{x:.3f}, top-1 %{y:.2f} %<extra></extra>')
    routes = [p for p in data['points'] if not p['anchor']]
    points(routes, name='stitched routes', marker=dict(size=9, color=['#264653' if p['front'] else '#a8b3bd'
                                                                       for p in routes]))
    points([p for p in data['points'] if p['anchor']], name='anchors',
           marker=dict(size=13, symbol='square', color='#e9c46a', line=dict(color='#264653', width=1)))
    if data['compared']:
        points([data['compared']], name=f"compared: route {data['compared']['id']}",
               marker=dict(size=17, symbol='diamond', color='#f4a261', line=dict(color='black', width=1)))
    if data['selected']:
        points([data['selected']], name=f"selected: route {data['selected']['id']}",
               marker=dict(size=20, symbol='star', color='#e63946', line=dict(color='black', width=1)))
    return fig


def _shown(image: Optional[Image.Image], size: int = 140) -> Optional[Image.Image]:
    """A small image (Fashion-MNIST's 28 px) scaled up for the page, its pixels kept sharp."""
    if image is None or max(image.size) >= size:
        return image
    scale = size // max(image.size)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _int_or_none(value: Optional[float]) -> Optional[int]:
    return None if value is None or not float(value).is_integer() else int(value)


def build_app(model: StitchedNet, title: Optional[str] = None, latency_repeats: int = 5,
              latency_max_spread: Optional[float] = MAX_SPREAD) -> gradio.Blocks:
    """The explorer page for ``model`` (not yet served: see :func:`launch`). ``latency_repeats``: timed calls per
    classified image and per route when latency is measured from the page; ``latency_max_spread``: as
    :func:`timm_stitch.profile`'s ``max_spread`` (routes timed unstably get no latency, and the page says so)."""
    gr = _gradio()
    lock = threading.Lock()  # one model: classification and profiling take turns
    unstable: list[str] = []  # the last measurement's warning about unstable timings, shown in the notes
    names = model.anchor_names
    name = title or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__

    def notes_md() -> str:
        notes = catalogue_notes(RouteCatalogue.of(model)) + unstable
        return '\n'.join(f'- {n}' for n in notes) if notes else '- accuracies and latencies from the route card'

    def view(x: str, selected: Optional[float], compared: Optional[float]) -> tuple[Any, str]:
        catalogue = RouteCatalogue.of(model)
        sid, cid = _int_or_none(selected), _int_or_none(compared)
        fig = plotly_figure(figure_data(catalogue, names, x, sid, cid))
        routes = catalogue.annotated()
        info = [route_summary(routes[i], names) for i in (sid, cid) if i is not None and 0 <= i < len(routes)]
        if selected is not None and not info:
            info = [f'no route {selected:g}: ids are 0..{len(routes) - 1}']
        return fig, '  \n'.join(info) or 'no route selected'

    def refresh(x: str, selected: Optional[float], compared: Optional[float]) -> tuple:
        return (notes_md(), route_table(RouteCatalogue.of(model), names),
                *view(x, selected, compared))

    def measure(x: str, selected: Optional[float], compared: Optional[float]) -> tuple:
        with lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', UnstableTimingWarning)
            profile(model, device=next(model.parameters()).device, warmup=1, repeats=latency_repeats,
                    progress=False, max_spread=latency_max_spread)
        unstable[:] = [str(w.message) for w in caught if issubclass(w.category, UnstableTimingWarning)]
        return refresh(x, selected, compared)

    def on_budget(max_macs: str, max_latency: str, min_top1: str) -> tuple:
        route_id, message = budget_handler(model, max_macs, max_latency, min_top1)
        return (gr.skip() if route_id is None else route_id), message

    def on_classify(index: float, upload: Optional[str], selected: Optional[float],
                    compared: Optional[float]) -> tuple:
        with lock:
            out = classify_handler(model, index, upload, [selected, compared], repeats=latency_repeats)
        results = out['results'] + [(None, '')] * (2 - len(out['results']))
        if out['error']:
            results[0] = (None, out['error'])
        labels = [{c[1]: c[2] for c in p.classes} if p is not None else None for p, _ in results]
        return _shown(out['image']), results[0][1], labels[0], results[1][1], labels[1]

    with gr.Blocks(title=f'{name} route explorer', analytics_enabled=False) as app:
        gr.Markdown(f'## {name}: {model.num_routes} routes of {", ".join(names)}\n'
                    'Hover a point for its route, click it to select it, or let a budget choose. '
                    'Anchors are squares; the line is the Pareto front.')
        notes = gr.Markdown(elem_id='notes')
        with gr.Row():
            with gr.Column(scale=3):
                x_axis = gr.Radio([('MACs', 'macs'), ('measured latency', 'latency_ms')], value='macs',
                                  label='x axis', elem_id='x-axis')
                plot = gr.Plot(elem_id='route-plot', show_label=False)
            with gr.Column(scale=2):
                max_macs = gr.Textbox(label='max MACs', placeholder='e.g. 12M or 5G', elem_id='max-macs')
                with gr.Row():
                    max_latency = gr.Textbox(label='max latency (ms)', placeholder='e.g. 7.5', elem_id='max-latency')
                    min_top1 = gr.Textbox(label='min top-1 (%)', placeholder='e.g. 88', elem_id='min-top1')
                select_button = gr.Button('Select within budget', variant='primary', elem_id='select-budget')
                budget_message = gr.Markdown(elem_id='budget-message')
                with gr.Row():
                    selected = gr.Number(label='selected route (click a point)', precision=0,
                                         value=model.stitch_id, elem_id='selected-route')
                    compared = gr.Dropdown([(f'{r.id}: {describe_route(r, names)}', r.id) for r in model.routes()],
                                           value=None, label='compare with route', elem_id='compare-route')
                info = gr.Markdown(elem_id='route-info')
                measure_button = gr.Button('Measure latency on this machine', elem_id='measure-latency')
        with gr.Row():
            with gr.Column():
                index = gr.Slider(0, shipped_image_count() - 1, value=0, step=1,
                                  label='shipped test image (Fashion-MNIST test split)',
                                  elem_id='image-index')
                upload = gr.File(label='or upload an image (takes precedence; clear it to use the slider)',
                                 type='filepath', elem_id='upload')
                classify_button = gr.Button('Classify', variant='primary', elem_id='classify')
                preview = gr.Image(label='input', type='pil', interactive=False, height=160, elem_id='preview')
            with gr.Column():
                result_a = gr.Markdown(elem_id='result-a')
                top_a = gr.Label(num_top_classes=5, label='selected route: top-5', elem_id='top5-a')
            with gr.Column():
                result_b = gr.Markdown(elem_id='result-b')
                top_b = gr.Label(num_top_classes=5, label='compared route: top-5', elem_id='top5-b')
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label='every route', elem_id='routes')

        views = [x_axis, selected, compared]
        app.load(refresh, views, [notes, table, plot, info])
        for control in views:
            control.change(view, views, [plot, info])
        measure_button.click(measure, views, [notes, table, plot, info])
        select_button.click(on_budget, [max_macs, max_latency, min_top1], [selected, budget_message])
        classify_button.click(on_classify, [index, upload, selected, compared],
                              [preview, result_a, top_a, result_b, top_b])
    return app


def launch(app: gradio.Blocks, host: str = '127.0.0.1', port: Optional[int] = None, block: bool = True,
           quiet: bool = False) -> gradio.Blocks:
    """Serve ``app`` on ``host``:``port`` (default: Gradio's, 7860 or the next free one), never shared. With
    ``block`` (default) it runs until interrupted; else it returns at once, serving at ``app.local_url`` until
    ``app.close()``."""
    _gradio()
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
               inbrowser=False, footer_links=[], **PAGE_OPTIONS)
    return app


def explore(model: StitchedNet, host: str = '127.0.0.1', port: Optional[int] = None, block: bool = True,
            quiet: bool = False) -> gradio.Blocks:
    """Serve the route explorer of ``model`` on ``host`` (default: this machine only); see :func:`launch`."""
    return launch(build_app(model), host, port, block, quiet)
