"""Plain token models: timm ``VisionTransformer`` (ViT, DeiT, DeiT-3); the base of the EVA adapter."""
from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .base import AnchorAdapter, first_conv_channels, params_of, register_adapter

__all__ = ['ViTAdapter']


@register_adapter(VisionTransformer)
class ViTAdapter(AnchorAdapter):
    """One stage of ``depth`` blocks; stitch points carry all tokens (class token included)."""
    layout = 'tokens'
    intermediate_formats = ('NCHW', 'NLC')
    model: VisionTransformer

    @property
    def units(self) -> tuple[nn.Module, ...]:
        return tuple(self.model.blocks)

    def stage_depths(self) -> tuple[int, ...]:
        return (len(self.model.blocks),)

    def stage_dims(self) -> tuple[int, ...]:
        return (self.model.embed_dim,)

    def unit_index(self, stage: int, block: int) -> int:
        return block

    def prefix_roles(self) -> tuple[str, ...]:
        m = self.model
        roles = ('cls',) if m.cls_token is not None else ()
        roles += ('dist',) if getattr(m, 'dist_token', None) is not None else ()
        return roles + ('reg',) * (m.num_prefix_tokens - len(roles))

    def patch_grid(self) -> Optional[tuple[int, int]]:
        return None if self.model.dynamic_img_size else tuple(self.model.patch_embed.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def feature_points(self) -> tuple[tuple[int, int, Optional[int]], ...]:
        return tuple((i + 1, i, None) for i in range(len(self.model.blocks)))

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        m = self.model
        x = m.norm(x) if norm else x
        x = x[:, m.num_prefix_tokens:]
        if output_fmt == 'NLC':
            return x
        h, w = m.patch_embed.dynamic_feat_size(img_size)
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return self.model.norm(x) if final_norm else x

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        m = self.model
        return params_of(m.patch_embed, m.cls_token, m.reg_token, m.pos_embed, m.norm_pre)

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        m = self.model
        return itertools.chain(params_of(m.norm) if final_norm else (),
                               params_of(getattr(m, 'attn_pool', None), m.fc_norm, m.head))

    def input_size(self) -> Optional[tuple[int, int]]:
        pe = self.model.patch_embed
        return tuple(pe.img_size) if pe.strict_img_size and not pe.dynamic_img_pad else None

    @property
    def in_chans(self) -> int:
        return first_conv_channels(self.model)
