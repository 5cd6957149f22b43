"""Models handed over inside a wrapper (torch.compile, DDP, DataParallel, timm_stitch.compile) are saved, profiled,
exported, counted and carded as the stitched network inside; anything else is refused naming what it got."""
import pytest
import safetensors.torch
import timm
import torch
import torch.distributed as dist
from torch import nn

import timm_stitch
from timm_stitch.cards import RouteCard
from timm_stitch.hub import CARD_NAME, WEIGHTS_NAME, save_pretrained

ARCH = 'snnet_vit_fmnist_tsb'  # untrained here: small anchors at 28x28, 35 routes

WRAPPERS = {
    'torch.compile': torch.compile,  # never called here, so nothing is compiled
    'DataParallel': nn.DataParallel,  # without CUDA it only holds the module
    'timm_stitch.compile': timm_stitch.compile,
}


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model(ARCH).eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('wrapper', WRAPPERS)
def test_save_pretrained(model, wrapper, tmp_path):
    folder = save_pretrained(WRAPPERS[wrapper](model), tmp_path / 'out')
    saved = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    assert saved.keys() == model.state_dict().keys()  # no '_orig_mod.' or 'module.' prefixes
    assert RouteCard.load(folder / CARD_NAME).model == ARCH


def test_save_pretrained_ddp(model, tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        folder = save_pretrained(nn.parallel.DistributedDataParallel(model), tmp_path / 'out')
    finally:
        dist.destroy_process_group()
    assert safetensors.torch.load_file(folder / WEIGHTS_NAME).keys() == model.state_dict().keys()


def test_profile(model):
    card = timm_stitch.profile(nn.DataParallel(model), routes=[0, 3], warmup=0, repeats=1, progress=False)
    assert [r.id for r in card.routes if r.latency] == [0, 3]
    assert model.card is card  # loaded onto the model itself
    with pytest.warns(UserWarning, match='eager model inside torch.compile'):
        timm_stitch.profile(torch.compile(model), routes=[1], warmup=0, repeats=1, progress=False)


@pytest.mark.parametrize('wrapper', ['torch.compile', 'DataParallel'])
def test_export_card_macs_and_ls_init(model, wrapper):
    wrapped = WRAPPERS[wrapper](model)
    images = _images()
    route = timm_stitch.export_stitch(wrapped, 3)
    with torch.no_grad():
        torch.testing.assert_close(route(images), model(images, stitch_id=3))
    card = RouteCard.from_model(wrapped)
    assert card.model == ARCH and [r.macs for r in card.routes] == timm_stitch.count_route_macs(wrapped)
    card.check_model(wrapped)
    timm_stitch.init_stitches(wrapped, _images(8), progress=False)


def test_other_modules_are_refused_naming_them():
    for call in (lambda m: timm_stitch.profile(m), lambda m: timm_stitch.export_stitch(m, 0), RouteCard.from_model):
        with pytest.raises(TypeError, match='takes a stitched network .* got a DataParallel wrapping a Linear'):
            call(nn.DataParallel(nn.Linear(2, 2)))
