"""LeViT: timm ``Levit`` / ``LevitDistilled`` (``stem``, ``stages``, ``head`` [+ ``head_dist``])."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from timm.models.levit import Levit
from torch import nn

from .base import params_of, register_adapter
from .staged import StagedAdapter

__all__ = ['LevitAdapter']


@register_adapter(Levit)
class LevitAdapter(StagedAdapter):
    """Stages of LeViT blocks on ``(B, N, C)`` tokens (NCHW maps for the ``levit_conv_*`` variants); the
    attention-subsample at the start of stages 1-2 is a unit of its own. The head is the anchor's own
    ``forward_head``, so distilled models average ``head`` and ``head_dist`` (a tuple in distilled training)."""
    model: Levit

    def __init__(self, model: Levit):
        super().__init__(model, model.stages)
        self.layout = 'nchw' if model.use_conv else 'tokens'

    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.model.embed_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.stem(x)
        return x if self.model.use_conv else x.flatten(2).transpose(1, 2)

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        if self.model.use_conv:
            return x
        h, w = self.model.stages[info].blocks[-1].attn.resolution
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return x

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        return params_of(self.model.stem)

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        return params_of(self.model.head, getattr(self.model, 'head_dist', None))

    def input_size(self) -> Optional[tuple[int, int]]:
        # attention biases are sized for one token grid
        stride = getattr(self.model.stem, 'stride', None)
        resolution = self.model.stages[0].blocks[0].attn.resolution
        return tuple(r * stride for r in resolution) if stride else None

    @property
    def in_chans(self) -> int:
        return self.model.in_chans
