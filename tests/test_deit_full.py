"""Full-size snnet_deit_tsb (untrained weights): routes, parameter counts and anchor parity with timm."""

import pytest
import timm
import torch
from reported_tables import read_rows

import timm_stitch  # noqa: F401  (registers snnet_*)

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def model():
    return timm.create_model('snnet_deit_tsb').eval()


def test_routes_and_stitch_layers(model):
    assert model.num_routes == 71
    assert [tuple(m.transform.weight.shape) for m in model.stitch_layers['0'][0]] == [(384, 192)] * 11
    assert [tuple(m.transform.weight.shape) for m in model.stitch_layers['0'][1]] == [(768, 384)] * 11


@pytest.mark.parametrize('final_norm', [True, False])
def test_params_correct_the_official_undercount(final_norm):
    """Official params (SPEC §6) omit the front anchor's cls/pos tokens and count the unused end norm."""
    model = timm.create_model('snnet_deit_tsb', final_norm_on_stitched_routes=final_norm)
    for route, row in zip(model.routes(), read_rows()):
        if route.is_anchor:
            assert route.params == row['params']
            continue
        front, end = model.anchors[route.anchors[0]], model.anchors[route.anchors[-1]]
        missing = front.cls_token.numel() + front.pos_embed.numel()
        unused_norm = 0 if final_norm else sum(p.numel() for p in end.norm.parameters())
        assert route.params == row['params'] + missing - unused_norm, route.id


def test_anchor_routes_equal_timm_deit(model):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for i, name in enumerate(['deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224']):
            reference = timm.create_model(name).eval()
            reference.load_state_dict(model.anchors[i].state_dict())
            assert (model(x, stitch_id=i) - reference(x)).abs().max().item() == 0
        assert model(x, stitch_id=56).shape == (1, 1000)


def test_ls_init_full_size(model):
    before = model.stitch_layers['0'][1][6].transform.weight.clone()
    model.init_stitches(torch.randn(4, 3, 224, 224), progress=False)
    assert not torch.equal(before, model.stitch_layers['0'][1][6].transform.weight)
    assert torch.isfinite(model.stitch_layers['0'][1][6].transform.weight).all()
