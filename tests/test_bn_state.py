"""Per-route BatchNorm statistics are registered state: in the state_dict, moved by ``.to()``, saved and loaded with
the weights (``save_pretrained`` -> ``local-dir:``), kept by ``export_stitch``; old checkpoints without them load."""
import copy
import warnings

import pytest
import safetensors.torch
import timm
import torch
from tiny_models import SMALL_ARCHS, TINY_LEVIT_ARCH
from torch import nn

import timm_stitch
from timm_stitch.bn import stitched_bn_layers
from timm_stitch.hub import WEIGHTS_NAME, save_pretrained

ROUTE = 3


def _levit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('snnet_levit_192_256', **{**TINY_LEVIT_ARCH, **kwargs}).eval()


def _images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def calibrated():
    """A tiny LeViT SN-Net calibrated on route 3, its test images and route 3's calibrated output."""
    model = _levit()
    model.recalibrate_bn(_images(16, 1) * 3 + 1, stitch_id=ROUTE, batch_size=8, progress=False)
    images = _images(2, 2)
    with torch.no_grad():
        return model, images, model(images, stitch_id=ROUTE)


def _route_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Route 3's eval output, failing on any warning (an uncalibrated route warns)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('error')
        return model(images, stitch_id=ROUTE)


def test_state_dict_into_a_fresh_model_keeps_the_calibration(calibrated):
    model, images, expected = calibrated
    state = model.state_dict()
    assert any(k.startswith(f'route_bn.{ROUTE}.') for k in state)
    fresh = _levit(seed=1)
    fresh.load_state_dict(state)  # strict
    assert torch.equal(_route_output(fresh, images), expected)
    assert fresh.state_dict().keys() == state.keys()
    keys = list(state)  # last, so that timm's EMA (which zips two state_dicts) pairs every other entry right
    first = next(i for i, k in enumerate(keys) if k.startswith('route_bn.'))
    assert all(k.startswith('route_bn.') for k in keys[first:])


def test_to_dtype_moves_the_route_statistics(calibrated):
    model, images, expected = calibrated
    double = copy.deepcopy(model).to(torch.float64)
    stats = [v for k, v in double.state_dict().items() if k.startswith('route_bn.')]
    assert stats and all(v.dtype == torch.float64 for v in stats)
    out = _route_output(double, images.double())
    torch.testing.assert_close(out.float(), expected, atol=1e-4, rtol=1e-4)


def test_save_pretrained_then_local_dir_is_bit_exact_without_warning(calibrated, tmp_path):
    model, images, expected = calibrated
    folder = save_pretrained(model, tmp_path / 'levit')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert torch.equal(_route_output(loaded, images), expected)
    with torch.no_grad():
        assert torch.equal(loaded.export_stitch(ROUTE)(images), expected)


def test_export_stitch_of_a_loaded_model_keeps_the_calibration(calibrated):
    model, images, expected = calibrated
    fresh = _levit(seed=1)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.export_stitch(ROUTE)(images), expected)


def test_old_checkpoint_without_route_statistics_loads_and_warns(calibrated, tmp_path):
    model, images, expected = calibrated
    old = {k: v for k, v in model.state_dict().items() if not k.startswith('route_bn.')}
    fresh = _levit(seed=1)
    fresh.load_state_dict(model.state_dict())
    fresh.load_state_dict(old)  # strict: the loaded weights replace the calibration
    with pytest.warns(UserWarning, match=f'recalibrate_bn.*stitch_id={ROUTE}'), torch.no_grad():
        stale = fresh(images, stitch_id=ROUTE)
    assert not torch.allclose(stale, expected)
    assert not any(k.startswith('route_bn.') for k in fresh.state_dict())
    # timm's pretrained loading of an old folder
    folder = save_pretrained(model, tmp_path / 'old')
    safetensors.torch.save_file({k: v.contiguous() for k, v in old.items()}, str(folder / WEIGHTS_NAME),
                                metadata={'format': 'pt'})
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with pytest.warns(UserWarning, match='recalibrate_bn'), torch.no_grad():
        assert torch.equal(loaded(images, stitch_id=ROUTE), stale)


def test_statistics_of_unknown_routes_or_wrong_shapes_are_refused(calibrated):
    model, _, _ = calibrated
    state = model.state_dict()
    key = f'route_bn.{ROUTE}.running_mean_0'
    unknown = {**state, 'route_bn.99.running_mean_0': state[key]}
    with pytest.raises(RuntimeError, match='route_bn.99.running_mean_0'):
        _levit().load_state_dict(unknown)
    with pytest.raises(RuntimeError, match=key):
        _levit().load_state_dict({**state, key: state[key][:-1]})


def test_each_model_has_its_own_lock_and_copies(calibrated):
    model, images, expected = calibrated
    other = _levit()
    assert model.route_bn.lock is not other.route_bn.lock
    copied = copy.deepcopy(model)
    assert copied.route_bn.lock is not model.route_bn.lock
    assert torch.equal(_route_output(copied, images), expected)


def test_reset_classifier_drops_the_statistics():
    model = _levit()
    model.recalibrate_bn(_images(8, 1), stitch_id=ROUTE, progress=False)
    model.reset_classifier(5)
    assert not any(k.startswith('route_bn.') for k in model.state_dict())
    assert model.anchors[1].head.bn in stitched_bn_layers(model, ROUTE)


def _traced_bn_after_stitch(model: nn.Module, stitch_id: int, images: torch.Tensor) -> list[nn.Module]:
    """The BatchNorm layers an eval forward of the route calls after its first stitching layer, in call order."""
    called, stitched = [], [False]

    def on_stitch(*_) -> None:
        stitched[0] = True

    def on_bn(module: nn.Module, *_) -> None:
        if stitched[0] and module not in called:
            called.append(module)

    route = model.plan.routes[stitch_id]
    handles = [model.stitch_layer(route.stitches[0]).register_forward_hook(on_stitch)]
    handles += [m.register_forward_pre_hook(on_bn) for m in model.anchors.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')
            model(images, stitch_id=stitch_id)
    finally:
        for h in handles:
            h.remove()
    return called


@pytest.mark.parametrize('arch, kwargs, size', [
    ('snnet_levit_192_256', TINY_LEVIT_ARCH, 64),
    ('snnet_resnet_18_50', SMALL_ARCHS['snnet_resnet_18_50'][0], 32),
])
def test_layers_found_statically_are_those_the_route_runs(arch, kwargs, size):
    model = timm.create_model(arch, **kwargs).eval()
    images = _images(1, 0, size)
    for route in model.plan.routes:
        traced = _traced_bn_after_stitch(model, route.id, images) if not route.is_anchor else []
        assert list(stitched_bn_layers(model, route.id)) == traced, route.id


@pytest.mark.slow
def test_full_size_levit_calibrated_route_round_trips_bit_exact(tmp_path):
    """The real-size snnet_levit_192_256 (untrained): route 3 calibrated, saved, loaded with ``local-dir:``."""
    torch.manual_seed(0)
    model = timm.create_model('snnet_levit_192_256').eval()
    model.recalibrate_bn(_images(8, 1, 224), stitch_id=ROUTE, batch_size=4, num_batches=2, progress=False)
    images = _images(2, 2, 224)
    expected = _route_output(model, images)
    folder = save_pretrained(model, tmp_path / 'levit')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert torch.equal(_route_output(loaded, images), expected)


@pytest.mark.parametrize('wrapper', [torch.compile, nn.DataParallel])  # neither compiles nor copies here
def test_recalibrate_bn_of_a_wrapped_model_calibrates_the_model_inside(calibrated, wrapper):
    model, images, expected = calibrated
    fresh = _levit()
    count = timm_stitch.recalibrate_bn(wrapper(fresh), _images(16, 1) * 3 + 1, stitch_id=ROUTE, batch_size=8,
                                       progress=False)
    assert count == len(stitched_bn_layers(fresh, ROUTE))
    assert torch.equal(_route_output(fresh, images), expected)


def test_forward_head_alone_uses_the_routes_statistics(calibrated):
    """LeViT's heads hold BatchNorm layers: forward_features then forward_head equals the route's forward."""
    model, images, expected = calibrated
    with torch.no_grad():
        features = model.forward_features(images, stitch_id=ROUTE)
        assert torch.equal(model.forward_head(features, stitch_id=ROUTE), expected)
