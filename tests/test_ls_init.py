"""Least-squares initialisation of stitching layers."""
import pytest
import torch
from tiny_models import low_rank_images, tiny_images, tiny_snnet, tiny_vits

from timm_stitch import StitchedNet
from timm_stitch.errors import IncompatibleAnchorsError
from timm_stitch.stitching import LeastSquaresFit


def test_accumulated_fit_equals_pinv_on_stacked_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 5, generator=g, dtype=torch.float64) + 0.1 * torch.randn(300, 5, generator=g,
                                                                                     dtype=torch.float64)
    fit = LeastSquaresFit(8, 5)
    for xs, ys in zip(x.split(64), y.split(64)):
        fit.add(xs.float(), ys.float())
    weight, bias = fit.solve()
    x1 = torch.cat([x.float().double(), torch.ones(300, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.pinv(x1) @ y.float().double()
    torch.testing.assert_close(weight, expected[:8].T)
    torch.testing.assert_close(bias, expected[8])


def test_fit_rejects_mismatched_rows_and_empty_solve():
    fit = LeastSquaresFit(4, 4)
    with pytest.raises(IncompatibleAnchorsError, match='different row counts'):
        fit.add(torch.zeros(3, 4), torch.zeros(5, 4))
    with pytest.raises(RuntimeError, match='no data'):
        fit.solve()


def route_vs_end_error(model: StitchedNet, images: torch.Tensor) -> float:
    """Mean relative distance of every stitched route's logits from its end anchor's logits."""
    errors = []
    with torch.no_grad():
        for route in model.routes():
            if route.is_anchor:
                continue
            end = model(images, stitch_id=route.anchors[-1])
            errors.append(((model(images, stitch_id=route.id) - end).norm() / end.norm()).item())
    return sum(errors) / len(errors)


def test_ls_init_brings_routes_close_to_end_anchor():
    model = tiny_snnet(depth=4)
    images, held_out = low_rank_images(64, seed=1), low_rank_images(16, seed=2)
    random_error = route_vs_end_error(model, held_out)
    model.init_stitches(images, batch_size=16, progress=False)
    ls_error = route_vs_end_error(model, held_out)
    assert random_error > 1.0 and ls_error < 0.5 * random_error, (ls_error, random_error)


def test_ls_init_runs_in_eval_mode_and_restores_mode():
    anchors = tiny_vits()
    for a in anchors:  # stochastic depth would make the fit random if init ran in train mode
        for blk in a.blocks:
            blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = 0.5
    model = StitchedNet(anchors, num_classes=10).train()
    images = tiny_images(16)
    model.init_stitches(images, progress=False)
    first = {k: v.clone() for k, v in model.stitch_layers.state_dict().items()}
    model.init_stitches(images, progress=False)
    assert model.training
    for k, v in model.stitch_layers.state_dict().items():
        torch.testing.assert_close(v, first[k])


def test_joint_and_average_modes():
    images = tiny_images(32)
    joint, average = tiny_snnet(), tiny_snnet()
    joint.init_stitches(images, progress=False)
    average.init_stitches(images, mode='average', progress=False)
    # layer 0 is shared by 4 positions: one joint solve differs from averaging 4 solutions
    assert not torch.allclose(joint.stitch_layers['0'][0][0].transform.weight,
                              average.stitch_layers['0'][0][0].transform.weight)
    with pytest.raises(ValueError, match="'joint' or 'average'"):
        joint.init_stitches(images, mode='mean')


def test_ls_init_from_loader_with_targets_and_batch_limit():
    images = tiny_images(24)
    loader = [(images[i:i + 8], torch.zeros(8)) for i in range(0, 24, 8)]
    from_loader, from_tensor = tiny_snnet(), tiny_snnet()
    from_loader.init_stitches(iter(loader), num_batches=2, progress=False)
    from_tensor.init_stitches(images[:16], batch_size=8, progress=False)
    expected = from_tensor.stitch_layers.state_dict()
    for key, value in from_loader.stitch_layers.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_ls_init_rejects_wrong_images():
    with pytest.raises(ValueError, match='expected 3 input channels'):
        tiny_snnet().init_stitches(torch.zeros(2, 1, 32, 32), progress=False)
