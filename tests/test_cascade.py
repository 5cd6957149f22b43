"""Confidence cascades: answers, prefix reuse, the threshold sweep and its record in the route card."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from tiny_models import tiny_images, tiny_snnet

import timm_stitch
from timm_stitch import Cascade, RouteCard
from timm_stitch.cascade import (
    add_cascade_curve,
    confidence,
    route_logits,
    select_cascade,
    stage_macs_of,
    sweep_thresholds,
)
from timm_stitch.errors import RouteIdError, StaleCardError
from timm_stitch.macs import count_anchor_macs
from timm_stitch.serving import cascade_stage_macs, first_segment_length, prefix_macs


@pytest.fixture(scope='module')
def model():
    return tiny_snnet()


def _from_anchor(model, anchor):
    return [r.id for r in model.plan.routes if not r.is_anchor and r.anchors[0] == anchor]


def _reference(model, x, routes, thresholds, kind):
    """The definition with plain route calls: each stage's route on the samples still unanswered."""
    out = torch.empty(len(x), 10)
    answered = torch.full((len(x),), -1)
    active = torch.arange(len(x))
    for i, k in enumerate(routes):
        if not len(active):
            break
        logits = model(x[active], stitch_id=k)
        take = torch.ones(len(active), dtype=torch.bool) if i == len(routes) - 1 else \
            confidence(logits, kind) >= thresholds[i]
        out[active[take]], answered[active[take]] = logits[take], k
        active = active[~take]
    return out, answered


@pytest.mark.parametrize('kind', ['max_softmax', 'margin'])
def test_cascade_answers_are_the_answering_routes_outputs(model, kind):
    first = _from_anchor(model, 0)
    routes = [first[-1], first[0], 2]  # two stitched routes sharing anchor 0's prefix, then anchor B
    x = tiny_images(16, seed=3)
    with torch.no_grad():
        thresholds = [float(confidence(model(x, stitch_id=k), kind).median()) for k in routes[:2]]
        out = Cascade(model, routes, thresholds, confidence=kind)(x)
        expected, answered = _reference(model, x, routes, thresholds, kind)
    assert torch.equal(out.route, answered)
    assert set(answered.tolist()) == set(routes), 'every stage answers some samples'
    assert torch.equal(out.logits, expected)


def test_cascade_reuses_the_shared_prefix(model, monkeypatch):
    first = _from_anchor(model, 0)
    calls = []
    adapter = model.adapters[0]
    embed = adapter.embed
    monkeypatch.setattr(adapter, 'embed', lambda x: calls.append(len(x)) or embed(x))
    with torch.no_grad():
        Cascade(model, [first[0], first[-1]], threshold=1.0)(tiny_images(6))  # nothing reaches 1.0: all escalate
    assert calls == [6], 'the second route resumes from the first route\'s activations'


def test_cascade_stage_macs_subtract_the_resumed_prefix(model):
    first = _from_anchor(model, 0)
    routes = [first[0], first[-1], 2]
    counted = model.counted_routes()
    anchor = count_anchor_macs(model)[0][0]
    depth = min(first_segment_length(model, first[0]), first_segment_length(model, first[-1]))
    resumed = counted[first[-1]].macs - prefix_macs(anchor, depth)
    assert stage_macs_of(model, routes) == [counted[first[0]].macs, resumed, counted[2].macs]
    assert cascade_stage_macs(counted, count_anchor_macs(model)[0], routes, share_prefix=False) == [
        counted[k].macs for k in routes]


def test_bad_cascades_raise(model):
    with pytest.raises(ValueError, match='2 thresholds for a cascade of 2 routes'):
        Cascade(model, [0, 1], [0.5, 0.6])
    with pytest.raises(ValueError, match="unknown confidence 'entropy'"):
        Cascade(model, [0, 1], 0.5, confidence='entropy')
    with pytest.raises(RouteIdError, match='out of range'):
        Cascade(model, [0, 99], 0.5)


def test_sweep_on_synthetic_logits():
    targets = torch.tensor([0, 1, 0, 1])
    cheap = torch.tensor([[4., 0.], [0., 4.], [0.1, 0.], [0.1, 0.]])  # confident and right / unsure
    cheap[1] = torch.tensor([4., 0.])  # confident and wrong
    big = torch.tensor([[0., 1.], [0., 1.], [1., 0.], [0., 1.]])
    curve = sweep_thresholds([cheap, big], targets, [10, 100], [0.0, 0.9, 1.0])
    # t=0: the cheap route answers all (2 right); t=0.9: it answers the two confident ones (1 right), the big one
    # the two others (both right); t=1.0: the big one answers all (3 right)
    assert curve == [
        {'threshold': 0.0, 'top1': 50.0, 'mean_macs': 10.0},
        {'threshold': 0.9, 'top1': 75.0, 'mean_macs': 60.0},
        {'threshold': 1.0, 'top1': 75.0, 'mean_macs': 110.0},
    ]


def test_cascade_curve_round_trips_through_the_card(model, tmp_path):
    card = RouteCard.from_model(model)
    curve = [{'threshold': 0.5, 'top1': 80.0, 'mean_macs': 1e6}, {'threshold': 0.9, 'top1': 85.0, 'mean_macs': 2e6}]
    card = add_cascade_curve(card, [0, 2], 'max_softmax', curve, dataset='fashion-mnist/test[5000:]')
    card.save(tmp_path / 'routes.json')
    loaded = RouteCard.load(tmp_path / 'routes.json')
    assert loaded.cascades == card.cascades
    assert select_cascade(loaded, 1.5e6) == {'routes': [0, 2], 'confidence': 'max_softmax', **curve[0]}
    assert select_cascade(loaded, 5e6)['top1'] == 85.0
    with pytest.raises(ValueError, match='cheapest needs 1e\\+06'):
        select_cascade(loaded, 10)
    assert card.without_accuracy().cascades == []


def test_cascade_is_exported():
    assert timm_stitch.Cascade is Cascade


def test_card_plot_draws_the_cascade_curve(model, tmp_path):
    from timm_stitch.card_readme import plot_card
    card = RouteCard.from_model(model).with_accuracy({r.id: (50.0 + r.id, None) for r in model.plan.routes},
                                                      dataset='tiny/val', source='measured')
    plot_card(card, tmp_path / 'plain.png')
    curve = [{'threshold': 0.5, 'top1': 60.0, 'mean_macs': 1e6}, {'threshold': 0.9, 'top1': 70.0, 'mean_macs': 2e6}]
    plot_card(add_cascade_curve(card, [0, 2], 'margin', curve, 'tiny/val'), tmp_path / 'cascade.png')
    assert (tmp_path / 'plain.png').read_bytes() != (tmp_path / 'cascade.png').read_bytes()


def test_card_merge_carries_cascades_with_their_weights(model):
    curve = [{'threshold': 0.5, 'top1': 60.0, 'mean_macs': 1e6}]
    base = RouteCard.from_model(model).with_accuracy({0: (50.0, None)}, dataset='tiny/val', source='measured')
    old = add_cascade_curve(base, [0, 2], 'margin', curve, 'tiny/val')
    other = add_cascade_curve(base, [1, 2], 'margin', curve, 'tiny/val')
    assert [c['routes'] for c in old.with_measurements(other).cascades] == [[0, 2], [1, 2]]
    retrained = dict(base.measured_with, weights_fingerprint='other weights')
    other.measured_with = retrained
    with pytest.warns(UserWarning, match='older ones are dropped'):
        merged = old.with_measurements(other)
    assert [c['routes'] for c in merged.cascades] == [[1, 2]], 'a cascade measured on other weights is dropped'


@pytest.mark.families('swin', 'resnet', 'levit', 'convnext', 'eva')
def test_cascade_answers_per_family(family, family_net):
    model = family_net.model.eval()
    front = model.plan.routes[-1].anchors[0]
    stitched = _from_anchor(model, front)
    routes = [stitched[0], stitched[-1], len(model.anchors) - 1]
    x = torch.randn(12, *family_net.images.shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # uncalibrated BatchNorm routes
        first = confidence(model(x, stitch_id=routes[0]))
        escalated = first < first.median()
        thresholds = [float(first.median()), float(confidence(model(x[escalated], stitch_id=routes[1])).median())]
        out = Cascade(model, routes, thresholds)(x)
        expected, answered = _reference(model, x, routes, thresholds, 'max_softmax')
    assert torch.equal(out.route, answered)
    assert set(answered.tolist()) == set(routes), 'every stage answers some samples'
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)  # resumed prefixes: batch-size rounding


def test_shipped_fmnist_card_selects_a_cascade():
    model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    cascade = Cascade.select(model, max_macs=26e6)  # the card's curve: Ti then B, margin 0.67 at 25.4 mean MMACs
    assert (cascade.routes, cascade.thresholds, cascade.confidence) == ([0, 2], [0.67], 'margin')
    assert Cascade.select(model, max_macs=25e6).thresholds == [0.66]  # the budget picks the point
    with pytest.raises(ValueError, match='no route card'):
        Cascade.select(tiny_snnet(), 1e9)
    other_heads = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, num_classes=5).eval()
    with pytest.raises(StaleCardError, match='route card is stale .*num_classes=10'):
        Cascade.select(other_heads, max_macs=26e6)


def test_route_logits_are_each_routes_outputs(model):
    x = tiny_images(6, seed=4)
    data = [(x[:4], torch.tensor([0, 1, 2, 3])), (x[4:], torch.tensor([4, 5]))]
    logits, targets = route_logits(model, [3, 0], data, progress=False)
    assert torch.equal(targets, torch.arange(6))
    with torch.no_grad():
        for k, got in zip([3, 0], logits):
            assert torch.equal(got, torch.cat([model(x[:4], stitch_id=k), model(x[4:], stitch_id=k)]))


def test_cascade_arguments_are_checked(model):
    with pytest.raises(ValueError, match=r"threshold 1.5 is not a confidence: expected a number in \[0, 1\]"):
        Cascade(model, [0, 2], threshold=1.5)
    for bad in (float('nan'), -0.5, True, '0.9'):
        with pytest.raises(ValueError, match='is not a confidence'):
            Cascade(model, [0, 2], threshold=[bad])
    with pytest.raises(ValueError, match='repeat a route'):
        Cascade(model, [0, 0, 2], threshold=0.5)
    # numpy and torch forms of the same arguments
    cascade = Cascade(model, np.array([0, 2]), threshold=torch.tensor(0.5))
    assert (cascade.routes, cascade.thresholds) == ([0, 2], [0.5])
    assert Cascade(model, torch.tensor([0, 2]), threshold=np.float32(0.5)).thresholds == [0.5]


def test_cascade_of_a_compiled_model_is_the_model_inside():
    model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    compiled = torch.compile(model, backend='eager')
    assert Cascade.select(compiled, max_macs=25e6).routes == Cascade.select(model, max_macs=25e6).routes
    assert Cascade(compiled, [0, 2], threshold=0.5).model is model
