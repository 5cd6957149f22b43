"""Tiny anchors shared by the tests, fast on CPU, defined here only: DeiT-like ViTs that differ only in width, tiny
EVA-02 and ConvNeXt anchors, and one tiny stitched network per family (``*_family()``, with the registered
architectures' settings where there is one). ``tests/conftest.py`` maps family names to these factories."""
from __future__ import annotations

from typing import NamedTuple, Optional

import timm
import torch
from torch import nn

import timm_stitch
from timm_stitch import StitchedNet
from timm_stitch.models.snnet_levit import LEVIT_STAGES
from timm_stitch.models.snnet_resnet import RESNET_STAGES
from timm_stitch.models.snnet_swin import SWIN_STAGES

TINY_IMG = 32
TINY_WIDTHS = ((16, 2), (32, 2), (64, 4))  # (embed_dim, heads) like Ti/S/B

#: per registered architecture: kwargs giving it small anchors with the same routes, and the input size they take
SMALL_ARCHS = {
    'snnet_deit_tsb': (dict(embed_dim=16, num_heads=2, img_size=32, num_classes=10), 32),
    'snnet_swin_tsb': (dict(embed_dim=32, num_heads=(1, 2, 4, 8), img_size=64, num_classes=10), 64),
    'snnet_resnet_18_50': (dict(channels=(8, 16, 32, 64), num_classes=10), 64),
    'snnet_resnet18_swin_ti': (dict(img_size=64, num_classes=10), 64),
    'snnet_levit_192_256': (dict(num_classes=10, img_size=64), 64),
}
#: snnet_levit_192_256 with tiny LeViT anchors (both the same width, depth 2 per stage): 4 routes, 2 and 3 stitched
TINY_LEVIT_ARCH = dict(img_size=64, embed_dim=(16, 24, 32), key_dim=8, num_heads=(2, 3, 4), depth=(2, 2, 2),
                       num_classes=10)


def tiny_vit_args(embed_dim: int, num_heads: int, depth: int = 4, num_classes: Optional[int] = 10) -> dict:
    """``timm.create_model`` kwargs of a tiny DeiT-like ViT (``num_classes=None``: left to the stitched network)."""
    args = dict(model_name='vit_tiny_patch16_224', img_size=TINY_IMG, patch_size=8, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads)
    return args if num_classes is None else {**args, 'num_classes': num_classes}


def tiny_vits(depth: int = 4, num_classes: int = 10, seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [timm.create_model(**tiny_vit_args(d, h, depth, num_classes)) for d, h in TINY_WIDTHS]


def tiny_snnet(depth: int = 4, seed: int = 0, **kwargs) -> StitchedNet:
    return StitchedNet(tiny_vits(depth, seed=seed), num_classes=10, **kwargs).eval()


def tiny_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(seed))


def low_rank_images(n: int, seed: int = 0, rank: int = 6, patch: int = 8) -> torch.Tensor:
    """Images whose patches span a few fixed patterns, like natural images' low-dimensional patch statistics.

    Untrained anchors embed white noise into unrelated random subspaces, so no linear map can relate two of
    them; on low-rank patches every anchor's embedding keeps the same information and stitching is learnable.
    """
    basis = torch.randn(rank, 3 * patch * patch, generator=torch.Generator().manual_seed(1234))
    grid = TINY_IMG // patch
    coef = torch.randn(n, grid * grid, rank, generator=torch.Generator().manual_seed(seed))
    patches = (coef @ basis).reshape(n, grid, grid, 3, patch, patch)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, TINY_IMG, TINY_IMG)


def tiny_swin(embed_dim: int, depths: tuple, img_size: int = 32, patch_size: int = 2) -> nn.Module:
    heads = tuple(max(1, embed_dim * 2 ** i // 16) for i in range(len(depths)))
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=img_size, patch_size=patch_size, window_size=2,
                             embed_dim=embed_dim, depths=depths, num_heads=heads, num_classes=10)


def tiny_resnet(name: str, width: int = 8) -> nn.Module:
    return timm.create_model(name, channels=tuple(width * 2 ** i for i in range(4)), num_classes=10)


def tiny_levit(dims: tuple) -> nn.Module:
    return timm.create_model('levit_192', img_size=64, embed_dim=dims, key_dim=8, num_heads=(2, 3, 4),
                             depth=(4, 4, 4), num_classes=10)


def tiny_eva_args(embed_dim: int, depth: int = 3) -> dict:
    return dict(model_name='eva02_tiny_patch14_224', img_size=28, patch_size=7, embed_dim=embed_dim, depth=depth,
                num_heads=2, num_classes=10)


def tiny_convnext_args(name: str, width: int) -> dict:
    return dict(model_name=name, dims=tuple(width * 2 ** i for i in range(4)), num_classes=10)


TINY_CONVNEXTS = [tiny_convnext_args('convnext_atto', 8), tiny_convnext_args('convnext_femto', 12),
                  tiny_convnext_args('convnext_pico', 16)]


class TinyFamily(NamedTuple):
    """A tiny stitched network, an input batch for it and its number of routes."""
    model: StitchedNet
    images: torch.Tensor
    num_routes: int


def deit_family() -> TinyFamily:
    return TinyFamily(tiny_snnet(), tiny_images(2), 23)


def eva_family() -> TinyFamily:
    torch.manual_seed(0)
    return TinyFamily(timm_stitch.stitch([tiny_eva_args(16), tiny_eva_args(32)], num_classes=10),
                      torch.randn(2, 3, 28, 28), 9)


def swin_family() -> TinyFamily:
    torch.manual_seed(0)
    anchors = [tiny_swin(16, (2, 2, 6, 2)), tiny_swin(16, (2, 2, 18, 2)), tiny_swin(32, (2, 2, 18, 2))]
    return TinyFamily(StitchedNet(anchors, num_classes=10, stages=SWIN_STAGES), torch.randn(2, 3, 32, 32), 41)


def resnet_family() -> TinyFamily:
    torch.manual_seed(0)
    anchors = [tiny_resnet('resnet18'), tiny_resnet('resnet50')]
    return TinyFamily(StitchedNet(anchors, num_classes=10, stages=RESNET_STAGES), torch.randn(2, 3, 32, 32), 10)


def resnet_swin_family() -> TinyFamily:
    torch.manual_seed(0)
    anchors = [tiny_resnet('resnet18'), tiny_swin(16, (2, 2, 6, 2), img_size=64, patch_size=4)]
    return TinyFamily(StitchedNet(anchors, num_classes=10, stages=RESNET_STAGES), torch.randn(2, 3, 64, 64), 8)


def convnext_family() -> TinyFamily:
    torch.manual_seed(0)
    return TinyFamily(timm_stitch.stitch(TINY_CONVNEXTS[:2], num_classes=10), torch.randn(2, 3, 32, 32), 9)


def levit_family() -> TinyFamily:
    torch.manual_seed(0)
    anchors = [tiny_levit((16, 24, 32)), tiny_levit((32, 48, 64))]
    return TinyFamily(StitchedNet(anchors, num_classes=10, stages=LEVIT_STAGES), torch.randn(2, 3, 64, 64), 8)


def tiny_resnetv2(name: str) -> nn.Module:
    return timm.create_model(name, channels=(8, 16, 32, 64), num_classes=10)


def resnetv2_family() -> TinyFamily:
    """A family with no hand-written adapter: driven by the generic adapter (stem unit + 4 stages)."""
    torch.manual_seed(0)
    anchors = [tiny_resnetv2('resnetv2_18'), tiny_resnetv2('resnetv2_34')]
    return TinyFamily(StitchedNet(anchors, num_classes=10), torch.randn(2, 3, 32, 32), 12)


def tiny_grid_vits() -> list[dict]:
    """Two tiny ViTs whose patch grids differ (patch 8: 4x4, patch 4: 8x8 on 32x32): a resampling stitch joins them."""
    return [tiny_vit_args(16, 2), {**tiny_vit_args(32, 2), 'patch_size': 4}]


def tiny_resnet_vit() -> list[dict]:
    """A tiny ResNet-18 (4 stages of NCHW maps) and a larger tiny ViT (one stage of tokens, 4x4 grid + class token):
    ResNet stage 1 (4x4 maps at 32x32) feeds the ViT."""
    return [dict(model_name='resnet18', channels=(4, 8, 16, 32), num_classes=10), tiny_vit_args(64, 2)]


def vit_grids_family() -> TinyFamily:
    torch.manual_seed(0)
    return TinyFamily(timm_stitch.stitch(tiny_grid_vits(), num_classes=10), tiny_images(2), 12)


def resnet_vit_family() -> TinyFamily:
    torch.manual_seed(0)
    return TinyFamily(timm_stitch.stitch(tiny_resnet_vit(), num_classes=10), tiny_images(2), 5)
