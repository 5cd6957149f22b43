"""Stitching layers and their least-squares fit."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

__all__ = ['StitchingLayer', 'LeastSquaresFit', 'to_rows']

Layout = Literal['tokens', 'nchw', 'nhwc']


def to_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Flatten an activation to ``(rows, channels)`` with channels last (NCHW maps are permuted first)."""
    if layout == 'nchw':
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1])


class StitchingLayer(nn.Module):
    """A learned linear map between two anchors' activations.

    Token and channels-last activations use ``nn.Linear``; NCHW feature maps use a 1x1 ``nn.Conv2d``. The inner
    module is named ``transform`` as in the official checkpoints. When the end anchor's ``out_layout`` differs
    (a CNN front feeding a channels-last or token back), the output is re-laid out as a view (``permute`` /
    ``flatten``); the end anchor's first op (a norm or linear) makes the only copy the layout change needs.
    """

    def __init__(self, in_dim: int, out_dim: int, layout: Layout = 'tokens', out_layout: Optional[Layout] = None):
        super().__init__()
        out_layout = out_layout or layout
        if (layout, out_layout) not in _LAYOUT_CHANGES:
            valid = ', '.join(f'{a}->{b}' for a, b in _LAYOUT_CHANGES)
            raise ValueError(f'cannot stitch {layout!r} activations into {out_layout!r} ones: valid are {valid}')
        self.in_dim, self.out_dim, self.layout, self.out_layout = in_dim, out_dim, layout, out_layout
        if layout == 'nchw':
            self.transform = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        else:
            self.transform = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if self.out_layout == self.layout:
            return x
        if self.out_layout == 'nhwc':
            return x.permute(0, 2, 3, 1)
        if self.out_layout == 'nchw':
            return x.permute(0, 3, 1, 2)
        return x.flatten(2).transpose(1, 2) if self.layout == 'nchw' else x.flatten(1, 2)

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load ``y = x @ weight.T + bias`` (weight ``(out_dim, in_dim)``) into the layer."""
        w = self.transform.weight
        self.transform.weight.copy_(weight.reshape(w.shape).to(w))
        self.transform.bias.copy_(bias.to(self.transform.bias))

    def extra_repr(self) -> str:
        layout = self.layout if self.out_layout == self.layout else f'{self.layout}->{self.out_layout}'
        return f'{self.in_dim} -> {self.out_dim}, layout={layout}'


#: (front layout, end layout) pairs a stitching layer can join; changes are views (no copies)
_LAYOUT_CHANGES = (
    ('tokens', 'tokens'), ('nhwc', 'nhwc'), ('nchw', 'nchw'),
    ('nchw', 'nhwc'), ('nhwc', 'nchw'), ('nchw', 'tokens'), ('nhwc', 'tokens'),
)


class LeastSquaresFit:
    """Accumulates the normal equations of ``[X | 1] A = Y`` over batches in float64 and solves them once.

    Solving the accumulated system is the joint least-squares fit over every batch and every position that
    adds to it, equal to ``pinv([X | 1]) @ Y`` on the stacked data, without holding the data in memory.
    """

    def __init__(self, in_dim: int, out_dim: int):
        self.in_dim, self.out_dim = in_dim, out_dim
        self.gram = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
        self.cross = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` (n, in_dim) mapping to ``y`` (n, out_dim)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f'front and end activations have different row counts ({x.shape[0]} vs {y.shape[0]}): '
                'the stitched anchors must have matching token counts / spatial sizes at this position')
        x = x.to(self.gram.device, torch.float64)
        y = y.to(self.gram.device, torch.float64)
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += x1.T @ x1
        self.cross += x1.T @ y
        self.rows += x.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The minimum-norm least-squares ``(weight (out, in), bias (out,))``."""
        if self.rows == 0:
            raise RuntimeError('no data was added to this least-squares fit')
        a = torch.linalg.pinv(self.gram, hermitian=True) @ self.cross
        return a[:self.in_dim].T.contiguous(), a[self.in_dim].contiguous()
