"""EVA-style token models: timm ``Eva`` (EVA-02, ViTs with rotary position embeddings)."""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, Optional

import torch
from timm.models.eva import Eva
from torch import nn

from .base import params_of, register_adapter
from .vit import ViTAdapter

__all__ = ['EvaAdapter']


class _RopeBlock(nn.Module):
    """Runs one EVA block with the model's rotary embedding; a view for routes, never registered in a model."""

    def __init__(self, block: nn.Module, rope: Callable[[], Optional[torch.Tensor]], index: Optional[int]):
        super().__init__()
        self.block = block
        self._rope, self._index = rope, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self._rope()
        if rope is not None and self._index is not None:
            rope = rope[self._index]
        return self.block(x, rope=rope)


@register_adapter(Eva)
class EvaAdapter(ViTAdapter):
    """One stage of EVA blocks on all tokens; each block gets the model's fixed rotary embedding."""
    model: Eva

    def __init__(self, model: Eva):
        super().__init__(model)
        if model.dynamic_img_size or model.patch_drop is not None:
            raise ValueError('cannot stitch an Eva model built with dynamic_img_size or patch_drop_rate: its '
                             'rotary embedding then changes per batch')
        mixed = getattr(model, 'rope_mixed', False)
        self._units = tuple(_RopeBlock(b, self._rope, i if mixed else None) for i, b in enumerate(model.blocks))

    def _rope(self) -> Optional[torch.Tensor]:
        rope = self.model.rope
        if rope is None:
            return None
        if hasattr(rope, 'feat_shape'):
            return rope.get_embed()
        return rope.get_embed(shape=self.model.patch_embed.grid_size)

    @property
    def units(self) -> tuple[nn.Module, ...]:
        return self._units

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.model._pos_embed(self.model.patch_embed(x))
        return self.model.norm_pre(x)

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(super().embed_parameters(), params_of(self.model.rope))
