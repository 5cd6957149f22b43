"""``profile`` on a busy machine: timings that spread widely are measured again, and a route whose timings stay
unstable gets no latency in the card, with a warning (a fake timer makes the load deterministic)."""
import itertools
import warnings

import pytest
import torch
from tiny_models import tiny_snnet

import timm_stitch.profiling as profile_module
from timm_stitch.profiling import UnstableTimingWarning, profile, timing_spread, unstable_routes


def test_spread_is_the_relative_interquartile_range():
    assert timing_spread([2.0] * 10) == 0
    assert timing_spread([2.0] * 9 + [466.0]) == 0  # one outlier leaves the median alone
    assert timing_spread([2.0, 466.0] * 5) > 1
    assert unstable_routes({0: [2.0] * 10, 1: [2.0, 466.0] * 5, 2: [1.0, 1.2] * 5}, max_spread=0.5) == {1: 1.983}


def _fake_timer(monkeypatch, noisy_passes: dict[int, int]):
    """Route ``k`` alternates 2 ms and 466 ms during its first ``noisy_passes[k]`` timed passes (warm-up calls
    excluded), then takes 2 ms + id/100; every other route is steady."""
    calls: dict[int, itertools.count] = {}

    def timed(model, stitch_id, images):
        n = next(calls.setdefault(stitch_id, itertools.count()))
        noisy = n < noisy_passes.get(stitch_id, 0) * 10 + 2  # + the 2 warm-up calls
        return 466.0 if noisy and n % 2 else 2.0 + stitch_id / 100

    monkeypatch.setattr(profile_module, '_timed_call', timed)


@torch.no_grad()
def test_unstable_routes_are_measured_again_then_left_out_with_a_warning(monkeypatch, tmp_path):
    model = tiny_snnet()
    _fake_timer(monkeypatch, {0: 1, 4: 5})  # route 0: busy once; route 4: busy throughout
    with pytest.warns(UnstableTimingWarning, match=r'routes \[4\] timed unstably .* after 2 re-measurements'):
        card = profile(model, routes=[0, 4, 7], out=str(tmp_path / 'routes.json'), progress=False)
    key = model.latency_profile
    assert card.route(0).latency[key]['median_ms'] == 2.0  # re-measured: not the busy 234 ms
    assert card.route(7).latency[key]['median_ms'] == 2.07
    assert key not in card.route(4).latency
    record = next(p for p in card.provenance if p.get('profile') == key)
    assert record['retimed'] == [0, 4] and list(record['unstable']) == ['4']
    assert model.routes()[4].latency_ms is None and model.routes()[0].latency_ms == 2.0


@torch.no_grad()
def test_steady_timings_are_written_without_warning_and_the_check_can_be_off(monkeypatch):
    model = tiny_snnet()
    _fake_timer(monkeypatch, {})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        card = profile(model, routes=[1, 2], progress=False)
    assert card.route(2).latency[model.latency_profile]['median_ms'] == 2.02
    _fake_timer(monkeypatch, {1: 5})
    card = profile(model, routes=[1], progress=False, max_spread=None)
    assert card.route(1).latency[model.latency_profile]['median_ms'] == 234.005  # what was asked for
    with pytest.raises(ValueError, match='max_spread must be a positive number'):
        profile(model, routes=[1], progress=False, max_spread=0)
