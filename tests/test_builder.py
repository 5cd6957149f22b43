"""The generic builder: stitch families SN-Net never did, sort anchors by size, refuse incompatible ones clearly."""
from __future__ import annotations

import random

import pytest
import timm
import torch
from tiny_models import TINY_CONVNEXTS as CONVNEXTS
from tiny_models import tiny_eva_args

import timm_stitch
from timm_stitch import StitchedNet, StitchOptions
from timm_stitch.errors import IncompatibleAnchorsError
from timm_stitch.routes import plan_staged_routes, plan_token_routes


def deit3(embed_dim: int, heads: int, **kwargs) -> dict:
    args = dict(model_name='deit3_small_patch16_224', img_size=32, patch_size=8, embed_dim=embed_dim, depth=4,
                num_heads=heads, num_classes=10)
    return {**args, **kwargs}


def _check_routes(model: StitchedNet, images: torch.Tensor) -> None:
    """Anchor routes equal the anchors; every route runs forward and backward with (N, classes) outputs."""
    model.eval()
    with torch.no_grad():
        for a, anchor in enumerate(model.anchors):
            assert torch.equal(model(images, stitch_id=a), anchor(images))
    model.train()
    for route in model.plan.routes:
        out = model(images, stitch_id=route.id)
        assert out.shape == (images.shape[0], 10)
        out.square().mean().backward()


def test_stitches_convnext_in_any_order():
    """ConvNeXt (never stitched by SN-Net): anchors sorted by size, stages 0-2 stitched, all routes run."""
    torch.manual_seed(0)
    shuffled = random.Random(0).sample(CONVNEXTS, 3)
    model = timm_stitch.stitch(shuffled, num_classes=10)
    assert model.anchor_names == ['convnext_atto', 'convnext_femto', 'convnext_pico']
    sizes = [sum(p.numel() for p in a.parameters()) for a in model.anchors]
    assert sizes == sorted(sizes)
    expected = plan_staged_routes([(2, 2, 6, 2)] * 3, stages=(0, 1, 2))
    assert model.plan == expected and model.num_routes == 3 + 2 * (1 + 1 + 5)
    assert [layer.in_dim for layer in model.stitch_layers['2'][1]] == [48] * 5
    _check_routes(model, torch.randn(2, 3, 32, 32))


def test_create_model_snnet_matches_stitch_and_takes_options():
    options = StitchOptions(stages=(1, 2), layer_mapping='official')
    built = timm_stitch.stitch(CONVNEXTS[:2], options=options, num_classes=10)
    model = timm.create_model('snnet', anchors=CONVNEXTS[1::-1], num_classes=10, stages=[1, 2],
                              layer_mapping='official')
    assert model.plan == built.plan == plan_staged_routes([(2, 2, 6, 2)] * 2, stages=(1, 2), layer_mapping='official')
    assert model.pretrained_cfg['architecture'] == 'snnet'
    assert model.anchor_names == ['convnext_atto', 'convnext_femto']
    with pytest.raises(ValueError, match='needs anchors'):
        timm.create_model('snnet')
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('snnet', pretrained=True, anchors=CONVNEXTS[:2])


def test_stitches_deit3_and_eva_token_models():
    """DeiT-3 (LayerScale) and EVA-02 (rotary embeddings) stitched block-wise like DeiT."""
    torch.manual_seed(0)
    model = timm_stitch.stitch([deit3(32, 2), deit3(16, 2)], num_classes=10, kernel_size=2)
    assert model.plan == plan_token_routes([4, 4]) and model.num_routes == 2 + 10
    _check_routes(model, torch.randn(2, 3, 32, 32))
    model = timm_stitch.stitch([tiny_eva_args(16), tiny_eva_args(32)], num_classes=10, nearest=False)
    assert model.plan == plan_token_routes([3, 3], nearest=False)
    _check_routes(model, torch.randn(2, 3, 28, 28))


def test_stitch_layer_and_ls_init_for_convnext():
    torch.manual_seed(0)
    model = timm_stitch.stitch(CONVNEXTS[:2], num_classes=10).eval()
    images = torch.randn(16, 3, 32, 32)
    before = model(images, stitch_id=5).detach()
    model.init_stitches(images, progress=False)
    assert not torch.allclose(model(images, stitch_id=5), before)


@pytest.mark.parametrize('anchors, message', [
    ([deit3(16, 2), deit3(32, 2, img_size=48)], 'different input sizes: .*32x32.*48x48'),
    # a dynamic-size ViT's patch grid changes per input: no resampling stitch, so token counts must match
    ([deit3(16, 2), deit3(32, 2, patch_size=4, dynamic_img_size=True)],
     r'in stage 0: .* gives 17 tokens, .* 65 tokens'),
    ([dict(model_name='levit_128s', img_size=64, num_classes=10),
      dict(model_name='swin_tiny_patch4_window7_224', img_size=64, window_size=2, depths=(2, 2, 2), embed_dim=192,
           num_heads=(3, 6, 12), num_classes=10)],
     r"cannot stitch levit_128s \(tokens activations in stage 0\) into swin_tiny_patch4_window7_224 \(nhwc\)"),
    ([dict(model_name='convnext_atto', num_classes=10), dict(model_name='convnext_femto', in_chans=1, num_classes=10)],
     'different input channels'),
])
def test_refuses_incompatible_anchors_naming_what_differs(anchors, message):
    with pytest.raises(IncompatibleAnchorsError, match=message):
        timm_stitch.stitch(anchors, num_classes=10)


@pytest.mark.parametrize('anchors, message', [
    ([deit3(16, 2), deit3(32, 2, img_size=48)], 'different input sizes: .*32x32.*48x48'),
    # a dynamic-size ViT's patch grid changes per input: no resampling stitch, so token counts must match
    ([deit3(16, 2), deit3(32, 2, patch_size=4, dynamic_img_size=True)],
     r'in stage 0: .* gives 17 tokens, .* 65 tokens'),
])
def test_every_build_path_checks_the_anchors(anchors, message):
    """``StitchedNet(...)`` and ``timm.create_model('snnet', ...)`` check the anchors as ``stitch()`` does."""
    with pytest.raises(ValueError, match=message):
        StitchedNet(anchors, num_classes=10)
    with pytest.raises(ValueError, match=message):
        timm.create_model('snnet', anchors=anchors, num_classes=10)


def test_options_object_and_flat_options_build_the_same_network():
    options = StitchOptions(kernel_size=3, nearest=False)
    by_object = StitchedNet(CONVNEXTS[:2], options=options, num_classes=10)
    flat = StitchedNet(CONVNEXTS[:2], kernel_size=3, nearest=False, num_classes=10)
    assert by_object.plan == flat.plan and by_object.options == flat.options
    assert flat.options.stages == (0, 1, 2)  # the stages checked and planned
    assert StitchedNet(CONVNEXTS[:2], options=options, kernel_size=2).options.kernel_size == 2  # flat wins


def test_refuses_unsupported_families_and_bad_stages():
    mvit = [dict(model_name=n, img_size=64) for n in ('mvitv2_tiny', 'mvitv2_small')]
    with pytest.raises(TypeError, match='cannot stitch a MultiScaleVit: its'):
        timm_stitch.stitch(mvit, num_classes=10)
    with pytest.raises(ValueError, match=r'stage 4 is out of range: the anchors have stages 0\.\.3'):
        timm_stitch.stitch(CONVNEXTS[:2], stages=(1, 4), num_classes=10)
    # a dilated ResNet-50 keeps 28x28 maps in stages 2-3: only stages 0-1 can be stitched by default
    r18 = dict(model_name='resnet18', channels=(8, 16, 32, 64), num_classes=10)
    r50 = dict(model_name='resnet50', channels=(8, 16, 32, 64), output_stride=8, num_classes=10)
    assert timm_stitch.stitch([r18, r50], num_classes=10).plan == plan_staged_routes([(2, 2, 2, 2), (3, 4, 6, 3)],
                                                                                      stages=(0, 1))
    with pytest.raises(ValueError, match=r'in stage 2: resnet18 gives 14x14 maps, resnet50 28x28 maps'):
        timm_stitch.stitch([r18, r50], stages=(1, 2), num_classes=10)


def test_generic_snnet_inherits_anchor_data_cfg_and_round_trips(tmp_path):
    """No ImageNet defaults forced on other anchors: input size, channels, classes and normalisation are theirs."""
    model = timm.create_model('snnet', anchors=['vit_fmnist_small', 'vit_fmnist_tiny']).eval()
    assert model.anchor_names == ['vit_fmnist_tiny', 'vit_fmnist_small'] and model.in_chans == 1
    config = timm.data.resolve_data_config(model=model)
    assert config['input_size'] == (1, 28, 28) and config['mean'] == (0.286,) and model.num_classes == 10
    assert model.pretrained_cfg['classifier'] == ('anchors.0.head', 'anchors.1.head')
    timm_stitch.save_pretrained(model, tmp_path / 'saved')
    loaded = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for stitch_id in range(model.num_routes):
            assert torch.equal(model(x, stitch_id=stitch_id), loaded(x, stitch_id=stitch_id))


@pytest.mark.parametrize('build', [timm_stitch.stitch, lambda a, **kw: timm.create_model('snnet', anchors=a, **kw)])
@pytest.mark.parametrize('anchors', ['resnet18', dict(model_name='resnet18'), torch.nn.Linear(2, 2), []])
def test_one_anchor_instead_of_a_sequence_is_refused_by_type(anchors, build):
    """``stitch('resnet18')`` iterated over the name's letters and ended in timm's 'Unknown model (r)'."""
    with pytest.raises(ValueError if anchors == [] else TypeError,
                       match='at least one anchor|needs anchors' if anchors == [] else 'a sequence of anchors'):
        build(anchors, device='meta')


def test_an_unknown_anchor_name_is_refused_with_the_closest_names():
    """timm's bare 'Unknown model (resnet5O)' said neither that it was an anchor nor what was meant."""
    with pytest.raises(timm_stitch.UnknownAnchorError, match=r"unknown anchor 'resnet5O'.*did you mean resnet50"):
        timm_stitch.stitch(['resnet18', 'resnet5O'], device='meta')
    with pytest.raises(RuntimeError, match='Unknown model|unknown anchor'):  # still what timm's callers catch
        timm_stitch.stitch([dict(model_name='not_a_model_at_all')], device='meta')
