"""Tiny anchors shared by the tests: DeiT-like ViTs that differ only in width, fast on CPU."""
from __future__ import annotations

import timm
import torch

from timm_stitch import StitchedNet

TINY_IMG = 32
TINY_WIDTHS = ((16, 2), (32, 2), (64, 4))  # (embed_dim, heads) like Ti/S/B


def tiny_vit_args(embed_dim: int, num_heads: int, depth: int = 4, num_classes: int = 10) -> dict:
    return dict(model_name='vit_tiny_patch16_224', img_size=TINY_IMG, patch_size=8, embed_dim=embed_dim,
                depth=depth, num_heads=num_heads, num_classes=num_classes)


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
