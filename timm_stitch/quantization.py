"""Quantize a stitched network once and serve every route from it: int8 weight-only and int8 dynamic schemes.

Every ``nn.Linear`` of the anchors (attention, MLP, heads) becomes a :class:`QuantizedLinear` holding int8 weights
with one scale per output channel (symmetric, plain tensors: the state dict saves to safetensors and loads back
exactly); the stitching layers too unless ``quantize_stitches=False``. The routes still share these weights, so
``set_stitch``, ``stitch_id=`` per call or per sample and ``export_stitch`` work as on the float model.

Schemes (kernels chosen by measurement, see ``docs/quantization.md`` and ``benchmarks/bench_quantize.py``):

- ``'int8-dyn'``: int8 weights and activations. The activations are quantized per call (per tensor, range reduced
  to 7 bits as PyTorch's x86 kernels need) and multiplied by PyTorch's own ``quantized::linear_dynamic``
  (fbgemm/oneDNN): the fastest CPU kernel measured here.
- ``'int8-wo'``: int8 weights, float activations: each call dequantizes the weight and runs a float matmul. A
  quarter of the weight memory and float activations' accuracy; no faster than float32 on CPU.

Patch embeddings (convolutions) and 1x1-convolution stitching layers stay in float.
"""
from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .stitching import LoRALinear, StitchingLayer, merge_lora
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['quantize', 'QuantizedLinear', 'SCHEMES', 'quantize_state_dict', 'quantization_args']

#: scheme -> whether its stitching layers are quantized by default (decided by measurement: docs/quantization.md)
SCHEMES = {'int8-wo': True, 'int8-dyn': True}
_INT8_MAX = 127


def check_scheme(scheme: Any) -> str:
    """``scheme`` if it is a known quantization scheme; ``ValueError`` naming the valid ones otherwise."""
    if scheme not in SCHEMES:
        raise ValueError(f'unknown quantization scheme {scheme!r}: valid schemes are {", ".join(SCHEMES)}')
    return scheme


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights (``-127..127``) and float32 scales, one per output channel (row)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(weight / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """A linear layer with int8 weights (``weight``, a frozen int8 parameter, so that parameter counts and route
    exports see it), one float32 scale per output channel (``weight_scale``) and a float bias.

    ``scheme`` ``'int8-wo'`` dequantizes the weight per call; ``'int8-dyn'`` also quantizes the activations per
    call and runs PyTorch's dynamic int8 kernel on a packed copy of the weights, made on first use and again
    whenever a tensor it was made from changes (``load_state_dict``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = 'int8-dyn',
                 device: Optional[torch.device] = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, check_scheme(scheme)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer('weight_scale', torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._packed: Optional[tuple[tuple, Any]] = None

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: str) -> QuantizedLinear:
        """The quantized counterpart of ``linear`` (a low-rank layer is merged first)."""
        if isinstance(linear, LoRALinear):
            linear = merge_lora(linear)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, linear.weight.device)
        weight, scale = int8_per_channel(linear.weight)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the int8 one stands for."""
        return self.weight.float() * self.weight_scale[:, None]

    def _packed_weight(self) -> Any:
        tensors = (self.weight, self.weight_scale) + ((self.bias,) if self.bias is not None else ())
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            with warnings.catch_warnings():  # the qint8 tensor is only the kernel's packing input
                warnings.filterwarnings('ignore', message='.*quantized tensor creation functions.*')
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight.detach(), self.weight_scale.detach().double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
            bias = self.bias.detach().float() if self.bias is not None else None
            self._packed = (key, torch.ops.quantized.linear_prepack(qweight, bias))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == 'int8-wo':
            weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        if x.device.type != 'cpu':
            raise RuntimeError(f"the int8-dyn scheme runs on CPU only (PyTorch's dynamic int8 kernels), got an input "
                               f'on {x.device}: use int8-wo there')
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed_weight(), True).to(x.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_packed': None}  # the packed copy is a kernel object: made again on first use

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, '
                f'scheme={self.scheme}')


def quantization_args(model: nn.Module) -> dict[str, Any]:
    """The ``quantize`` / ``quantize_stitches`` model arguments ``model`` was quantized with (empty for a float
    model): what ``config.json`` records so that the saved folder builds the same modules."""
    scheme = getattr(model, 'quant_scheme', None)
    return {} if scheme is None else {'quantize': scheme, 'quantize_stitches': model.quant_stitches}


def quantize(model: StitchedNet, scheme: str, quantize_stitches: Optional[bool] = None,
             inplace: bool = False) -> StitchedNet:
    """``model`` with every linear layer of its anchors (and of its stitching layers unless ``quantize_stitches``
    is False; default: the scheme's choice in :data:`SCHEMES`) quantized to ``scheme`` (``'int8-wo'`` or
    ``'int8-dyn'``); a copy unless ``inplace``. Low-rank stitching layers are merged before quantizing them.

    Every route runs from the one quantized network, so a route card measured on the float model does not apply:
    ``routes()`` reports its accuracies as stale (measure the quantized model with ``timm-stitch validate
    --quantize SCHEME``). Raises ``ValueError`` for an unknown scheme or an already quantized model.
    """
    model = unwrap_stitched(model, 'quantize')
    check_scheme(scheme)
    if getattr(model, 'quant_scheme', None) is not None:
        raise ValueError(f'the model is already quantized ({model.quant_scheme}): quantize its float weights instead')
    stitches = SCHEMES[scheme] if quantize_stitches is None else bool(quantize_stitches)
    counted = model.counted_routes()  # MACs and params are the float network's: kept (int8 kernels go uncounted)
    if not inplace:
        model = copy.deepcopy(model)
    _replace_linears(model.anchors, scheme)
    if stitches:
        for layer in model.stitch_layers.modules():
            if isinstance(layer, StitchingLayer) and isinstance(layer.transform, nn.Linear):
                layer.transform = QuantizedLinear.from_float(layer.transform, scheme)
    model.quant_scheme, model.quant_stitches = scheme, stitches
    model._route_cache = counted
    model._weights_changed()
    return model


def _replace_linears(module: nn.Module, scheme: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear.from_float(child, scheme))
        else:
            _replace_linears(child, scheme)


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A float checkpoint's state dict in the form of quantized ``model``'s (int8 ``weight`` and ``weight_scale``
    for each :class:`QuantizedLinear`, as :func:`quantize` makes them); a quantized checkpoint is returned as it
    is. Raises ``ValueError`` for low-rank stitching weights, which need the model's scaling to merge."""
    state = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or f'{name}.weight_scale' in state:
            continue
        if f'{name}.lora_A' in state:
            raise ValueError(f'{name} holds low-rank stitching weights: build the float model, load them, then '
                             'call timm_stitch.quantize(model, scheme)')
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.is_floating_point():
            state[f'{name}.weight'], state[f'{name}.weight_scale'] = int8_per_channel(weight)
    return state
