"""Any timm family: an adapter derived from the model's own structure, verified when it is built.

The blocks come from the model's ``feature_info``; the embedding, the units between cuts and the finish from its
traced ``forward_features`` (:mod:`timm_stitch.adapters.graph`). Stages are runs of units whose outputs have one
shape (one probe forward); each stage states its layout (``tokens`` for ``(B, N, C)``, ``nchw`` / ``nhwc`` maps).
When it is built, the adapter runs a probe image through its pieces and through the model's own
``forward_features`` and ``forward``: any difference (bit for bit, eval mode) refuses the anchor.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional

import torch
from torch import nn

from .._modes import eval_mode
from ..errors import UnsupportedAnchorError
from ..stitching import Layout
from .base import AnchorAdapter, first_conv_channels, register_adapter
from .graph import block_modules, split_forward_features

__all__ = ['GenericAdapter']


def _probe_size(model: nn.Module) -> tuple[int, int]:
    patch_embed = getattr(model, 'patch_embed', None)
    size = getattr(patch_embed, 'img_size', None) or getattr(model, 'img_size', None)
    if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('input_size', (3, 224, 224))[-2:])


def _layout(shape: torch.Size, other: Optional[torch.Size], channels: set[int], output_fmt: Optional[str]) -> Layout:
    """``tokens`` for (B, N, C). For maps: the dims that change with the image size (``other``: the shape at another
    size, when the model takes one) are the spatial ones; else the model's ``output_fmt`` (timm's Swin family:
    NHWC); else the dim holding one of the model's ``feature_info`` widths."""
    if len(shape) == 3:
        return 'tokens'
    if len(shape) != 4:
        raise UnsupportedAnchorError(f'a block gives {len(shape)}-d activations {tuple(shape)}: only tokens (B, N, C) '
                                     'and feature maps (B, C, H, W or B, H, W, C) can be stitched')
    if other is not None and len(other) == 4:
        changed = tuple(i for i in (1, 2, 3) if shape[i] != other[i])
        if changed in ((2, 3), (1, 2)):
            return 'nchw' if changed == (2, 3) else 'nhwc'
    if output_fmt in ('NHWC', 'NCHW'):
        return output_fmt.lower()
    _, a, h, c = shape
    if (a in channels) != (c in channels):
        return 'nchw' if a in channels else 'nhwc'
    return 'nhwc' if a == h != c else 'nchw'


@register_adapter(nn.Module)  # the fallback: adapter_for prefers an adapter registered for a subclass
class GenericAdapter(AnchorAdapter):
    """Drives any timm model whose ``forward_features`` can be cut into embedding, blocks and finish.

    Raises ``TypeError`` (the family cannot be split: no blocks in ``feature_info``, untraceable code, values
    other than the activation crossing every cut) or ``ValueError`` (the pieces do not reproduce the model's own
    output on the probe image).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        family = type(model).__name__
        for method in ('forward_features', 'forward_head'):
            if not callable(getattr(model, method, None)):
                raise UnsupportedAnchorError(f'cannot stitch a {family}: it has no {method}()')
        in_chans = first_conv_channels(model)
        if in_chans is None:
            raise UnsupportedAnchorError(f'cannot stitch a {family}: its input channels are not found (no first conv)')
        self._in_chans = in_chans
        param = next(model.parameters())
        size = _probe_size(model)

        def probe(n: int) -> torch.Tensor:
            return torch.zeros(n, in_chans, *size, device=param.device, dtype=param.dtype)

        try:
            self._split = split_forward_features(model, block_modules(model), probe)
        except TypeError as e:
            raise UnsupportedAnchorError(f'cannot stitch a {family}: {e}') from None
        except (RuntimeError, AttributeError, AssertionError, IndexError, KeyError, NotImplementedError) as e:
            raise UnsupportedAnchorError(f'cannot stitch a {family}: its pieces fail on a probe image '
                                         f'({type(e).__name__}: {str(e)[:200]})') from e
        self._group_stages(self._split.unit_shapes)
        # read on every forward_intermediates call: found once; _finish_info: entries taken at the finish's output
        self._info_unit, self._finish_info = self._info_units()

    @torch.no_grad()
    def _shapes_at_another_size(self, shapes: tuple[torch.Size, ...]) -> Optional[list[torch.Size]]:
        """The units' output shapes on a larger probe image, or None when the model takes only its own size."""
        if self._split.fixed_size or not any(len(s) == 3 for s in shapes) or self.input_size() is not None:
            return None
        param = next(self.model.parameters())
        h, w = _probe_size(self.model)
        x = torch.zeros(1, self._in_chans, h + 32, w + 32, device=param.device, dtype=param.dtype)
        found = []
        try:
            with eval_mode(self.model):
                x = self._split.embed(x)
                for unit in self._split.units:
                    x = unit(x)
                    found.append(x.shape[1:])
        except Exception:  # noqa: BLE001 - any failure: the model takes only its own size
            return None
        return found

    def _group_stages(self, shapes: tuple[torch.Size, ...]) -> None:
        """Stages: runs of units whose outputs have one shape on the probe image."""
        model = self.model
        channels = {i['num_chs'] for i in getattr(model, 'feature_info', [])}
        others = self._shapes_at_another_size(shapes) or [None] * len(shapes)
        firsts, depths, layouts, dims = [], [], [], []
        for u, shape in enumerate(shapes):
            if u == 0 or shape != shapes[u - 1]:
                firsts.append(u)
                depths.append(0)
                other = others[u] and torch.Size((1, *others[u]))
                layout = _layout(torch.Size((1, *shape)), other, channels, getattr(model, 'output_fmt', None))
                layouts.append(layout)
                dims.append(shape[0] if layout == 'nchw' else shape[-1])
            depths[-1] += 1
        self._first, self._depths = tuple(firsts), tuple(depths)
        self._layouts, self._dims = tuple(layouts), tuple(dims)
        self._tokens = shapes[0][0] if len(shapes[0]) == 2 else None

    @property
    def units(self) -> tuple[nn.Module, ...]:
        return self._split.units

    def stage_depths(self) -> tuple[int, ...]:
        return self._depths

    def stage_dims(self) -> tuple[int, ...]:
        return self._dims

    def stage_layouts(self) -> tuple[Layout, ...]:
        return self._layouts

    @property
    def layout(self) -> Layout:  # the first stage's: per-stage layouts are in stage_layouts()
        return self._layouts[0]

    def prefix_roles(self) -> tuple[str, ...]:
        """Single-stage token models: the class token (timm's ``cls_token``), then register tokens."""
        found = self._grid_and_prefix()
        if found is None:
            return ()
        prefix = found[1]
        roles = ('cls',) if getattr(self.model, 'cls_token', None) is not None and prefix else ()
        return roles + ('reg',) * (prefix - len(roles))

    def patch_grid(self) -> Optional[tuple[int, int]]:
        """The patch grid of a single-stage token model whose tokens are its prefix plus ``patch_embed``'s grid
        (BEiT), or a square grid (XCiT states none, and adds its class token only in the finish), so that a stitch
        can resample it."""
        found = self._grid_and_prefix()
        return None if found is None else found[0]

    def _grid_and_prefix(self) -> Optional[tuple[tuple[int, int], int]]:
        return self._grid_of(self._tokens) if self._layouts == ('tokens',) else None

    def _grid_of(self, tokens: int) -> Optional[tuple[tuple[int, int], int]]:
        """The patch grid and prefix length of ``tokens`` tokens: the prefix plus ``patch_embed``'s grid, or a square
        grid; per activation, since a model may add its class token between blocks (ConViT)."""
        grid = getattr(getattr(self.model, 'patch_embed', None), 'grid_size', None)
        h, w = _probe_size(self.model)
        for prefix in dict.fromkeys((getattr(self.model, 'num_prefix_tokens', 0), 0)):
            patches = tokens - prefix
            if grid is not None and len(grid) == 2 and patches == grid[0] * grid[1]:
                return tuple(grid), prefix
            side = math.isqrt(max(patches, 0))
            if grid is None and h == w and side * side == patches:
                return (side, side), prefix
        return None

    def unit_index(self, stage: int, block: int) -> int:
        return self._first[stage] + block

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._split.embed(x)

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return self._split.finish(x) if final_norm else self._split.finish_no_norm(x)

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        return self._split.embed.parameters()

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        inner = {id(p) for p in itertools.chain(self._split.embed.parameters(),
                                                *(u.parameters() for u in self._split.units))}
        if not final_norm:
            finish = {id(p) for p in self._split.finish.parameters()}
            inner |= finish - {id(p) for p in self._split.finish_no_norm.parameters()}
        return (p for p in self.model.parameters() if id(p) not in inner)

    @property
    def intermediate_formats(self) -> tuple[str, ...]:
        return ('NCHW', 'NLC') if 'tokens' in self._layouts else ('NCHW',)

    def feature_points(self) -> tuple[tuple[int, int, Optional[int]], ...]:
        """The ``feature_info`` entries a unit ends: after the last unit running a block of the entry's module
        (entries inside the embedding, such as a stem norm, are left out)."""
        ends = {first + depth - 1 for first, depth in zip(self._first, self._depths)}
        # a point that ends a stage names it (a stitched route keeps the one it goes on with); block outputs inside
        # a stage (a plain token model's per-block entries) are each one
        return tuple((u + 1, i, self._stage_of(u) if u in ends and i not in self._finish_info else None)
                     for i, u in self._info_unit.items())

    def _info_units(self) -> tuple[dict[int, int], set[int]]:
        """``feature_info`` index -> the unit whose output it is, and the indices taken at the finish's output."""
        info = getattr(self.model, 'feature_info', None) or []
        entries = info.get_dicts() if hasattr(info, 'get_dicts') else info
        found, finish = {}, set()
        for i, entry in enumerate(entries):
            name = entry.get('module', '')
            units = [u for u, blocks in enumerate(self._split.unit_blocks)
                     if any(b == name or b.startswith(name + '.') for b in blocks)]
            if units:
                found[i] = units[-1]
            elif found and self._finish_output_is(name):
                found[i] = len(self.units) - 1  # a module after the last block, taken from the finish's output
                finish.add(i)
        return found, finish

    def _finish_output_is(self, name: str) -> bool:
        """Whether the finish (without a final norm) returns module ``name``'s output: a ``feature_info`` entry after
        the last block (MobileOne's ``final_conv``) is then that output."""
        graph = getattr(self._split.finish_no_norm, 'graph', None)
        out = next((n for n in graph.nodes if n.op == 'output'), None) if graph is not None else None
        node = out.args[0] if out is not None else None
        return getattr(node, 'op', None) == 'call_module' and node.target in (name, f'model.{name}')

    def _stage_of(self, unit: int) -> int:
        return max(s for s, first in enumerate(self._first) if first <= unit)

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        unit = self._info_unit[info]
        if info in self._finish_info:
            return self._split.finish_no_norm(x)
        if norm and unit == len(self.units) - 1:
            normed = self._split.finish(x)  # the final norm, where the finish keeps the activation's shape
            x = normed if normed.shape == x.shape else x
        stage = self._stage_of(unit)
        layout = self._layouts[stage]
        if layout == 'nhwc':
            return x.permute(0, 3, 1, 2)
        if layout == 'nchw':
            return x
        found = self._grid_of(x.shape[1])
        prefix = found[1] if found else getattr(self.model, 'num_prefix_tokens', 0)
        x = x[:, prefix:]
        if output_fmt == 'NLC':
            return x
        h, w = found[0] if found else (math.isqrt(x.shape[1]),) * 2
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def input_size(self) -> Optional[tuple[int, int]]:
        patch_embed = getattr(self.model, 'patch_embed', None)
        if getattr(patch_embed, 'strict_img_size', False) and not getattr(patch_embed, 'dynamic_img_pad', False):
            return _probe_size(self.model)
        cfg = getattr(self.model, 'pretrained_cfg', None) or {}
        return _probe_size(self.model) if cfg.get('fixed_input_size') or self._split.fixed_size else None

    @property
    def in_chans(self) -> int:
        return self._in_chans
