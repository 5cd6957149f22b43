"""Shared base of hierarchical adapters: stages of blocks flattened into one list of units."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .base import AnchorAdapter

__all__ = ['StagedAdapter']


class StagedAdapter(AnchorAdapter):
    """An anchor whose stages each run an optional downsample, then blocks.

    A downsample (patch merge, strided stage entry) is a unit of its own between two stages' blocks, so a route
    cut inside stage ``s`` runs every merge before it exactly once, whether the family puts merges at the start of
    a stage (current timm) or at the end of the previous one (the Microsoft Swin and Facebook LeViT code).
    """

    def __init__(self, model: nn.Module, stages: Sequence[nn.Module]):
        super().__init__(model)
        units: list[nn.Module] = []
        first: list[int] = []
        depths: list[int] = []
        for stage in stages:
            downsample = getattr(stage, 'downsample', None)
            if downsample is not None and not isinstance(downsample, nn.Identity):
                units.append(downsample)
            blocks = getattr(stage, 'blocks', stage)
            first.append(len(units))
            depths.append(len(blocks))
            units.extend(blocks)
        self._units, self._first, self._depths = tuple(units), tuple(first), tuple(depths)

    @property
    def units(self) -> tuple[nn.Module, ...]:
        return self._units

    def stage_depths(self) -> tuple[int, ...]:
        return self._depths

    def unit_index(self, stage: int, block: int) -> int:
        return self._first[stage] + block

    #: index of stage 0's output in the model's ``feature_info`` (1 when a stem feature comes first)
    stage_info_offset = 0

    def feature_points(self) -> tuple[tuple[int, int, Optional[int]], ...]:
        return tuple((self._first[s] + d, s + self.stage_info_offset, s) for s, d in enumerate(self._depths))
