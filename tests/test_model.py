"""The stitched model on tiny DeiT-like anchors: parity with timm, routes, switching, bad inputs, timm conventions."""
import threading

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from tiny_models import TINY_IMG, TINY_WIDTHS, tiny_images, tiny_snnet, tiny_vit_args

from timm_stitch import StitchedNet
from timm_stitch.errors import RouteIdError


@pytest.fixture(scope='module')
def model():
    return tiny_snnet()


@pytest.fixture(scope='module')
def images():
    return tiny_images()


def reference_route(model: StitchedNet, x: torch.Tensor, stitch_id: int, final_norm: bool = True) -> torch.Tensor:
    """Route semantics written out independently (SPEC §2.3): front blocks 0..j, stitch, end blocks k.., head."""
    route = model.plan.routes[stitch_id]
    (front_i, end_i), ((j, k),) = route.anchors, route.cuts
    front, end = model.anchors[front_i], model.anchors[end_i]
    stitch = model.stitch_layers['0'][route.stitches[0].pair][route.stitches[0].layer].transform
    x = front._pos_embed(front.patch_embed(x))
    for blk in front.blocks[:j + 1]:
        x = blk(x)
    x = x @ stitch.weight.T + stitch.bias
    for blk in end.blocks[k:]:
        x = blk(x)
    if final_norm:
        x = end.norm(x)
    return end.head(x[:, 0])


def test_anchors_are_plain_timm_models(model):
    assert len(model.anchors) == 3 and model.num_routes == 3 + 2 * (4 + 3 * 2)
    for anchor, (dim, heads) in zip(model.anchors, TINY_WIDTHS):
        fresh = timm.create_model(**tiny_vit_args(dim, heads))
        fresh.load_state_dict(anchor.state_dict())  # strict: same keys and shapes


@pytest.mark.parametrize('stitch_id', [0, 1, 2])
def test_anchor_routes_equal_timm_exactly(model, images, stitch_id):
    dim, heads = TINY_WIDTHS[stitch_id]
    timm_model = timm.create_model(**tiny_vit_args(dim, heads)).eval()
    timm_model.load_state_dict(model.anchors[stitch_id].state_dict())
    with torch.no_grad():
        assert (model(images, stitch_id=stitch_id) - timm_model(images)).abs().max().item() == 0


def test_stitched_routes_match_reference_semantics(model, images):
    with torch.no_grad():
        for stitch_id in range(3, model.num_routes):
            torch.testing.assert_close(model(images, stitch_id=stitch_id), reference_route(model, images, stitch_id))


def test_official_no_final_norm_flag(images):
    model = tiny_snnet(final_norm_on_stitched_routes=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images, stitch_id=5), reference_route(model, images, 5, final_norm=False))
        assert not torch.allclose(model(images, stitch_id=5), reference_route(model, images, 5, final_norm=True))
        anchor = model.anchors[1]
        assert torch.equal(model(images, stitch_id=1), anchor(images))  # anchors keep their norm


def test_every_route_runs_backward(images):
    model = tiny_snnet().train()
    for stitch_id in range(model.num_routes):
        model.zero_grad()
        out = model(images, stitch_id=stitch_id)
        assert out.shape == (len(images), 10)
        out.square().mean().backward()
        route = model.plan.routes[stitch_id]
        for ref in route.stitches:
            assert model.stitch_layer(ref).transform.weight.grad is not None
        unused = set(range(3)) - set(route.anchors)
        assert all(p.grad is None for a in unused for p in model.anchors[a].parameters())


def test_set_stitch_and_per_call_id(model, images):
    assert model.stitch_id == 2  # largest anchor by default
    model.set_stitch(7)
    try:
        assert model.stitch_id == 7
        with torch.no_grad():
            torch.testing.assert_close(model(images), model(images, stitch_id=7), rtol=0, atol=0)
            model(images, stitch_id=3)
        assert model.stitch_id == 7
        assert model.num_features == TINY_WIDTHS[1][0]
        model.set_stitch(0)
        assert model.num_features == TINY_WIDTHS[0][0] and model.route().anchors == (0,)
    finally:
        model.set_stitch(2)


def test_train_mode_honours_selected_route(images):
    model = tiny_snnet().train()  # no dropout / drop-path in the tiny anchors: outputs are deterministic
    model.set_stitch(9)
    with torch.no_grad():
        first, second = model(images), model(images)
        expected = model.eval()(images, stitch_id=9)
    assert torch.equal(first, second) and torch.equal(first, expected)


def test_per_call_stitch_id_is_thread_safe(model, images):
    ids = list(range(model.num_routes)) * 3
    with torch.no_grad():
        serial = {k: model(images, stitch_id=k) for k in set(ids)}
    results, errors = {}, []

    def worker(i: int, k: int) -> None:
        try:
            with torch.no_grad():
                results[i] = model(images, stitch_id=k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, k)) for i, k in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, k in enumerate(ids):
        assert torch.equal(results[i], serial[k]), f'route {k} differed under concurrency'


@pytest.mark.parametrize('bad, error, message', [
    (23, RouteIdError, r'stitch_id 23 is out of range: valid ids are 0\.\.22'),
    (-1, RouteIdError, r'stitch_id -1 is out of range: valid ids are 0\.\.22'),
    (1.5, TypeError, r'stitch_id must be an int, got float 1\.5'),
    ('3', TypeError, r"got str '3'"),
    (True, TypeError, r'got bool True'),
    (None, TypeError, r'got NoneType'),
])
def test_bad_stitch_ids(model, images, bad, error, message):
    model.set_stitch(4)
    try:
        with pytest.raises(error, match=message):
            model.set_stitch(bad)
        if bad is not None:
            with pytest.raises(error, match=message):
                model(images, stitch_id=bad)
        assert model.stitch_id == 4
    finally:
        model.set_stitch(2)


def test_numpy_and_tensor_ints_are_accepted(model):
    import numpy as np
    model.set_stitch(np.int64(5))
    assert model.stitch_id == 5 and type(model.stitch_id) is int
    model.set_stitch(2)


@pytest.mark.parametrize('shape, message', [
    ((2, 1, TINY_IMG, TINY_IMG), 'expected 3 input channels, got 1'),
    ((2, 3, 48, 48), f'expected {TINY_IMG}x{TINY_IMG} images, got 48x48'),
    ((3, TINY_IMG, TINY_IMG), r'expected a 4-D \(N, C, H, W\) image batch, got shape \(3, 32, 32\)'),
])
def test_bad_inputs(model, shape, message):
    model.set_stitch(6)
    for stitch_id in (None, 0, 10):
        with pytest.raises(ValueError, match=message):
            model(torch.zeros(shape), stitch_id=stitch_id)
    assert model.stitch_id == 6
    model.set_stitch(2)


def test_routes_records(model):
    routes = model.routes()
    assert [r.id for r in routes] == list(range(model.num_routes))
    assert routes[0].params == sum(p.numel() for p in model.anchors[0].parameters())
    r = routes[3]  # Ti blk0 -> stitch -> S blk0..3 -> S norm + head
    ti, s = model.anchors[0], model.anchors[1]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expected = (count(ti.patch_embed) + ti.cls_token.numel() + ti.pos_embed.numel() + count(ti.blocks[0])
                + count(model.stitch_layer(r.stitches[0])) + count(s.blocks) + count(s.norm) + count(s.head))
    assert r.cuts == ((0, 0),) and r.params == expected
    assert all(x.macs > 0 and x.top1 is None and x.latency_ms is None and x.dominated is None for x in routes)


def test_timm_conventions(images):
    model = tiny_snnet()
    model.set_stitch(1)
    assert model.get_classifier() is model.anchors[1].head
    with torch.no_grad():
        feats = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(feats), model(images))
        assert model.forward_head(feats, pre_logits=True).shape == (len(images), TINY_WIDTHS[1][0])
    model.reset_classifier(5)
    assert model.num_classes == 5 and all(a.head.out_features == 5 for a in model.anchors)
    assert model(images, stitch_id=12).shape == (len(images), 5)
    nwd = model.no_weight_decay()
    assert {'anchors.0.cls_token', 'anchors.2.pos_embed', 'stitch_layers.0.1.2.transform.bias'} <= nwd
    assert 'stitch_layers.0.1.2.transform.weight' not in nwd
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    named = dict(model.named_parameters())
    grouped = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert grouped == {id(p) for p in named.values()}
    decay_free = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(named['anchors.0.cls_token']) in decay_free
    assert id(named['stitch_layers.0.0.0.transform.bias']) in decay_free


def test_grad_checkpointing_matches(images):
    model = tiny_snnet().train()
    out = model(images, stitch_id=8)
    model.set_grad_checkpointing(True)
    out_ckpt = model(images, stitch_id=8)
    torch.testing.assert_close(out, out_ckpt)
    out_ckpt.sum().backward()
    assert model.anchors[0].blocks[0].attn.qkv.weight.grad is not None


def test_create_model_from_timm_registry():
    assert set(timm.list_models('snnet_deit_*')) >= {'snnet_deit_tsb', 'snnet_deit_ts', 'snnet_deit_sb'}
    assert timm.models.get_pretrained_cfg('snnet_deit_ts').classifier == ('anchors.0.head', 'anchors.1.head')
    model = timm.create_model('snnet_deit_ts', num_classes=7, depth=2)  # depth: passed to both anchors
    assert isinstance(model, StitchedNet) and model.num_classes == 7 and model.num_routes == 2 + 4
    assert model.anchor_names == ['deit_tiny_patch16_224', 'deit_small_patch16_224']
    assert model.pretrained_cfg['architecture'] == 'snnet_deit_ts'
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.875
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224), stitch_id=4).shape == (1, 7)


def test_unsupported_anchor_family():
    with pytest.raises(TypeError, match='cannot stitch a Linear'):
        StitchedNet([torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match='timm model name'):
        StitchedNet([42])


def test_drop_path_rate_per_anchor():
    """SN-Netv2 gives each anchor its own drop-path rate: a sequence is split, one rate per anchor."""
    specs = [tiny_vit_args(d, h) for d, h in TINY_WIDTHS[:2]]
    model = StitchedNet(specs, drop_path_rate=(0.0, 0.3))
    assert isinstance(model.anchors[0].blocks[-1].drop_path1, torch.nn.Identity)
    assert model.anchors[1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    shared = StitchedNet(specs, drop_path_rate=0.3)
    assert [a.blocks[-1].drop_path1.drop_prob for a in shared.anchors] == [pytest.approx(0.3)] * 2
    with pytest.raises(ValueError, match=r'drop_path_rate has 3 values .* one per anchor \(2\)'):
        StitchedNet(specs, drop_path_rate=(0.0, 0.1, 0.2))


def test_timm_device_and_dtype_arguments_place_every_module():
    """timm's factory ``device``/``dtype`` reach the stitching layers too, not only the anchors built by name."""
    specs = [tiny_vit_args(d, h) for d, h in TINY_WIDTHS[:2]]
    on_meta = timm.create_model('snnet', anchors=specs, device='meta')
    assert {p.device.type for p in on_meta.parameters()} == {'meta'}
    assert [r.macs for r in on_meta.routes()] == [r.macs for r in timm.create_model('snnet', anchors=specs).routes()]
    assert {p.dtype for p in StitchedNet(specs, dtype=torch.float64).parameters()} == {torch.float64}
