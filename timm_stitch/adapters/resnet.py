"""Residual CNNs: timm ``ResNet`` (stages ``layer1..layer4``, NCHW maps)."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from timm.models.resnet import ResNet
from torch import nn

from .base import params_of, register_adapter
from .staged import StagedAdapter

__all__ = ['ResNetAdapter']


@register_adapter(ResNet)
class ResNetAdapter(StagedAdapter):
    """Stages ``layer1..layer4`` of residual blocks (stride in each stage's first block); the stem is the
    embedding and there is no final norm."""
    layout = 'nchw'
    model: ResNet

    def __init__(self, model: ResNet):
        super().__init__(model, [getattr(model, f'layer{i}') for i in range(1, 5)])

    def stage_dims(self) -> tuple[int, ...]:
        return tuple(info['num_chs'] for info in self.model.feature_info[1:])

    stage_info_offset = 1  # feature_info[0] is the stem

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_intermediate(x)[0]

    def embed_intermediate(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        m = self.model
        stem = m.act1(m.bn1(m.conv1(x)))
        return m.maxpool(stem), stem

    def feature_points(self) -> tuple[tuple[int, int, Optional[int]], ...]:
        return ((-1, 0, -1),) + super().feature_points()

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return x

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        m = self.model
        return params_of(m.conv1, m.bn1, m.maxpool)

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        return params_of(self.model.global_pool, self.model.fc)

    @property
    def in_chans(self) -> int:
        return self.model.in_chans
