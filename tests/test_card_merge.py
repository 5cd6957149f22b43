"""Merging measurements into a card keeps what it did not measure: the README's ``profile`` then ``card`` sequence on
a copy of the shipped Fashion-MNIST card keeps its 35 measured accuracies."""
import json
import shutil
from pathlib import Path

from tiny_models import tiny_snnet

from timm_stitch.cards import RouteCard
from timm_stitch.cli import main

SHIPPED = Path(__file__).resolve().parents[1] / 'model_cards' / 'snnet_vit_fmnist_tsb'
ARCH = 'snnet_vit_fmnist_tsb'


def _accuracies(card: RouteCard) -> dict:
    return {r.id: (r.top1, r.top5, r.accuracy) for r in card.routes}


def test_profile_then_card_into_a_card_folder_keeps_its_accuracies(tmp_path, capsys):
    folder = tmp_path / ARCH
    shutil.copytree(SHIPPED, folder)  # never the shipped folder itself
    shipped = RouteCard.load(folder / 'routes.json')
    assert sum(r.top1 is not None for r in shipped.routes) == 35

    latency = tmp_path / 'routes.json'
    assert main(['profile', ARCH, '--routes', '0', '7', '--warmup', '0', '--repeats', '1', '--out', str(latency)]) == 0
    assert main(['card', ARCH, '--card', str(latency), '--out', str(folder), '--no-plot']) == 0
    merged = RouteCard.load(folder / 'routes.json')
    assert _accuracies(merged) == _accuracies(shipped)
    profile = RouteCard.load(latency).latency_profiles[0]
    assert [r.id for r in merged.routes if profile in r.latency] == [0, 7]
    kept = [p['what'] for p in shipped.provenance if p['what'] != 'macs, params']
    assert [p['what'] for p in merged.provenance][1:] == kept + ['latency']
    rows = [line.split('|') for line in (folder / 'README.md').read_text().splitlines() if line.startswith('| ')]
    assert [float(row[5]) for row in rows if row[1].strip(' *').isdigit()] == [r.top1 for r in shipped.routes]

    # a card of another model is not merged into, nor overwritten
    other = tmp_path / 'other'
    shutil.copytree(SHIPPED.parent / 'snnet_deit_tsb', other, ignore=shutil.ignore_patterns('*.png'))
    before = (other / 'routes.json').read_bytes()
    capsys.readouterr()
    assert main(['card', ARCH, '--out', str(other), '--no-plot']) == 2
    assert 'is not a card of this model' in capsys.readouterr().err
    assert (other / 'routes.json').read_bytes() == before

    # --replace starts from the counts alone
    assert main(['card', ARCH, '--out', str(folder), '--no-plot', '--replace']) == 0
    assert all(r.top1 is None and not r.latency for r in RouteCard.load(folder / 'routes.json').routes)


def test_reported_by_needs_accuracies(tmp_path, capsys):
    assert main(['card', ARCH, '--out', str(tmp_path / 'c'), '--no-plot', '--reported-by', 'someone']) == 2
    assert '--reported-by marks accuracies, and there are none' in capsys.readouterr().err
    assert not (tmp_path / 'c').exists()


def test_with_measurements():
    model = tiny_snnet()
    base = RouteCard.from_model(model).with_accuracy({0: (60.0, None), 1: (61.0, 80.0)}, 'tiny/val', 'measured')
    base = base.with_latency('cpu-a', {0: {'median_ms': 1.0}}, {'what': 'latency', 'profile': 'cpu-a'})
    base.provenance.append({'what': 'a note of the author'})
    latency = RouteCard.from_model(model).with_latency(
        'cpu-b', {1: {'median_ms': 2.0}}, {'what': 'latency', 'profile': 'cpu-b'})

    merged = RouteCard.from_model(model).with_measurements(base).with_measurements(latency)
    assert _accuracies(merged) == _accuracies(base)
    assert (merged.routes[0].latency, merged.routes[1].latency) == ({'cpu-a': {'median_ms': 1.0}},
                                                                     {'cpu-b': {'median_ms': 2.0}})
    assert [p['what'] for p in merged.provenance] == ['macs, params', 'accuracy', 'latency', 'a note of the author',
                                                      'latency']

    # new accuracies for every route that had one replace the old ones and their provenance
    newer = RouteCard.from_model(model).with_accuracy({0: (70.0, None), 1: (71.0, None)}, 'tiny/test', 'measured')
    replaced = merged.with_measurements(newer)
    assert [(r.top1, r.accuracy['dataset']) for r in replaced.routes[:2]] == [(70.0, 'tiny/test'),
                                                                             (71.0, 'tiny/test')]
    assert [p.get('dataset') for p in replaced.provenance if p['what'] == 'accuracy'] == ['tiny/test']
    assert json.loads(json.dumps(replaced.to_dict())) == replaced.to_dict()
