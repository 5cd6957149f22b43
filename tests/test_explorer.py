"""The route explorer's logic without a browser: route table and scatter data (stale cards and missing latency in
words), budget selection as ``select_stitch``, image loading and classification, bad inputs; the page, the
``timm-stitch explore`` command and the Space app build."""
from __future__ import annotations

import runpy
from pathlib import Path

import gradio as gr
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tiny_models import tiny_snnet

import timm_stitch
from timm_stitch import explorer as explorer_module
from timm_stitch.catalogue import RouteCatalogue
from timm_stitch.cli import main
from timm_stitch.explorer import build_app, plotly_figure
from timm_stitch.explorer_logic import (
    NOT_MEASURED,
    STALE,
    ExplorerInputError,
    budget_handler,
    catalogue_notes,
    classify,
    classify_handler,
    data_config,
    figure_data,
    label_names,
    load_image,
    route_table,
    select_for_budget,
    shipped_image,
)

MODEL = 'snnet_vit_fmnist_tsb'
SPACE_APP = Path(__file__).resolve().parents[1] / 'spaces' / 'explorer' / 'app.py'


@pytest.fixture
def model():
    return timm.create_model(MODEL, pretrained=True).eval()


def _own_top1(model, image: Image.Image, stitch_id: int) -> int:
    x = create_transform(**resolve_data_config(model=model))(image.convert('L')).unsqueeze(0)
    with torch.no_grad():
        return int(model(x, stitch_id=stitch_id).argmax())


def _make_stale(model) -> None:
    with torch.no_grad():
        model.anchors[0].head.bias.add_(1.0)


def test_table_and_notes_say_what_the_card_lacks(model):
    catalogue = RouteCatalogue.of(model)
    notes = catalogue_notes(catalogue)
    assert len(notes) == 1 and 'latency not measured' in notes[0] and catalogue.profile in notes[0]
    rows = route_table(catalogue, model.anchor_names)
    assert len(rows) == model.num_routes
    assert {row[5] for row in rows} == {NOT_MEASURED}
    assert rows[17][4] == '87.06' and rows[17][6] == 'yes'  # the card's measured top-1, on the front
    _make_stale(model)
    catalogue = RouteCatalogue.of(model)
    assert any(n.startswith('accuracies and cascades not shown: the route card is stale') for n in
               catalogue_notes(catalogue))
    assert {row[4] for row in route_table(catalogue, model.anchor_names)} == {STALE}


def test_figure_data(model):
    catalogue = RouteCatalogue.of(model)
    data = figure_data(catalogue, model.anchor_names, 'macs', selected=17, compared=33)
    assert len(data['points']) == model.num_routes and data['empty'] is None
    assert {p['id'] for p in data['points'] if p['front']} == {r.id for r in model.pareto()}
    assert [p['id'] for p in data['points'] if p['anchor']] == [0, 1, 2]
    assert len(data['front']) == len(model.pareto()) and data['front'] == sorted(data['front'])
    (cascade,) = data['cascades']
    assert len(cascade['points']) == len(model.card.cascades[0]['curve'])
    assert data['selected']['id'] == 17 and data['compared']['id'] == 33
    assert data['selected']['x'] == pytest.approx(model.routes()[17].macs / 1e6)
    assert 'top-1 87.06 %' in data['selected']['hover'] and f'latency {NOT_MEASURED}' in data['selected']['hover']
    latency = figure_data(catalogue, model.anchor_names, 'latency_ms')
    assert latency['points'] == [] and 'latency not measured' in latency['empty']
    fig = plotly_figure(data)
    names = [t.name for t in fig.data]
    assert names[:2] == ['Pareto front', cascade['name']] and names[-2:] == ['compared: route 33', 'selected: route 17']
    assert fig.data[-1].customdata[0][0] == 17
    empty = plotly_figure(latency)
    assert not empty.data and 'latency not measured' in empty.layout.annotations[0].text
    _make_stale(model)
    stale = figure_data(RouteCatalogue.of(model), model.anchor_names, 'macs')
    assert stale['points'] == [] and stale['cascades'] == [] and 'stale' in stale['empty']
    with pytest.raises(ValueError, match="x must be 'macs' or 'latency_ms', got 'params'"):
        figure_data(catalogue, model.anchor_names, 'params')


@pytest.mark.parametrize('budget, bounds', [
    (('12M', '', ''), dict(max_macs=12e6)),
    (('', '', '88'), dict(min_top1=88.0)),
    (('40M', None, '88'), dict(max_macs=40e6, min_top1=88.0)),
    ((None, None, None), dict()),
])
def test_budget_selects_as_select_stitch(model, budget, bounds):
    route = select_for_budget(RouteCatalogue.of(model), *budget)
    assert route.id == model.select_stitch(**bounds).id
    assert budget_handler(model, *budget) == (route.id, f'Within the budget, `select_stitch` picks route {route.id}.')


def test_latency_budget_after_profiling(model):
    timm_stitch.profile(model, repeats=1, warmup=0, progress=False)
    catalogue = RouteCatalogue.of(model)
    assert catalogue_notes(catalogue) == []
    budget = sorted(r.latency_ms for r in model.routes())[10]
    route = select_for_budget(catalogue, None, str(budget))
    assert route.id == model.select_stitch(max_latency_ms=budget).id
    assert NOT_MEASURED not in {row[5] for row in route_table(catalogue, model.anchor_names)}
    assert len(figure_data(catalogue, model.anchor_names, 'latency_ms')['points']) == model.num_routes


def test_bad_budgets_are_messages(model):
    route_id, message = budget_handler(model, '1k', '', '')
    assert route_id is None
    assert message.startswith('**No route selected.** no route meets the bounds: max_macs=1000 is below the '
                              'smallest available macs')
    route_id, message = budget_handler(model, '', '5', '')  # the shipped card has no latency for this machine
    assert route_id is None and 'cannot select by max_latency_ms: the route card has no latency profile' in message
    catalogue = RouteCatalogue.of(model)
    with pytest.raises(ExplorerInputError, match="max MACs: expected a non-negative number .* got 'lots'"):
        select_for_budget(catalogue, 'lots')
    with pytest.raises(ExplorerInputError, match=r"min top-1 \(%\) must be a number in \[0, 100\], got '101'"):
        select_for_budget(catalogue, None, None, '101')
    with pytest.raises(ExplorerInputError, match=r"max latency \(ms\) must be a number >= 0, got 'fast'"):
        select_for_budget(catalogue, None, 'fast')
    _make_stale(model)
    route_id, message = budget_handler(model, '', '', '88')
    assert route_id is None and 'cannot select by min_top1: the route card is stale' in message


def test_images(tmp_path):
    image, label = shipped_image(7)
    assert image.size == (28, 28) and image.mode == 'L' and 0 <= label < 10
    for index in (-1, 1000, 2.5, True):
        with pytest.raises(ExplorerInputError, match=r'shipped test image index must be an integer in \[0, 999\]'):
            shipped_image(index)
    text = tmp_path / 'notes.txt'
    text.write_text('not an image')
    with pytest.raises(ExplorerInputError, match="the uploaded file 'notes.txt' is not an image Pillow can read"):
        load_image(text)
    png = tmp_path / 'shirt.png'
    image.convert('RGB').resize((64, 64)).save(png)
    truncated = tmp_path / 'cut.png'
    truncated.write_bytes(png.read_bytes()[:120])
    with pytest.raises(ExplorerInputError, match="the uploaded file 'cut.png' is "):
        load_image(truncated)
    assert load_image(png).size == (64, 64)


#: a shipped test image on which routes 0, 17 and 33 answer three different classes
DISAGREEING = 66


def test_classify_is_the_routes_own_output(model, tmp_path):
    assert label_names(model)[3] == 'Dress'
    image, _ = shipped_image(DISAGREEING)
    assert len({_own_top1(model, image, i) for i in (0, 17, 33)}) == 3
    for stitch_id in (0, 17, 33):
        prediction = classify(model, image, stitch_id, repeats=2)
        assert prediction.route.id == stitch_id and prediction.top1 == _own_top1(model, image, stitch_id)
        assert len(prediction.classes) == 5 and prediction.latency_ms > 0
        probabilities = [c[2] for c in prediction.classes]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    rgb = tmp_path / 'rgb.png'
    image.convert('RGB').resize((56, 56)).save(rgb)  # any size and mode: converted as the data config says
    out = classify_handler(model, 3, str(rgb), [17, None], repeats=1)
    assert out['error'] is None and len(out['results']) == 1
    prediction, text = out['results'][0]
    assert prediction.top1 == _own_top1(model, load_image(rgb), 17)
    assert text.startswith(f'**route 17** (vit_fmnist_tiny → vit_fmnist_small (5,4)) answered **'
                           f'{prediction.classes[0][1]}** (class {prediction.top1}, ')
    assert 'true label' not in text  # an upload has none


def test_classify_handler(model, tmp_path):
    out = classify_handler(model, DISAGREEING, None, [17, 33], repeats=1)
    assert [p.route.id for p, _ in out['results']] == [17, 33] and out['error'] is None
    image, label = shipped_image(DISAGREEING)
    assert [p.top1 for p, _ in out['results']] == [_own_top1(model, image, 17), _own_top1(model, image, 33)]
    assert out['image'].size == (28, 28)
    assert f'true label: {label_names(model)[label]}' in out['results'][0][1]
    bogus = tmp_path / 'notes.txt'
    bogus.write_text('hello')
    for args, message in [((7, str(bogus), [17]), "'notes.txt' is not an image"),
                          ((7, None, [None, None]), 'select a route first'),
                          ((7, None, [99]), 'stitch_id 99 is out of range: valid ids are 0..34'),
                          ((7, None, [1.5]), 'route ids are integers, got 1.5'),
                          ((1000, None, [17]), 'shipped test image index must be an integer')]:
        out = classify_handler(model, *args)
        assert out['results'] == [] and out['error'].startswith('**Not classified.**') and message in out['error']


def test_page_builds(model):
    app = build_app(model)
    assert isinstance(app, gr.Blocks)
    ids = {block.elem_id for block in app.blocks.values()}
    assert {'route-plot', 'selected-route', 'compare-route', 'max-macs', 'classify', 'result-a', 'result-b',
            'upload', 'image-index', 'notes', 'routes', 'measure-latency'} <= ids


def test_cli_explore(monkeypatch, capsys):
    served = {}
    monkeypatch.setattr(explorer_module, 'explore', lambda model, **kwargs: served.update(model=model, **kwargs))
    assert main(['explore', '--model', MODEL, '--pretrained', '--port', '7999']) == 0
    assert served['host'] == '127.0.0.1' and served['port'] == 7999
    assert served['model'].card is not None and served['model'].pretrained_cfg['architecture'] == MODEL
    assert main(['explore', MODEL, '--host', '127.0.0.2']) == 0 and served['host'] == '127.0.0.2'
    assert main(['explore']) == 2
    assert 'timm-stitch: error: no model given: pass --model MODEL (or MODEL)' in capsys.readouterr().err
    assert main(['explore', MODEL, '--model', 'snnet_deit_tsb']) == 2
    assert 'two models given' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # refused by argparse, before the model is built
        main(['explore', MODEL, '--port', '99999'])
    assert exited.value.code == 2 and "expected an integer in [1, 65535], got '99999'" in capsys.readouterr().err


def test_space_app(monkeypatch):
    monkeypatch.setenv('TIMM_STITCH_MODEL', MODEL)
    app = runpy.run_path(str(SPACE_APP), run_name='space')  # as imported: builds, does not serve
    demo = app['create_demo']()
    assert isinstance(demo, gr.Blocks) and MODEL in demo.title


def test_model_without_card():
    """A network with no card: words instead of accuracies, MACs budgets pick the cheapest route, grey test
    images classified by an RGB model (converted), class names as 'class i'."""
    net = tiny_snnet()
    catalogue = RouteCatalogue.of(net)
    assert catalogue_notes(catalogue) == [
        'no route card: accuracies unknown (pass `--card`, or `--pretrained` for a model that ships one)']
    rows = route_table(catalogue, net.anchor_names)
    assert {row[4] for row in rows} == {'unknown'} and {row[5] for row in rows} == {NOT_MEASURED}
    data = figure_data(catalogue, net.anchor_names, 'macs', selected=0)
    assert data['points'] == [] and data['selected'] is None and data['empty'].startswith('no route card')
    route_id, _ = budget_handler(net, '1G', '', '')
    assert route_id == net.select_stitch(max_macs=1e9).id
    assert label_names(net) == [f'class {i}' for i in range(10)]
    out = classify_handler(net, 5, None, [route_id], repeats=1)
    image, _ = shipped_image(5)
    config = data_config(net)
    assert config['input_size'] == (3, 32, 32) and config['mean'] == net.anchors[0].pretrained_cfg['mean']
    x = create_transform(**config)(image.convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        assert out['results'][0][0].top1 == int(net(x, stitch_id=route_id).argmax())
    assert isinstance(build_app(net), gr.Blocks)
