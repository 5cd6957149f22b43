"""The generic adapter: any timm family split from its own structure, verified against its own forward."""
from __future__ import annotations

import pytest
import timm
import torch

import timm_stitch
from timm_stitch.adapters import GenericAdapter, adapter_for
from timm_stitch.errors import AdapterMismatchError, IncompatibleAnchorsError, UnsupportedAnchorError


def test_generic_pieces_equal_forward_features_and_stages_follow_shapes():
    model = timm.create_model('resnetv2_18', channels=(8, 16, 32, 64), num_classes=10).eval()
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.stage_depths() == (1, 2, 2, 2, 2)  # the stem (a block of feature_info) then 4 stages
    assert adapter.stage_dims() == (64, 8, 16, 32, 64)  # timm keeps a 64-wide stem
    assert adapter.stage_layouts() == ('nchw',) * 5
    x = torch.randn(2, 3, 32, 32)
    h = adapter.embed(x)
    for unit in adapter.units:
        h = unit(h)
    assert torch.equal(adapter.finish(h), model.forward_features(x))
    # the pieces are views: they hold the anchor's own parameters, nothing of their own
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for unit in adapter.units for p in unit.parameters())
    assert {id(p) for p in adapter.head_parameters()} == {id(p) for p in model.head.parameters()} | {
        id(p) for p in model.norm.parameters()}


def test_channels_last_stages_are_found():
    model = timm.create_model('swinv2_tiny_window8_256', img_size=64, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 1, 2, 2), window_size=4, num_classes=10)
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.stage_layouts() == ('nhwc',) * 4 and adapter.stage_dims() == (16, 32, 64, 128)


def test_sizes_crossing_a_cut_are_rebuilt_and_fix_the_input_size():
    """XCiT's blocks read the patch grid (Hp, Wp) from the embedding: taken at the probe's size, with the batch size
    read from the activation, so every batch size runs and the input size is fixed."""
    model = timm.create_model('xcit_nano_12_p16_224', img_size=64, depth=2).eval()
    adapter = adapter_for(model)
    assert adapter.input_size() == (64, 64) and adapter.stage_depths() == (2,)
    x = torch.randn(3, 3, 64, 64)
    h = adapter.embed(x)
    for unit in adapter.units:
        h = unit(h)
    assert torch.equal(adapter.finish(h), model.forward_features(x))


def test_a_family_whose_blocks_pass_tuples_is_refused_by_type():
    model = timm.create_model('mvitv2_tiny', img_size=64, num_classes=10)
    with pytest.raises(UnsupportedAnchorError, match='cannot stitch a MultiScaleVit: its'):
        adapter_for(model)
    assert issubclass(UnsupportedAnchorError, TypeError)


class _WrongForward(torch.nn.Module):
    """A timm model whose forward adds something its forward_features / forward_head do not."""

    def __init__(self):
        super().__init__()
        self.inner = timm.create_model('resnetv2_18', channels=(8, 16, 32, 64), num_classes=10)
        self.feature_info = [dict(d, module=f"inner.{d['module']}") for d in self.inner.feature_info]

    def forward_features(self, x):
        return self.inner.forward_features(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.inner.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x)) + 1


def test_pieces_that_do_not_reproduce_forward_refuse_the_anchor():
    with pytest.raises(AdapterMismatchError, match='_WrongForward.*forward'):
        adapter_for(_WrongForward())
    assert issubclass(AdapterMismatchError, ValueError)


def test_meta_device_gives_the_structure_without_a_forward_check():
    with torch.device('meta'):
        model = timm.create_model('efficientnet_b0')
    adapter = adapter_for(model)
    assert adapter.stage_depths() == (1, 2, 2, 3, 3, 4, 1)
    assert adapter.stage_dims() == (16, 24, 40, 80, 112, 192, 320)


@pytest.mark.parametrize('names', [('vit_tiny_r_s16_p8_224', 'vit_small_r26_s32_224'),
                                   ('vitamin_small_224', 'vitamin_base_224')])
def test_former_crashes_are_results_or_clear_refusals(names):
    """Both pairs crashed (AttributeError; a hybrid backbone's width read as the input channels)."""
    kwargs = dict(img_size=64, depth=2, num_classes=10)
    try:
        net = timm_stitch.stitch([dict(model_name=n, **kwargs) for n in names])
    except (TypeError, ValueError) as e:
        assert names[0] in str(e) or names[1] in str(e)
        return
    assert net.in_chans == 3
    net.eval()(torch.randn(1, 3, 64, 64))


def test_anchor_route_intermediates_equal_timms_own():
    """feature_points map the anchor's feature_info entries to units: the anchor routes' forward_intermediates are
    timm's, and anchors that take any input size are checked at one size (EfficientNet B0 224, B1 240)."""
    net = timm_stitch.stitch(['efficientnet_b0', 'efficientnet_b1'], num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    for route in (0, 1):
        ours = net.forward_intermediates(x, stitch_id=route, intermediates_only=True)
        theirs = net.anchors[route].forward_intermediates(x, intermediates_only=True)
        assert len(ours) == len(theirs) == 5
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_map_layouts_follow_the_dims_that_change_with_the_image_size():
    """EfficientNet-B2 at its 256 px gives a (88, 16, 16) stage: 16 is another stage's width, yet the spatial dims
    are those that change with the image size, so the stage is NCHW with 88 channels (it was read as NHWC, 16)."""
    with torch.device('meta'):
        model = timm.create_model('efficientnet_b2')
    adapter = adapter_for(model)
    assert adapter.stage_layouts() == ('nchw',) * 7
    assert adapter.stage_dims() == (16, 24, 48, 88, 120, 208, 352)


def test_generic_token_models_stitch_across_patch_grids():
    """BEiT (no adapter of its own) at patch 16 and 8: the generic adapter names its class token and patch grid,
    so a resampling stitch joins the 4x4 and 8x8 grids; the anchor routes stay timm's."""
    anchors = [dict(model_name='beit_base_patch16_224', img_size=64, depth=2, embed_dim=32, num_heads=2),
               dict(model_name='beit_base_patch16_224', img_size=64, patch_size=8, depth=2, embed_dim=64,
                    num_heads=2)]
    net = timm_stitch.stitch(anchors, num_classes=10).eval()
    assert [a.patch_grid() for a in net.adapters] == [(4, 4), (8, 8)]
    assert [a.prefix_roles() for a in net.adapters] == [('cls',), ('cls',)]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(net(x, stitch_id=1), net.anchors[1](x))
    assert all(net(x, stitch_id=r).shape == (2, 10) for r in range(2, net.num_routes))


def test_stage_outputs_are_cuts_where_block_outputs_are_not():
    """CSPNet merges each stage's cross-stage partial after its blocks: no block boundary carries the activation
    alone, the stage outputs do; its one-unit stages are stitched at their ends (front stage s, end stage s+1)."""
    net = timm_stitch.stitch(['cs3darknet_focus_s', 'cs3darknet_focus_m'], num_classes=10)
    assert [a.stage_depths() for a in net.adapters] == [(1, 1, 1, 1, 1)] * 2
    assert [(r.stage, r.cuts) for r in net.plan.routes[2:]] == [(s, ((0, 1),)) for s in range(4)]
    x = torch.randn(4, 3, 64, 64)
    net.train()
    net(x, stitch_id=[2, 3, 4, 5]).sum().backward()
    assert all(p.grad is not None for p in net.stitch_layers.parameters())
    net.eval()
    assert torch.equal(net(x, stitch_id=0), net.anchors[0](x))


@pytest.mark.slow
def test_units_never_write_their_input():
    """VGG's units start with an in-place ReLU on the previous block's output: a piece copies its input first, so a
    shared prefix (mixed-route batches) and the stitching layer's backward see the activation unchanged."""
    adapter = adapter_for(timm.create_model('vgg11', num_classes=10))
    h = adapter.embed(torch.randn(2, 3, 32, 32))
    for unit in adapter.units:
        before = h.clone()
        out = unit(h)
        assert torch.equal(h, before)
        h = out


def test_macs_count_on_a_family_passing_parameters_to_blocks():
    """CaiT's class-attention blocks take its class token: torch's module tracker (inside the MACs counter) failed
    on it ("Expected gradient function to be set") while parameters required grad; their flags come back."""
    anchors = [dict(model_name='cait_xxs24_224', img_size=32, patch_size=8, depth=2, embed_dim=d, num_heads=2)
               for d in (32, 64)]
    net = timm_stitch.stitch(anchors, num_classes=10)
    flags = [p.requires_grad for p in net.parameters()]
    macs = timm_stitch.count_route_macs(net)
    assert len(macs) == net.num_routes and macs[0] < macs[1]
    assert [p.requires_grad for p in net.parameters()] == flags


def test_generic_token_model_intermediates_are_one_per_block_like_timms():
    """BEiT's feature_info names every block: anchor routes give timm's forward_intermediates, one per block (a
    stage index on every point kept only the last)."""
    anchors = [dict(model_name='beit_base_patch16_224', img_size=32, depth=3, embed_dim=d, num_heads=2, patch_size=8)
               for d in (16, 32)]
    net = timm_stitch.stitch(anchors, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    for route in (0, 1):
        ours = net.forward_intermediates(x, stitch_id=route, intermediates_only=True)
        theirs = net.anchors[route].forward_intermediates(x, intermediates_only=True)
        assert len(ours) == len(theirs) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_stages_out_of_range_are_refused_for_single_stage_anchors_too():
    anchors = [dict(model_name=n, img_size=32, patch_size=8, depth=2) for n in ('vit_tiny_patch16_224',
                                                                            'vit_small_patch16_224')]
    for stages in ((99,), ('a',)):
        with pytest.raises(IncompatibleAnchorsError, match=r'stage .* is out of range: the anchors have stages 0\.\.0'):
            timm_stitch.stitch(anchors, stages=stages)


def test_features_only_on_the_generic_architecture():
    model = timm.create_model('snnet', anchors=[dict(model_name='resnetv2_18', channels=(8, 16, 32, 64)),
                                                dict(model_name='resnetv2_34', channels=(8, 16, 32, 64))],
                              features_only=True).eval()
    assert [f.shape[1] for f in model(torch.randn(1, 3, 32, 32))] == [64, 8, 16, 32, 64]


@pytest.mark.slow
def test_a_route_without_intermediates_says_so():
    """VGG's feature_info names the ReLUs inside its units: no intermediate is a unit output (timm's own index
    check failed with an AssertionError)."""
    net = timm_stitch.stitch([dict(model_name=n, num_classes=10) for n in ('vgg11', 'vgg13')])
    with pytest.raises(ValueError, match='route 0 has no intermediates'):
        net.forward_intermediates(torch.randn(1, 3, 32, 32), stitch_id=0)
