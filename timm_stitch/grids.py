"""Where activations sit: the prefix tokens (class, register, distillation) and patch grid of a stage, and the
resampling that carries one anchor's patch grid onto another's.

A stitch between anchors whose grids differ (ViT-B/16 -> ViT-L/14: 14x14 -> 16x16 patches; ResNet stage 2 -> a
ViT) splits the front activation into prefix tokens and a patch map, resamples the map bilinearly to the end
anchor's grid (as timm resamples position embeddings, but on a batch, and without antialiasing, so that the
resampling commutes exactly with the stitch's linear map), and carries prefix tokens by role. timm's own
``resample_abs_pos_embed`` takes a single embedding (batch 1), so it is not called here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

__all__ = ['Grid', 'Layout', 'role_keys', 'prefix_sources', 'split_grid', 'resample_map', 'map_to', 'RESAMPLE_MODE']

Layout = Literal['tokens', 'nchw', 'nhwc']

#: the interpolation a resampling stitch uses (``F.interpolate`` mode, ``align_corners=False``, no antialias)
RESAMPLE_MODE = 'bilinear'


@dataclass(frozen=True)
class Grid:
    """The positions of one stage's activations: ``positions`` rows per image, of which ``roles`` are prefix tokens
    (``'cls'``, ``'dist'``, ``'reg'``, in order) and the rest a patch grid of ``hw`` (None when unknown: such a
    stage stitches only into one of the same ``positions`` and ``roles``)."""
    positions: int
    hw: Optional[tuple[int, int]] = None
    roles: tuple[str, ...] = ()

    def matches(self, other: Grid) -> bool:
        """Whether a plain (position-wise) stitch joins the two: same positions and prefix roles, and the same patch
        grid where both are known."""
        return (self.positions == other.positions and self.roles == other.roles
                and (self.hw is None or other.hw is None or self.hw == other.hw))

    def describe(self) -> str:
        if self.hw is None:
            return f'{self.positions} positions'
        prefix = f' + {len(self.roles)} prefix ({",".join(self.roles)})' if self.roles else ''
        return f'{self.hw[0]}x{self.hw[1]} grid{prefix}'


def role_keys(roles: tuple[str, ...]) -> list[tuple[str, int]]:
    """Each prefix token as ``(role, occurrence)``: the second register token is ``('reg', 1)``."""
    seen: dict[str, int] = {}
    keys = []
    for role in roles:
        keys.append((role, seen.get(role, 0)))
        seen[role] = seen.get(role, 0) + 1
    return keys


def prefix_sources(front: tuple[str, ...], end: tuple[str, ...]) -> tuple[int, ...]:
    """For each end prefix token, the index of the front token of the same role (-1: the front has none, the stitch
    makes it). Front tokens no end token takes are dropped."""
    index = {key: i for i, key in enumerate(role_keys(front))}
    return tuple(index.get(key, -1) for key in role_keys(end))


def split_grid(x: torch.Tensor, layout: Layout, grid: Grid) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(prefix tokens (B, P, C) or None, patch map (B, C, H, W))`` of an activation in ``layout``."""
    if layout == 'nchw':
        return None, x
    if layout == 'nhwc':
        return None, x.permute(0, 3, 1, 2)
    num = len(grid.roles)
    h, w = grid.hw
    patches = x[:, num:].reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
    return (x[:, :num] if num else None), patches


def resample_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A (B, C, H, W) map resampled to ``hw`` (unchanged when it has that size)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode=RESAMPLE_MODE, align_corners=False)


def map_to(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A (B, C, H, W) map in ``layout`` (``'tokens'``: its patch tokens, row by row)."""
    if layout == 'nchw':
        return x
    if layout == 'nhwc':
        return x.permute(0, 2, 3, 1)
    return x.flatten(2).transpose(1, 2)
