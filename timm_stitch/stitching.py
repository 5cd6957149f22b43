"""Stitching layers (plain or with a low-rank update) and their least-squares fit."""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IncompatibleAnchorsError
from .grids import Grid, Layout, map_to, prefix_sources, resample_map, split_grid

__all__ = ['StitchingLayer', 'LoRALinear', 'LeastSquaresFit', 'to_rows', 'merge_lora', 'merged_lora_state',
           'deployed_parameters', 'stitch_lora_args', 'Layout']


def to_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Flatten an activation to ``(rows, channels)`` with channels last (NCHW maps are permuted first)."""
    if layout == 'nchw':
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1, x.shape[-1])


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: ``y = x W^T + b + (x A^T B^T) * lora_alpha / lora_rank``.

    The base ``weight`` is frozen (``requires_grad=False``); ``lora_A`` (rank, in; Kaiming-uniform) and ``lora_B``
    (out, rank; zeros, so that the update starts at nothing) and the bias are trained, as in SN-Netv2's stitching
    layers, whose parameter names these are. The state dict always holds the unmerged ``weight``, ``lora_A`` and
    ``lora_B`` (whatever the train/eval mode); :func:`merge_lora` gives the equivalent plain ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, lora_rank: int, lora_alpha: float = 1.0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f'lora_rank must be an int >= 1, got {lora_rank!r}')
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.lora_rank, self.lora_alpha = lora_rank, float(lora_alpha)
        self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, lora_rank, device=device, dtype=dtype))
        self.reset_lora_parameters()
        self.weight.requires_grad_(False)

    @property
    def scaling(self) -> float:
        """The factor of the low-rank update: ``lora_alpha / lora_rank``."""
        return self.lora_alpha / self.lora_rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Kaiming-uniform ``lora_A`` (as ``nn.Linear`` initialises its weight) and zero ``lora_B``."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def merged_weight(self) -> torch.Tensor:
        """``W + B A * scaling``: the weight of the equivalent plain linear layer."""
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}'


@torch.no_grad()
def merge_lora(layer: LoRALinear) -> nn.Linear:
    """A plain ``nn.Linear`` computing what ``layer`` computes (weight ``W + B A * scaling``), on its device and
    dtype, with trainable parameters."""
    merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=layer.weight.dtype)
    merged.weight.copy_(layer.merged_weight())
    if layer.bias is not None:
        merged.bias.copy_(layer.bias)
    return merged


class StitchingLayer(nn.Module):
    """A learned linear map between two anchors' activations.

    Token and channels-last activations use ``nn.Linear``; NCHW feature maps use a 1x1 ``nn.Conv2d``. The inner
    module is named ``transform`` as in the official checkpoints. When the end anchor's ``out_layout`` differs
    (a CNN front feeding a channels-last or token back), the output is re-laid out as a view (``permute`` /
    ``flatten``); the end anchor's first op (a norm or linear) makes the only copy the layout change needs.

    With ``lora_rank > 0`` (token and channels-last activations only) ``transform`` is a :class:`LoRALinear`: its
    base weight is frozen and a rank-``lora_rank`` update scaled by ``lora_alpha / lora_rank`` is trained instead,
    as SN-Netv2 does (rank 64, alpha 1). :meth:`merge_lora_` turns it into the equivalent plain linear layer.

    ``in_grid`` / ``out_grid`` (:class:`~timm_stitch.grids.Grid`) are where the two anchors' activations sit. When
    they differ in positions or prefix roles (ViT-B/16 -> ViT-L/14, a CNN map into a ViT), the layer *resamples*:
    after the channel map, the patch map is resampled bilinearly to the end grid and the end's prefix tokens are
    taken by role: a role both anchors have passes through the channel map, a role only the end has is the
    parameter ``new_tokens`` (set to the end anchor's mean activation there by least-squares init), a role only
    the front has is dropped.
    """

    def __init__(self, in_dim: int, out_dim: int, layout: Layout = 'tokens', out_layout: Optional[Layout] = None,
                 lora_rank: int = 0, lora_alpha: float = 1.0, in_grid: Optional[Grid] = None,
                 out_grid: Optional[Grid] = None):
        super().__init__()
        out_layout = out_layout or layout
        if (layout, out_layout) not in _LAYOUT_CHANGES:
            valid = ', '.join(f'{a}->{b}' for a, b in _LAYOUT_CHANGES)
            raise ValueError(f'cannot stitch {layout!r} activations into {out_layout!r} ones: valid are {valid}')
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f'stitch_lora_rank must be an int >= 0 (0: a plain linear layer), got {lora_rank!r}')
        if lora_rank > min(in_dim, out_dim):
            raise ValueError(f'stitch_lora_rank {lora_rank} is above what a {in_dim} -> {out_dim} stitching layer can '
                             f'use: valid ranks are 0..{min(in_dim, out_dim)}')
        if lora_rank and layout == 'nchw':
            raise ValueError(f'low-rank stitching layers (stitch_lora_rank={lora_rank}) take token or channels-last '
                             "('tokens', 'nhwc') activations, not 'nchw' feature maps: use stitch_lora_rank=0 for "
                             'anchors with NCHW stages (ResNet, LeViT...)')
        self.in_dim, self.out_dim, self.layout, self.out_layout = in_dim, out_dim, layout, out_layout
        if layout == 'nchw':
            self.transform = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        elif lora_rank:
            self.transform = LoRALinear(in_dim, out_dim, lora_rank, lora_alpha)
        else:
            self.transform = nn.Linear(in_dim, out_dim)
        self.in_grid, self.out_grid = in_grid, out_grid
        #: whether the layer resamples the grid / carries prefix tokens by role (else it maps position by position)
        self.regrids = in_grid is not None and out_grid is not None and not in_grid.matches(out_grid)
        if self.regrids:
            if in_grid.hw is None or out_grid.hw is None:
                raise IncompatibleAnchorsError(
                    f'cannot resample {in_grid.describe()} onto {out_grid.describe()}: both patch grids must be known')
            self.sources = prefix_sources(in_grid.roles, out_grid.roles) if out_layout == 'tokens' else ()
            num_new = sum(s < 0 for s in self.sources)
            if num_new:
                self.new_tokens = nn.Parameter(torch.zeros(1, num_new, out_dim))

    @property
    def lora_rank(self) -> int:
        """Rank of the low-rank update (0: a plain linear or 1x1 conv layer)."""
        return getattr(self.transform, 'lora_rank', 0)

    @property
    def lora_alpha(self) -> float:
        """Numerator of the low-rank update's scaling (1.0 without one)."""
        return getattr(self.transform, 'lora_alpha', 1.0)

    def merge_lora_(self) -> StitchingLayer:
        """Replace a low-rank ``transform`` by the equivalent plain ``nn.Linear`` (in place); returns ``self``."""
        if isinstance(self.transform, LoRALinear):
            self.transform = merge_lora(self.transform)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if self.regrids:
            return self._regrid(x)
        if self.out_layout == self.layout:
            return x
        if self.out_layout == 'nhwc':
            return x.permute(0, 2, 3, 1)
        if self.out_layout == 'nchw':
            return x.permute(0, 3, 1, 2)
        return x.flatten(2).transpose(1, 2) if self.layout == 'nchw' else x.flatten(1, 2)

    def _regrid(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-mapped front activation ``x`` on the end grid, with the end's prefix tokens by role."""
        prefix, patches = split_grid(x, self.layout, self.in_grid)
        out = map_to(resample_map(patches, self.out_grid.hw), self.out_layout)
        if not self.sources:
            return out
        parts, new = [], 0
        for source in self.sources:
            if source >= 0:
                parts.append(prefix[:, source:source + 1])
            else:
                parts.append(self.new_tokens[:, new:new + 1].expand(x.shape[0], -1, -1))
                new += 1
        return torch.cat(parts + [out], dim=1)

    def ls_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Least-squares data from front activations ``x`` and the end activations ``y`` they should map to: rows
        of inputs (n, in_dim) on the end grid (resampled), their targets (n, out_dim), and the targets of
        ``new_tokens`` (B, num_new, out_dim; None without)."""
        if not self.regrids:
            return to_rows(x, self.layout), to_rows(y, self.out_layout), None
        x_prefix, x_map = split_grid(x, self.layout, self.in_grid)
        y_prefix, y_map = split_grid(y, self.out_layout, self.out_grid)
        xs, ys, new = [to_rows(resample_map(x_map, self.out_grid.hw), 'nchw')], [to_rows(y_map, 'nchw')], []
        for i, source in enumerate(self.sources):
            if source >= 0:
                xs.append(x_prefix[:, source])
                ys.append(y_prefix[:, i])
            else:
                new.append(y_prefix[:, i])
        return torch.cat(xs), torch.cat(ys), torch.stack(new, 1) if new else None

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor, new_tokens: Optional[torch.Tensor] = None) -> None:
        """Load ``y = x @ weight.T + bias`` (weight ``(out_dim, in_dim)``) into the layer, and ``new_tokens``
        (num_new, out_dim) when given; a low-rank update is reset to zero (``lora_B``), so that the layer computes
        exactly this map."""
        w = self.transform.weight
        self.transform.weight.copy_(weight.reshape(w.shape).to(w))
        self.transform.bias.copy_(bias.to(self.transform.bias))
        if isinstance(self.transform, LoRALinear):
            self.transform.lora_B.zero_()
        if new_tokens is not None:
            self.new_tokens.copy_(new_tokens.reshape(self.new_tokens.shape).to(self.new_tokens))

    def extra_repr(self) -> str:
        layout = self.layout if self.out_layout == self.layout else f'{self.layout}->{self.out_layout}'
        grids = f', {self.in_grid.describe()} -> {self.out_grid.describe()}' if self.regrids else ''
        return f'{self.in_dim} -> {self.out_dim}, layout={layout}{grids}'


def deployed_parameters(modules: Iterable[nn.Module]) -> Iterator[nn.Parameter]:
    """The parameters of ``modules`` as deployed: those of low-rank layers are counted as their merged plain
    linear layer's (``weight`` and ``bias``; ``lora_A`` and ``lora_B`` fold into the weight)."""
    for module in modules:
        for name, param in module.named_parameters():
            if name.rpartition('.')[2] not in ('lora_A', 'lora_B'):
                yield param


def merged_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every low-rank layer merged: ``{prefix}weight`` holds ``W + B A * scaling``
    and the ``lora_A`` / ``lora_B`` entries are gone, so that it loads into the model built without them."""
    state = model.state_dict()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                prefix = f'{name}.' if name else ''
                state[prefix + 'weight'] = module.merged_weight().detach()
                del state[prefix + 'lora_A'], state[prefix + 'lora_B']
    return state


def stitch_lora_args(model: nn.Module) -> dict[str, Any]:
    """The ``stitch_lora_rank`` and ``stitch_lora_alpha`` that ``model``'s stitching layers were built with (only
    ``stitch_lora_rank=0`` when they are plain, or there are none)."""
    layer = next((m for m in model.modules() if isinstance(m, StitchingLayer) and m.lora_rank), None)
    if layer is None:
        return {'stitch_lora_rank': 0}
    return {'stitch_lora_rank': layer.lora_rank, 'stitch_lora_alpha': layer.lora_alpha}


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
            raise IncompatibleAnchorsError(
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
