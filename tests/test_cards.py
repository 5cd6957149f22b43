"""Route cards: schema round trips, the official JSON-lines reader, model checks, profiling and rendering."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import timm
from huggingface_hub import ModelCard
from reported_tables import DEIT_TSB, read_rows
from tiny_models import tiny_snnet

import timm_stitch
from timm_stitch._io import atomic_write
from timm_stitch.card_readme import render_readme, write_card_dir
from timm_stitch.cards import SCHEMA_VERSION, RouteCard
from timm_stitch.errors import RouteIdError
from timm_stitch.profiling import device_profile


@pytest.fixture(scope='module')
def profiled():
    model = tiny_snnet()  # on the suite's one thread (conftest), so that the latency keys agree
    return model, timm_stitch.profile(model, warmup=1, repeats=2, progress=False, max_spread=None)


def test_card_from_model_round_trips(tmp_path):
    model = tiny_snnet()
    card = RouteCard.from_model(model).with_accuracy({0: (61.5, 80.25), 3: (70.0, None)}, 'tiny/val', 'measured')
    path = tmp_path / 'routes.json'
    card.save(path)
    data = json.loads(path.read_text())
    assert data['schema_version'] == SCHEMA_VERSION and data['model'] == 'stitched(' + ', '.join(
        model.anchor_names) + ')'
    assert data['routes'][3]['cuts'] == [list(model.route(3).cuts[0])]
    assert data['routes'][0]['accuracy'] == {'dataset': 'tiny/val', 'source': 'measured'}
    loaded = RouteCard.load(path)
    assert loaded == card
    assert [r.macs for r in loaded.routes] == [r.macs for r in model.routes()]
    assert [r.params for r in loaded.routes] == [r.params for r in model.routes()]
    model.load_card(path)
    assert (model.route(0).top1, model.route(0).top5, model.route(1).top1) == (61.5, 80.25, None)
    assert model.route(0).extra['accuracy']['source'] == 'measured'


def test_official_jsonl_reader(tmp_path):
    card = RouteCard.load(DEIT_TSB, model='snnet_deit_tsb')
    rows = read_rows()
    assert [r.id for r in card.routes] == list(range(71))
    assert [(r.macs, r.params, r.top1) for r in card.routes] == [(x['flops'], x['params'], x['acc1']) for x in rows]
    assert card.routes[0].accuracy['source'] == 'reported' and card.routes[0].anchors is None
    truncated = tmp_path / 'res.txt'
    truncated.write_text(DEIT_TSB.read_text()[:-20])
    with pytest.warns(UserWarning, match='truncated last line'):
        assert len(RouteCard.load(truncated).routes) == 70
    (tmp_path / 'bad.json').write_text('{"routes": []}')
    with pytest.raises(ValueError, match='schema_version'):
        RouteCard.load(tmp_path / 'bad.json')
    (tmp_path / 'v9.json').write_text('{"schema_version": 9}')
    with pytest.raises(ValueError, match='unsupported route card schema_version 9'):
        RouteCard.load(tmp_path / 'v9.json')


def test_card_for_another_model_is_rejected():
    model = tiny_snnet()
    card = RouteCard.from_model(model)
    other = RouteCard.from_model(model)
    other.model = 'snnet_deit_sb'
    with pytest.raises(ValueError, match="card is for 'snnet_deit_sb', not for 'stitched"):
        model.load_card(other)
    with pytest.raises(ValueError, match='route card entry 23 is out of range: the model has routes 0..22'):
        model.load_card(DEIT_TSB)
    card.routes[5].cuts = [[3, 3]]
    with pytest.raises(ValueError, match='route card entry 5 .* does not match'):
        model.load_card(card)
    short = tiny_snnet(depth=3)
    with pytest.raises(ValueError, match='card has 23 routes, the model has'):
        short.load_card(RouteCard.from_model(model))
    assert short.card is None and model.card is None


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'routes.json'
    path.write_text('old')

    def fail(*args):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
        atomic_write(path, 'new')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['routes.json']


def test_profile_fills_latency_and_select_uses_it(profiled, tmp_path):
    model, card = profiled
    key = device_profile('cpu', 1)
    assert card.latency_profiles == [key] and key.startswith('cpu-') and key.endswith('-bs1-float32')
    routes = model.routes()
    assert all(r.latency_ms > 0 and r.extra['latency_p90_ms'] >= r.latency_ms for r in routes)
    assert card.provenance[-1]['what'] == 'latency' and card.provenance[-1]['repeats'] == 2
    card.save(tmp_path / 'routes.json')
    fresh = tiny_snnet()
    fresh.load_card(tmp_path / 'routes.json')
    assert [r.latency_ms for r in fresh.routes()] == [r.latency_ms for r in routes]
    budget = sorted(r.latency_ms for r in routes)[3]
    chosen = fresh.select_stitch(max_latency_ms=budget)
    assert chosen.latency_ms <= budget
    assert chosen.macs == min(r.macs for r in fresh.routes() if r.latency_ms <= budget)
    fresh.load_card(tmp_path / 'routes.json', latency_profile='cuda-other-bs1-float32')
    assert all(r.latency_ms is None for r in fresh.routes())
    with pytest.raises(ValueError, match="no latency profile 'cuda-other-bs1-float32'"):
        fresh.select_stitch(max_latency_ms=1e9)


def test_profile_validates_arguments():
    model = tiny_snnet()
    with pytest.raises(ValueError, match='batch_size must be a positive integer'):
        timm_stitch.profile(model, batch_size=0)
    with pytest.raises(RouteIdError, match='stitch_id 99 is out of range'):
        timm_stitch.profile(model, routes=[99])


def test_readme_and_plot(profiled, tmp_path):
    model, card = profiled
    card = card.with_accuracy({r.id: (50 + r.id * 0.1, None) for r in model.routes()}, 'tiny/val', 'reported',
                              who='someone else')
    readme = render_readme(card)
    data = ModelCard(readme).data
    assert (data.license, data.library_name, data.datasets) == ('apache-2.0', 'timm', ['tiny'])
    assert 'timm-stitch' in data.tags
    table = [line for line in readme.splitlines() if line.startswith('| ')]
    assert len(table) == 1 + model.num_routes and device_profile('cpu', 1) in table[0]
    assert 'tiny/val, reported by their authors, not measured here' in readme
    pytest.importorskip('matplotlib')
    paths = write_card_dir(card, tmp_path / 'card')
    assert sorted(os.listdir(tmp_path / 'card')) == ['README.md', 'macs_top1.png', 'routes.json']
    assert Path(paths[2]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert RouteCard.load(paths[0]) == card


@pytest.mark.slow
def test_deit_profile_times_the_routes_asked_for():
    """Full size: the three anchors get a latency, the other routes none (their order is a benchmark's business:
    measured latencies on a busy machine do not follow MACs)."""
    model = timm.create_model('snnet_deit_tsb')
    card = timm_stitch.profile(model, routes=[0, 1, 2], warmup=1, repeats=3, progress=False, max_spread=None)
    latencies = [r.latency_ms for r in model.routes()]
    assert all(ms is not None and ms > 0 for ms in latencies[:3]) and set(latencies[3:]) == {None}
    assert card.latency_profiles == [model.latency_profile]


def test_loading_another_card_replaces_values_without_recounting(monkeypatch):
    model = tiny_snnet()
    card = RouteCard.from_model(model)
    model.load_card(card.with_accuracy({0: (60.0, None), 1: (65.0, None)}, 'tiny', 'measured'))
    assert [r.top1 for r in model.routes()[:3]] == [60.0, 65.0, None]

    def no_recount(*args):
        raise AssertionError('MACs recounted')

    monkeypatch.setattr('timm_stitch.model.count_route_macs', no_recount)
    model.load_card(card.with_accuracy({1: (66.0, None)}, 'tiny', 'measured'))
    assert [r.top1 for r in model.routes()[:3]] == [None, 66.0, None]
    assert model.routes()[0].macs > 0 and model.card.routes[1].top1 == 66.0


def test_readme_names_timm_reader_datasets_and_small_macs_units(profiled):
    model, card = profiled
    card = card.with_accuracy({r.id: (50.0, None) for r in model.routes()}, 'torch/fashion_mnist/test', 'measured')
    readme = render_readme(card)
    assert ModelCard(readme).data.datasets == ['fashion_mnist']
    assert max(r.macs for r in model.routes()) < 1e9  # tiny anchors: costs read in MMACs
    assert '| params (M) | MMACs |' in readme and ' M per image' in readme


def test_model_cards_recipe_writes_the_reported_by_text_of_the_shipped_cards():
    """The model_cards/README.md loop over the SN-Net releases, run by bash with ``timm-stitch`` stubbed to print
    its ``--reported-by`` text: the text each shipped card records (it used to come out garbled)."""
    root = Path(__file__).resolve().parents[1]
    recipe = (root / 'model_cards' / 'README.md').read_text()
    loop = recipe[recipe.index('for m in snnet_swin_tsb'):]
    loop = loop[:loop.index('\ndone\n') + 6]
    stub = 'timm-stitch() { while [ $# -gt 0 ]; do [ "$1" = --reported-by ] && echo "$m=$2"; shift; done; }\n'
    out = subprocess.run(['bash', '-c', stub + loop], cwd=root, capture_output=True, text=True, check=True).stdout
    said = dict(line.split('=', 1) for line in out.splitlines())
    assert len(said) == 4
    for arch, text in said.items():
        card = RouteCard.load(root / 'model_cards' / arch / 'routes.json')
        assert text in [p.get('who') for p in card.provenance], arch
