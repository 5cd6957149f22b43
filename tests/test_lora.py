"""Low-rank (LoRA) stitching layers, as SN-Netv2 trains them: a frozen base weight plus a trained rank-r update.

The state dict always holds the unmerged ``transform.{weight,bias,lora_A,lora_B}`` (the official key names); routes
cost and count as the plain linear layers the updates merge into, which is what ``export_stitch`` and a merged
``save_pretrained`` deliver.
"""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import timm
import torch
from image_folders import ANCHORS, make_image_folder, write_config
from tiny_models import tiny_images, tiny_snnet
from torch import nn

import timm_stitch  # noqa: F401  (registers the architectures)
from timm_stitch import StitchedNet
from timm_stitch.cards import RouteCard
from timm_stitch.hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, push_to_hub, save_pretrained
from timm_stitch.stitching import LoRALinear, StitchingLayer, merge_lora
from timm_stitch.train import main as train_main
from timm_stitch.train import param_groups

RANK = 4
#: a registered architecture with tiny anchors (all 16 wide, 2 blocks): 11 routes
SMALL = dict(embed_dim=16, num_heads=2, img_size=32, num_classes=10, depth=2)
LORA_KEYS = ('transform.weight', 'transform.bias', 'transform.lora_A', 'transform.lora_B')


def _randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Give every low-rank update a non-zero B (as after training), so that merging has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
                m.bias.add_(torch.randn(m.bias.shape, generator=g))


def _lora_twin(net: StitchedNet, rank: int = RANK) -> StitchedNet:
    """``net``'s anchors (copied) stitched again with low-rank stitching layers."""
    stages = tuple(sorted({g.stage for g in net.plan.groups}))
    return StitchedNet(copy.deepcopy(list(net.anchors)), stages=stages, stitch_lora_rank=rank).eval()


# ---- the layer --------------------------------------------------------------------------------------------------

def test_layer_parameters_names_init_and_output():
    torch.manual_seed(0)
    layer = StitchingLayer(8, 12, lora_rank=RANK)
    state = layer.state_dict()
    assert tuple(state) == LORA_KEYS
    assert state['transform.lora_A'].shape == (RANK, 8) and state['transform.lora_B'].shape == (12, RANK)
    assert not state['transform.lora_B'].any() and state['transform.lora_A'].abs().sum() > 0
    t = layer.transform
    assert (t.weight.requires_grad, t.bias.requires_grad, t.lora_A.requires_grad, t.lora_B.requires_grad) == (
        False, True, True, True)
    assert t.scaling == 1 / RANK and (layer.lora_rank, layer.lora_alpha) == (RANK, 1.0)  # official: alpha 1

    _randomize_lora(layer)
    x = torch.randn(2, 5, 8)
    expected = x @ t.weight.T + t.bias + (x @ t.lora_A.T @ t.lora_B.T) * (1 / RANK)
    torch.testing.assert_close(layer(x), expected)
    two = StitchingLayer(8, 12, lora_rank=RANK, lora_alpha=8.0)
    two.load_state_dict(layer.state_dict())
    torch.testing.assert_close(two(x) - layer(x), (x @ t.lora_A.T @ t.lora_B.T) * (7 / RANK))


def test_state_dict_and_output_do_not_depend_on_the_mode():
    layer = StitchingLayer(8, 12, lora_rank=RANK)
    _randomize_lora(layer)
    x = torch.randn(3, 8)
    train_state = {k: v.clone() for k, v in layer.train().state_dict().items()}
    train_out = layer(x)
    eval_state = layer.eval().state_dict()
    assert all(torch.equal(train_state[k], eval_state[k]) for k in LORA_KEYS)
    torch.testing.assert_close(layer(x), train_out)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), train_out)
    layer.train()
    assert torch.equal(layer.state_dict()['transform.weight'], train_state['transform.weight'])


def test_merge_lora_gives_a_plain_linear_computing_the_same():
    layer = StitchingLayer(8, 12, 'nhwc', lora_rank=RANK, lora_alpha=2.0)
    _randomize_lora(layer)
    x = torch.randn(2, 3, 3, 8)
    merged = merge_lora(layer.transform)
    assert type(merged) is nn.Linear and set(merged.state_dict()) == {'weight', 'bias'}
    torch.testing.assert_close(merged(x), layer.transform(x))
    expected = layer(x)
    assert layer.merge_lora_() is layer and type(layer.transform) is nn.Linear and layer.lora_rank == 0
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize('kwargs, match', [
    (dict(layout='nchw'), "lora_rank=4.*not 'nchw'"),
    (dict(layout='nchw', out_layout='tokens'), "lora_rank=4.*not 'nchw'"),
    (dict(lora_rank=-1), 'lora_rank must be an int >= 0.*-1'),
    (dict(lora_rank=2.5), 'lora_rank must be an int >= 0.*2.5'),
    (dict(lora_rank=9), r'stitch_lora_rank 9 is above .* 8 -> 12 .* valid ranks are 0\.\.8'),
])
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StitchingLayer(8, 12, **{'lora_rank': RANK, **kwargs})


@pytest.mark.families('resnet', 'convnext', 'resnet_swin')
def test_nchw_families_refuse_a_rank(family, family_net):
    with pytest.raises(ValueError, match="not 'nchw' feature maps"):
        _lora_twin(family_net.model)


# ---- the stitched network ---------------------------------------------------------------------------------------

def test_every_stitching_layer_is_low_rank_with_the_official_keys():
    model = tiny_snnet(stitch_lora_rank=RANK)
    layers = [m for m in model.stitch_layers.modules() if isinstance(m, StitchingLayer)]
    assert layers and all(isinstance(m.transform, LoRALinear) and m.lora_rank == RANK for m in layers)
    keys = [k for k in model.state_dict() if k.startswith('stitch_layers.0.0.0.')]
    assert keys == [f'stitch_layers.0.0.0.{k}' for k in LORA_KEYS]
    plain = tiny_snnet()
    assert model.num_routes == plain.num_routes
    for k, v in plain.state_dict().items():
        assert model.state_dict()[k].shape == v.shape, k


def test_ls_init_sets_the_base_weight_and_the_route_is_the_ls_fit():
    images = tiny_images(16)
    plain, lora = tiny_snnet(), tiny_snnet(stitch_lora_rank=RANK)
    _randomize_lora(lora)  # set_affine also resets a trained update
    for model in (plain, lora):
        model.init_stitches(images, progress=False)
    state = lora.state_dict()
    for k, v in plain.state_dict().items():
        if k.startswith('stitch_layers.'):
            assert torch.equal(state[k], v), k
    assert not any(v.any() for k, v in state.items() if k.endswith('lora_B'))
    x = tiny_images(2, seed=1)
    for k in range(plain.num_routes):
        torch.testing.assert_close(lora(x, stitch_id=k), plain(x, stitch_id=k))


@pytest.mark.families('deit', 'eva', 'swin', 'levit')
def test_routes_cost_and_count_as_plain_linear_stitches(family, family_net):
    plain = family_net.model.eval()
    lora = _lora_twin(plain)
    assert [(r.macs, r.params) for r in lora.routes()] == [(r.macs, r.params) for r in plain.routes()]


@pytest.mark.families('deit', 'swin')
def test_export_merges_every_stitch_and_matches_the_route(family, family_net):
    model = _lora_twin(family_net.model)
    _randomize_lora(model)
    x = family_net.images
    stitched = [r for r in model.routes() if not r.is_anchor]
    for route in [[r for r in stitched if r.stage == s][i] for s in {r.stage for r in stitched} for i in (0, -1)]:
        exported = model.export_stitch(route.id)
        assert not any('lora' in k for k in exported.state_dict()), route.id
        assert not any(isinstance(m, LoRALinear) for m in exported.modules())
        assert all(type(s.transform) is nn.Linear for s in exported.stitches)
        assert sum(p.numel() for p in exported.parameters()) == route.params
        torch.testing.assert_close(exported(x), model(x, stitch_id=route.id), rtol=1e-5, atol=1e-5)
    # the model itself keeps its low-rank layers
    assert any(isinstance(m, LoRALinear) for m in model.modules())


def test_merged_export_goes_through_torch_export():
    model = tiny_snnet(stitch_lora_rank=RANK)
    _randomize_lora(model)
    x = tiny_images(2)
    program = torch.export.export(model.export_stitch(5), (x,))
    assert not any('lora' in name for name in program.state_dict)
    torch.testing.assert_close(program.module()(x), model(x, stitch_id=5), rtol=1e-5, atol=1e-5)


def test_optimizer_groups_hold_the_update_and_bias_but_not_the_frozen_weight():
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4, stitch_lora_rank=RANK)
    model.anchors.requires_grad_(False)  # --freeze-anchors
    groups = param_groups(model, weight_decay=0.05, stitch_lr_scale=10)
    handed = {id(p) for g in groups for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in handed}
    stitch = {n for n, _ in model.stitch_layers.named_parameters(prefix='stitch_layers')}
    assert names == {n for n in stitch if not n.endswith('.transform.weight')}
    assert all(g['lr_scale'] == 10 for g in groups)


# ---- saving and loading -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def lora_model():
    torch.manual_seed(0)
    model = timm.create_model('snnet_deit_tsb', stitch_lora_rank=RANK, stitch_lora_alpha=2.0, **SMALL).eval()
    _randomize_lora(model)
    card = RouteCard.from_model(model).with_accuracy({i: (50.0 + i, None) for i in range(model.num_routes)},
                                                      dataset='imagenet-1k/validation', source='measured')
    model.load_card(card)
    return model


def test_save_unmerged_round_trips_exactly(hub, lora_model, tmp_path):
    folder = save_pretrained(lora_model, tmp_path / 'lora')
    config = json.loads((folder / CONFIG_NAME).read_text())['model_args']
    assert (config['stitch_lora_rank'], config['stitch_lora_alpha']) == (RANK, 2.0)
    saved = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    state = lora_model.state_dict()
    assert saved.keys() == state.keys() and any(k.endswith('lora_A') for k in saved)
    assert all(torch.equal(saved[k], v) for k, v in state.items())

    push_to_hub(lora_model, 'someone/lora-snnet')
    loaded = timm.create_model('hf-hub:someone/lora-snnet', pretrained=True).eval()  # structure from config.json
    assert isinstance(loaded.stitch_layers['0'][0][0].transform, LoRALinear)
    assert loaded.stitch_layers['0'][0][0].lora_alpha == 2.0
    x = tiny_images(2)
    for k in range(lora_model.num_routes):
        assert torch.equal(loaded(x, stitch_id=k), lora_model(x, stitch_id=k))
    assert loaded.routes()[3].top1 == 53.0

    with pytest.raises(ValueError, match=f'saved with stitch_lora_rank={RANK}: build with that'):
        timm.create_model('snnet_deit_tsb', pretrained=True, **SMALL,
                          pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME)))



def test_loading_a_low_rank_checkpoint_into_a_plain_model_names_the_keys_and_the_rank_option(lora_model, tmp_path):
    """The trainer's and validator's weights loader: the unexpected low-rank keys and what to build, not torch's
    bare 'Error(s) in loading state_dict for StitchedNet:'."""
    from timm_stitch.evaluation import load_weights
    path = tmp_path / 'lora.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora_model.state_dict().items()}, path)
    with pytest.raises(ValueError, match=r'\d+ unexpected \(e\.g\. stitch_layers\.0\.0\.0\.transform\.lora_A'
                                         r'.*, \.\.\.\).*--model-kwargs stitch_lora_rank='):
        load_weights(timm.create_model('snnet_deit_tsb', **SMALL), str(path))

def test_save_merged_reloads_as_plain_layers_computing_the_same(hub, lora_model, tmp_path):
    folder = save_pretrained(lora_model, tmp_path / 'merged', merge_lora=True)
    assert json.loads((folder / CONFIG_NAME).read_text())['model_args']['stitch_lora_rank'] == 0
    saved = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    assert not any('lora' in k for k in saved)
    assert any(isinstance(m, LoRALinear) for m in lora_model.modules())  # the model itself is left as it was
    assert RouteCard.load(folder / CARD_NAME).routes[3].top1 == 53.0

    push_to_hub(lora_model, 'someone/merged-snnet', merge_lora=True)
    loaded = timm.create_model('hf-hub:someone/merged-snnet', pretrained=True).eval()
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    x = tiny_images(2)
    for k in range(lora_model.num_routes):
        torch.testing.assert_close(loaded(x, stitch_id=k), lora_model(x, stitch_id=k), rtol=1e-5, atol=1e-5)
    assert [r.top1 for r in loaded.routes()] == [50.0 + i for i in range(loaded.num_routes)]  # not stale
    assert [r.macs for r in loaded.routes()] == [r.macs for r in lora_model.routes()]


# ---- training ---------------------------------------------------------------------------------------------------

def test_training_updates_the_low_rank_parts_only(tmp_path, caplog):
    data = make_image_folder(tmp_path / 'images', per_class=(8, 2))
    cfg = write_config(tmp_path / 'run.yaml', epochs=1)
    assert train_main(['-c', str(cfg), '--data-dir', str(data), '--out', str(tmp_path), '--experiment', 'run',
                       '--stitch-lora-rank', str(RANK), '--freeze-anchors', '--val-routes', 'none']) == 0
    # without LS init the frozen base weights stay random: said, since it is rarely meant
    assert 'neither --stitch-init-samples nor loaded weights set them' in caplog.text
    torch.manual_seed(42)  # the trainer's seed: the same start weights
    start = timm.create_model('snnet', anchors=ANCHORS, num_classes=4, stitch_lora_rank=RANK).state_dict()
    trained = safetensors.torch.load_file(tmp_path / 'run' / 'last.safetensors')
    assert trained.keys() == start.keys()
    changed = {k for k, v in start.items() if not torch.equal(v, trained[k])}
    stitch = [k for k in start if k.startswith('stitch_layers.')]
    assert not any(k.startswith('anchors.') or k.endswith('.transform.weight') for k in changed)
    for suffix in ('lora_A', 'lora_B', 'bias'):
        assert any(k.endswith(suffix) and k in changed for k in stitch), suffix


@pytest.mark.parametrize('argv, match', [
    (['--stitch-lora-alpha', '2'], '--stitch-lora-alpha applies with --stitch-lora-rank only'),
    (['--stitch-lora-rank', '-1'], '--stitch-lora-rank must be >= 0, got -1'),
])
def test_bad_training_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        train_main(['--model', 'snnet_deit_tsb', '--data-dir', '.', *argv])
