"""Modern CNNs: timm ``ConvNeXt`` (``stem``, ``stages``, ``norm_pre``, ``head``; NCHW maps)."""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from timm.models.convnext import ConvNeXt
from torch import nn

from .base import params_of, register_adapter
from .staged import StagedAdapter

__all__ = ['ConvNeXtAdapter']


@register_adapter(ConvNeXt)
class ConvNeXtAdapter(StagedAdapter):
    """Stages of ConvNeXt blocks; each stage's strided downsample is a unit between stages."""
    layout = 'nchw'
    model: ConvNeXt

    def __init__(self, model: ConvNeXt):
        super().__init__(model, model.stages)

    def stage_dims(self) -> tuple[int, ...]:
        return tuple(info['num_chs'] for info in self.model.feature_info)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.stem(x)

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        return self.model.norm_pre(x) if norm and info == len(self.model.stages) - 1 else x

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return self.model.norm_pre(x) if final_norm else x

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        return params_of(self.model.stem)

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        m = self.model
        return itertools.chain(params_of(m.norm_pre) if final_norm else (), params_of(m.head))

    @property
    def in_chans(self) -> int:
        return self.model.in_chans
