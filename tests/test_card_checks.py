"""Route cards are checked when read and merged: a NaN, a string, a bad id is a ``CardError`` (a ``ValueError``)
naming the route and the field, at every way in (``routes.json``, JSON-lines results, ``load_card``,
``local-dir:``, merges), instead of winning selections or failing later."""
import json
import math

import pytest
import timm
from tiny_models import SMALL_ARCHS, tiny_snnet

import timm_stitch
from timm_stitch import CardError
from timm_stitch.cards import RouteCard
from timm_stitch.hub import CARD_NAME, save_pretrained


def _card_dict(model, **changes) -> dict:
    """``model``'s card as a dict, with ``changes`` (``'0.top1': nan``...) applied to its route entries."""
    data = RouteCard.from_model(model).with_accuracy({r.id: (50.0 + r.id, None) for r in model.routes()}, 'tiny',
                                                     'measured').to_dict()
    for key, value in changes.items():
        index, field = key.split('.')
        data['routes'][int(index)][field] = value
    return data


BAD_VALUES = [
    ({'0.top1': math.nan}, r'route 0: field top1 \(a percentage\) must be a finite number in \[0, 100\], got nan'),
    ({'0.top1': '88.2'}, r"route 0: field top1 \(a percentage\) must be a finite number, got str '88.2'"),
    ({'1.top5': 101.0}, r'route 1: field top5 .* in \[0, 100\], got 101.0'),
    ({'3.id': '3'}, r"route '3': field id must be an int, got str '3'"),
    ({'2.macs': -5}, r'route 2: field macs must be a finite number >= 0, got -5'),
    ({'2.cuts': [['a', 1]]}, r"route 2: field cuts\[0\]\[0\] must be an int, got str 'a'"),
    ({'2.latency': {'cpu': {'median_ms': math.inf}}}, r"route 2: field latency\['cpu'\]\['median_ms'\] .* got inf"),
    ({'4.id': 2}, 'route 2: field id repeats an earlier route'),
    ({'4.colour': 'red'}, r"routes\[4\] \(route 4\) has unknown fields \['colour'\]"),
]


@pytest.mark.parametrize('changes, message', BAD_VALUES, ids=[next(iter(c)) for c, _ in BAD_VALUES])
def test_bad_card_values_are_errors_naming_route_and_field(tmp_path, changes, message):
    model = tiny_snnet()
    path = tmp_path / 'routes.json'
    path.write_text(json.dumps(_card_dict(model, **changes)))
    with pytest.raises(CardError, match=message) as info:
        RouteCard.load(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(CardError, match=message):
        model.load_card(path)
    with pytest.raises(CardError, match=message):
        RouteCard.from_dict(_card_dict(model, **changes))


def test_a_nan_top1_no_longer_wins_selection(tmp_path):
    """The reported fault: ``top1: NaN`` on route 0 made ``select_stitch(max_macs=...)`` return route 0."""
    model = tiny_snnet()
    path = tmp_path / 'routes.json'
    path.write_text(json.dumps(_card_dict(model, **{'0.top1': math.nan})))
    with pytest.raises(CardError, match='route 0: field top1'):
        model.load_card(path)
    assert model.card is None


def test_official_jsonl_results_are_checked(tmp_path):
    path = tmp_path / 'results.txt'
    path.write_text('{"cfg_id": 0, "flops": 1.2, "acc1": 72.1}\n{"cfg_id": 1, "flops": 2.0, "acc1": NaN}\n')
    with pytest.raises(CardError, match=f'route card {path}: route 1: field top1'):
        RouteCard.load(path)
    path.write_text('{"cfg_id": "0", "flops": 1.2, "acc1": 72.1}\n')
    with pytest.raises(CardError, match="route '0': field id must be an int"):
        RouteCard.load(path)


def test_merges_check_what_they_take():
    model = tiny_snnet()
    card = RouteCard.from_model(model)
    with pytest.raises(CardError, match='route 3: field top1 .* got nan'):
        card.with_accuracy({3: (math.nan, None)}, 'tiny', 'measured')
    with pytest.raises(CardError, match=r"route 3: field latency\['cpu'\]\['median_ms'\] must be a finite number, got"):
        card.with_latency('cpu', {3: {'median_ms': 'slow'}}, {'what': 'latency', 'profile': 'cpu'})
    with pytest.raises(CardError, match='route 99: field id is out of range: the card has routes 0..22'):
        card.with_accuracy({99: (50.0, None)}, 'tiny', 'measured')
    assert card.with_accuracy({3: (50.0, 75.0)}, 'tiny', 'measured').route(3).top1 == 50.0


def test_a_saved_model_with_a_bad_card_fails_to_load_naming_it(tmp_path):
    kwargs, _ = SMALL_ARCHS['snnet_deit_tsb']
    model = timm.create_model('snnet_deit_tsb', **kwargs)
    folder = save_pretrained(model, tmp_path / 'model', card=RouteCard.from_model(model))
    card = json.loads((folder / CARD_NAME).read_text())
    card['routes'][5]['top1'] = 'high'
    (folder / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(CardError, match=f"route card {folder / CARD_NAME}: route 5: field top1"):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert timm_stitch.CardError is CardError
