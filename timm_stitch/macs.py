"""Per-route MACs in the convention of the SN-Net tables (fvcore's: one multiply-add per
multiplication, attention matmuls and LayerNorm counted), counted piece by piece.

Every piece of a stitched network (each anchor's embed, each unit, each stitching layer at each cut, the finish
with and without the final norm, the head) is counted once at batch 1; a route's MACs are then a pure sum
(:func:`route_macs`), so all routes cost one pass over each anchor instead of one pass per route.

Convention (fvcore's ``FlopCountAnalysis``): one multiply-add = 1; linear layers, matmuls (including attention's
q·kᵀ and attn·v) and convolutions count their MACs; LayerNorm/GroupNorm count 5 per element (4 without affine),
eval BatchNorm 2 (1 without affine), adaptive average pooling 1 per input element, interpolation (a resampling
stitch) 4 per output element for bilinear (1 nearest, 16 bicubic); biases, softmax, activations,
residual adds and scaling count nothing.

Why this counter: thop hooks modules, so it misses functional matmuls (attention) and LayerNorm (DeiT-Ti comes
out ~15 % low); fvcore traces with the JIT and records no FLOPs for ``scaled_dot_product_attention``, which timm's
fused attention uses. Counting at the aten dispatch level (``torch.utils.flop_counter.FlopCounterMode``) sees every
matmul and convolution however it was written, fused attention included, and is exact (its FLOP formulas are
2 per MAC); norms and pooling are counted where fvcore sees them, at the ``torch.nn.functional`` call, because
at the dispatch level they become device-specific kernels (and pooling to 1x1 becomes a plain ``mean``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ._modes import eval_mode, frozen_parameters
from .input_size import model_input_size
from .routes import Route, StitchRef
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['AnchorMacs', 'count_macs', 'count_anchor_macs', 'count_route_macs', 'route_macs']

aten = torch.ops.aten


def _layer_norm(input, normalized_shape, weight=None, *args, **kwargs) -> int:
    return input.numel() * (5 if weight is not None else 4)


def _group_norm(input, num_groups, weight=None, *args, **kwargs) -> int:
    return input.numel() * (5 if weight is not None else 4)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, *args, **kwargs) -> int:
    if training:
        return input.numel() * (5 if weight is not None else 4)
    return input.numel() * (2 if weight is not None else 1)


def _adaptive_avg_pool(input, *args, **kwargs) -> int:
    return input.numel()


#: input elements each output element of ``F.interpolate`` reads, per mode (fvcore: 4 for bilinear, 1 for nearest)
_INTERPOLATE_TAPS = {'nearest': 1, 'bilinear': 4, 'bicubic': 16}


def _interpolate(input, size=None, scale_factor=None, mode='nearest', *args, **kwargs) -> int:
    dims = input.ndim - 2
    if size is not None:
        out = tuple(size) if isinstance(size, (tuple, list)) else (size,) * dims
    else:
        scales = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * dims
        out = tuple(math.floor(n * f) for n, f in zip(input.shape[2:], scales))
    return input.shape[0] * input.shape[1] * math.prod(out) * _INTERPOLATE_TAPS.get(mode, 1)


_FUNCTION_RULES: dict[Callable, Callable[..., int]] = {
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
    F.adaptive_avg_pool2d: _adaptive_avg_pool,
    F.interpolate: _interpolate,
}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # the CPU fused-attention kernel has no formula in torch's registry (the CUDA ones do)
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class _FunctionalCounter(TorchFunctionMode):
    """Counts the norm and pooling calls of ``_FUNCTION_RULES`` at the ``torch.nn.functional`` level."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _FUNCTION_RULES.get(func)
        if rule is not None:
            self.macs += rule(*args, **kwargs)
        return func(*args, **kwargs)


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """MACs of one call ``fn(*args, **kwargs)`` in the fvcore convention, and the call's result."""
    functional = _FunctionalCounter()
    dispatch = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    })
    with dispatch, functional:
        out = fn(*args, **kwargs)
    return dispatch.get_total_flops() // 2 + functional.macs, out


@dataclass(frozen=True)
class AnchorMacs:
    """MACs of each piece of one anchor at batch 1.

    ``block_units[stage][block]`` is the unit index of each stitchable block (its adapter's ``unit_index``), so
    that :func:`route_macs` needs no model. ``forward`` is the anchor's own forward, which anchor routes run.
    """
    embed: int
    units: tuple[int, ...]
    finish: int
    finish_no_norm: int
    head: int
    forward: int
    block_units: tuple[tuple[int, ...], ...]


def route_macs(
        route: Route,
        anchors: Sequence[AnchorMacs],
        stitch_macs: Mapping[tuple[StitchRef, int], int],
        final_norm: bool = True,
) -> int:
    """MACs of one route: the sum of the pieces it runs (a pure function of the piece counts).

    ``stitch_macs[(ref, front)]`` is the stitching layer ``ref`` applied after front block ``front``;
    ``final_norm`` is whether stitched routes apply the last anchor's final norm.
    """
    if route.is_anchor:
        return anchors[route.anchors[0]].forward
    total = anchors[route.anchors[0]].embed
    start = 0
    for i, anchor in enumerate(route.anchors):
        counts = anchors[anchor]
        if i < len(route.cuts):
            (front, end), ref = route.cuts[i], route.stitches[i]
            stop = counts.block_units[ref.stage][front] + 1
            total += sum(counts.units[start:stop]) + stitch_macs[(ref, front)]
            start = _resume_unit(anchors[route.anchors[i + 1]].block_units[ref.resume_stage], end)
        else:
            total += sum(counts.units[start:])
    last = anchors[route.anchors[-1]]
    return total + (last.finish if final_norm else last.finish_no_norm) + last.head


def _resume_unit(block_units: Sequence[int], end: int) -> int:
    """The unit a route resumes at when it enters a stage at block ``end``; ``end`` equal to the stage depth (a
    two-way route that runs none of the end anchor's blocks) resumes after the stage's last block."""
    return block_units[-1] + 1 if end == len(block_units) else block_units[end]


def _param_like(module: nn.Module) -> torch.Tensor:
    return next(iter(module.parameters()), torch.empty(0))


def count_anchor_macs(
        model: StitchedNet, input_size: Optional[Sequence[int]] = None,
) -> tuple[list[AnchorMacs], dict[tuple[StitchRef, int], int]]:
    """Count every piece of ``model`` once at batch 1: per-anchor pieces and each stitching layer at each cut."""
    input_size = tuple(input_size or model_input_size(model))
    with eval_mode(model), torch.no_grad(), frozen_parameters(model):
        anchors, activations = [], []
        for anchor, adapter in zip(model.anchors, model.adapters):
            ref = _param_like(anchor)
            x = torch.randn(1, *input_size, device=ref.device, dtype=ref.dtype)
            forward, _ = count_macs(anchor, x)
            embed, h = count_macs(adapter.embed, x)
            units, outs = [], []
            for unit in adapter.units:
                macs, h = count_macs(unit, h)
                units.append(macs)
                outs.append(h)
            finish_no_norm, _ = count_macs(adapter.finish, h, False)
            finish, feats = count_macs(adapter.finish, h, True)
            head, _ = count_macs(adapter.head, feats)
            block_units = tuple(
                tuple(adapter.unit_index(s, b) for b in range(depth))
                for s, depth in enumerate(adapter.stage_depths()))
            anchors.append(AnchorMacs(embed, tuple(units), finish, finish_no_norm, head, forward, block_units))
            activations.append(outs)
        stitches: dict[tuple[StitchRef, int], int] = {}
        by_shape: dict[tuple[StitchRef, tuple[int, ...]], int] = {}
        for route in model.plan.routes:
            for anchor, (front, _), ref in zip(route.anchors, route.cuts, route.stitches):
                h = activations[anchor][anchors[anchor].block_units[ref.stage][front]]
                key = (ref, tuple(h.shape))
                if key not in by_shape:
                    # a low-rank layer costs what the plain linear layer it merges into does, as deployed (and as
                    # fvcore counts SN-Netv2's, which merge in eval mode)
                    layer = model.stitch_layer(ref)
                    by_shape[key] = count_macs(copy.deepcopy(layer).merge_lora_() if layer.lora_rank else layer, h)[0]
                stitches[(ref, front)] = by_shape[key]
    return anchors, stitches


def count_route_macs(model: StitchedNet, input_size: Optional[Sequence[int]] = None) -> list[int]:
    """MACs of every route of ``model`` at batch 1 (fvcore convention), in route-id order.

    ``input_size`` is (C, H, W), default :func:`model_input_size`. Stitched routes include the final norm as
    the model applies it (``final_norm_on_stitched_routes``). A wrapped model (``torch.compile``, DDP) is counted
    as the model inside.
    """
    model = unwrap_stitched(model, 'count_route_macs')
    anchors, stitches = count_anchor_macs(model, input_size)
    return [route_macs(r, anchors, stitches, model.final_norm_on_stitched_routes) for r in model.plan.routes]
