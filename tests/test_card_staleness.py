"""Cards know what they measured: accuracy only for the weights and model arguments it was measured with, latency
of the model's current device and dtype (issue 14, faults 2 and 3)."""
from __future__ import annotations

import pytest
import timm
import torch
from official_layouts import official_state
from tiny_models import tiny_snnet

import timm_stitch
from timm_stitch.cards import RouteCard
from timm_stitch.convert import OFFICIAL_FORMATS, convert_official
from timm_stitch.errors import StaleCardError
from timm_stitch.hub import CARD_NAME, README_NAME, save_pretrained

FMNIST = 'snnet_vit_fmnist_tsb'


def _stale(model) -> str:
    reasons = {r.extra.get('accuracy_stale') for r in model.routes()} - {None}
    assert len(reasons) == 1 and all(r.top1 is None and r.top5 is None for r in model.routes())
    return reasons.pop()


def test_shipped_card_only_for_the_shipped_weights():
    model = timm.create_model(FMNIST, pretrained=True)
    assert model.route(2).top1 == 89.74 and model.route(2).extra.get('accuracy_stale') is None
    assert model.select_stitch(min_top1=89).top1 >= 89
    model.half()  # the weights ship in fp16: the cast loses nothing
    assert model.route(2).top1 == 89.74

    other = timm.create_model(FMNIST, pretrained=True, num_classes=5)  # the failing input of the issue
    assert other.card is not None and other.route(2).top1 is None
    assert 'num_classes=10 (the model has 5)' in _stale(other)
    with pytest.raises(StaleCardError, match='cannot select by min_top1: the route card is stale, .*num_classes=10'):
        other.select_stitch(min_top1=50)
    with pytest.raises(StaleCardError, match='the route card is stale'):
        other.pareto()
    assert other.select_stitch(max_macs=2e7).top1 is None  # cost bounds still work


@pytest.mark.parametrize('change', ['reset_classifier', 'init_stitches', 'load_state_dict', 'train_step'])
def test_changing_the_weights_invalidates_accuracy_at_once(change):
    model = timm.create_model(FMNIST, pretrained=True)
    shipped = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.select_stitch(min_top1=80).top1 >= 80  # the fingerprint is cached before the change
    if change == 'reset_classifier':
        model.reset_classifier(10)
    elif change == 'init_stitches':
        model.init_stitches(torch.randn(4, 1, 28, 28))
    elif change == 'load_state_dict':
        model.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in shipped.items()})
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 1, 28, 28), stitch_id=2).sum().backward()
        optimizer.step()
    assert model.route(2).top1 is None and 'measured on other weights' in _stale(model)
    with pytest.raises(StaleCardError, match='route card is stale, the card was measured on other weights'):
        model.select_stitch(min_top1=80)
    model.load_state_dict(shipped)  # the measured weights again: the card holds again
    assert model.route(2).top1 == 89.74


def test_card_without_fingerprint_is_keyed_on_load(tmp_path):
    model = tiny_snnet()
    card = RouteCard.from_model(model).with_accuracy({0: (60.0, None)}, 'tiny', 'measured')
    card.measured_with = None  # as cards written before timm-stitch recorded it
    with pytest.warns(UserWarning, match='records no weights fingerprint'):
        model.load_card(card)
    assert model.route(0).top1 == 60.0 and model.card.measured_with is not None
    model.reset_classifier(5)
    assert 'num_classes=10 (the model has 5)' in _stale(model)


def test_reported_card_is_keyed_to_the_release_weights():
    arch, kwargs = 'snnet_deit_tsb', dict(embed_dim=16, num_heads=2, img_size=32, num_classes=10)
    torch.manual_seed(0)
    release = official_state(timm.create_model(arch, **OFFICIAL_FORMATS[arch].model_kwargs, **kwargs), arch)
    model = convert_official(release, arch, **kwargs)
    assert model.card.measured_with is not None and all(r.top1 is not None for r in model.routes())
    model.reset_classifier(10)
    assert 'measured on other weights' in _stale(model)


def test_latency_follows_the_device_and_dtype(tmp_path):
    profiled = tiny_snnet()
    card = timm_stitch.profile(profiled, warmup=0, repeats=1, progress=False)  # float32, CPU
    first, second = tiny_snnet(), tiny_snnet()
    first.load_card(card)
    second.load_card(card)
    assert all(r.latency_ms is not None for r in first.routes())  # the order of the issue: first queried, then moved
    first.to(torch.bfloat16)
    second.to(torch.bfloat16)
    for model in (first, second):
        assert all(r.latency_ms is None and r.extra['latency_profile'] is None for r in model.routes())
        with pytest.raises(ValueError, match=r"no latency profile '.*-bs1-bfloat16' \(it holds: .*-bs1-float32\)"):
            model.select_stitch(max_latency_ms=1e9)
        assert model.latency_profile.endswith('-bs1-bfloat16')
    first.float()
    assert [r.latency_ms for r in first.routes()] == [r.latency_ms for r in profiled.routes()]


def test_stale_accuracies_are_not_published(tmp_path, caplog):
    model = timm.create_model(FMNIST, pretrained=True, num_classes=5)
    folder = save_pretrained(model, tmp_path / 'five')
    assert 'its accuracies are not saved' in caplog.text
    assert not RouteCard.load(folder / CARD_NAME).has_accuracy
    assert '89.74' not in (folder / README_NAME).read_text()


def test_accuracies_travel_with_their_key():
    model, other = tiny_snnet(), tiny_snnet(seed=1)
    mine = RouteCard.from_model(model).with_accuracy({0: (60.0, None), 1: (61.0, None)}, 'tiny', 'measured')
    theirs = RouteCard.from_model(other).with_accuracy({0: (70.0, None)}, 'tiny', 'measured')
    assert mine.measured_with != theirs.measured_with
    with pytest.warns(UserWarning, match='older ones are dropped'):
        merged = mine.with_measurements(theirs)
    assert merged.measured_with == theirs.measured_with
    assert [r.top1 for r in merged.routes[:2]] == [70.0, None]  # route 1's 61.0 was for other weights
    assert RouteCard.from_model(model).with_accuracy({0: (1.0, None)}, 'x', 'reported').measured_with is None
