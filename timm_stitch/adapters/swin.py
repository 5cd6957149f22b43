"""Hierarchical token models: timm ``SwinTransformer`` (channels-last ``(B, H, W, C)`` maps between blocks)."""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from .base import params_of, register_adapter
from .staged import StagedAdapter

__all__ = ['SwinAdapter']


@register_adapter(SwinTransformer)
class SwinAdapter(StagedAdapter):
    """Stages of Swin blocks on NHWC maps; the patch merge at the start of stages 1-3 is a unit of its own."""
    layout = 'nhwc'
    model: SwinTransformer

    def __init__(self, model: SwinTransformer):
        super().__init__(model, model.layers)

    def stage_dims(self) -> tuple[int, ...]:
        return tuple(info['num_chs'] for info in self.model.feature_info)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(x)

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        if norm and info == len(self.model.layers) - 1:
            x = self.model.norm(x)  # sized for the last stage only, as in timm
        return x.permute(0, 3, 1, 2).contiguous()

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return self.model.norm(x) if final_norm else x

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        return params_of(self.model.patch_embed)

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        m = self.model
        return itertools.chain(params_of(m.norm) if final_norm else (), params_of(m.head))

    def input_size(self) -> Optional[tuple[int, int]]:
        pe = self.model.patch_embed
        return tuple(pe.img_size) if pe.strict_img_size else None

    @property
    def in_chans(self) -> int:
        return self.model.patch_embed.proj.in_channels
