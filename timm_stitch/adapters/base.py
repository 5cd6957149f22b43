"""The interface a stitched network uses to drive one anchor of a model family block by block."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch import nn

from .._modes import eval_mode
from ..errors import AdapterMismatchError
from ..grids import Layout

__all__ = ['AnchorAdapter', 'ADAPTERS', 'adapter_for', 'first_conv_channels', 'params_of', 'register_adapter']


class AnchorAdapter:
    """Splits one timm model into embed -> flat list of units -> features -> head.

    Units are the blocks a route can cut between, plus any module that must run between stages (a patch merge or
    downsample), so that a cut inside a stage never runs a merge twice or skips one. ``unit_index(stage, block)``
    maps a stage-local block id to its position in ``units``.
    """

    #: layout of the activations between units (and at stitch points)
    layout: Layout = 'tokens'

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def units(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def stage_depths(self) -> tuple[int, ...]:
        """Number of stitchable blocks per stage."""
        raise NotImplementedError

    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of the activations inside each stage."""
        raise NotImplementedError

    def stage_layouts(self) -> tuple[Layout, ...]:
        """Layout of the activations inside each stage (where a stitch reads or writes them)."""
        return (self.layout,) * len(self.stage_depths())

    def unit_index(self, stage: int, block: int) -> int:
        raise NotImplementedError

    def prefix_roles(self) -> tuple[str, ...]:
        """Roles of the prefix tokens before the patch tokens (``'cls'``, ``'dist'``, ``'reg'``), in order; none
        for feature maps."""
        return ()

    def patch_grid(self) -> Optional[tuple[int, int]]:
        """The (H, W) of a token stage's patch tokens (single-stage token models), so that a stitch can resample
        it; None when unknown (then it stitches only into the same number of positions)."""
        return None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Turn the last unit's output into ``forward_features`` output."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def head_parameters(self, final_norm: bool = True) -> Iterator[nn.Parameter]:
        """Parameters used after the last unit (final norm when applied, pooling, classifier)."""
        raise NotImplementedError

    #: the ``output_fmt`` values the family's ``forward_intermediates`` takes
    intermediate_formats: tuple[str, ...] = ('NCHW',)

    def feature_points(self) -> tuple[tuple[int, int, Optional[int]], ...]:
        """Where timm's intermediates are taken, as ``(end, info, stage)``: intermediate ``info`` (an index into
        the model's ``feature_info``) is the activation after ``units[:end]`` (``end`` -1: the stem output of
        :meth:`embed_intermediate`); ``stage`` names the stage whose output it is (None: every block is one)."""
        raise NotImplementedError

    def embed_intermediate(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``embed(x)`` and the stem intermediate taken inside it (None when the family has none)."""
        return self.embed(x), None

    def intermediate(self, x: torch.Tensor, info: int, norm: bool, output_fmt: str,
                     img_size: tuple[int, int]) -> torch.Tensor:
        """A unit output as timm's ``forward_intermediates`` returns intermediate ``info`` (``img_size``: input
        (H, W))."""
        return x

    def input_size(self) -> Optional[tuple[int, int]]:
        """The (H, W) the model requires, or None when it accepts any size."""
        return None

    @property
    def in_chans(self) -> int:
        raise NotImplementedError

    def probe_size(self) -> tuple[int, int]:
        """The (H, W) of the probe image: the required input size, else the size of the model's pretrained cfg."""
        cfg = getattr(self.model, 'pretrained_cfg', None) or {}
        return self.input_size() or tuple(cfg.get('input_size', (3, 224, 224))[-2:])

    @torch.no_grad()
    def verify(self) -> None:
        """Check, on a probe image in eval mode, that embed -> units -> finish -> head gives the model's own
        ``forward_features`` and ``forward`` bit for bit (skipped for models on the meta device); ``ValueError``
        naming the family and what differed. A model that takes any size is probed at 64x64 first (building is
        faster), at its own size where that fails."""
        param = next(self.model.parameters(), None)
        if param is None or param.device.type == 'meta':
            return
        sizes = [self.probe_size()]
        if self.input_size() is None and min(sizes[0]) > _SMALL_PROBE:
            sizes.insert(0, (_SMALL_PROBE, _SMALL_PROBE))
        for i, size in enumerate(sizes):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, self.in_chans, *size, generator=gen).to(param.device, param.dtype)
            try:
                with eval_mode(self.model):
                    feats = self.finish(self._run_units(self.embed(x)))
                    checks = (('forward_features', feats, self.model.forward_features(x)),
                              ('forward', self.head(feats), self.model(x)))
                break
            except (RuntimeError, TypeError, AttributeError, IndexError, ValueError, AssertionError) as e:
                if i + 1 < len(sizes):
                    continue
                raise AdapterMismatchError(
                    f'cannot stitch a {type(self.model).__name__} with {type(self).__name__}: a probe image fails '
                    f'({type(e).__name__}: {str(e)[:200]})') from e
        for what, ours, theirs in checks:
            if not isinstance(theirs, torch.Tensor) or ours.shape != theirs.shape or not torch.equal(ours, theirs):
                diff = (f'max difference {(ours - theirs).abs().max().item():.3g}'
                        if isinstance(theirs, torch.Tensor) and ours.shape == theirs.shape else 'different shapes')
                raise AdapterMismatchError(
                    f'cannot stitch a {type(self.model).__name__} with {type(self).__name__}: its embedding, units '
                    f'and finish do not reproduce its {what} ({diff} on a probe image)')

    def _run_units(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    @property
    def num_features(self) -> int:
        return self.model.num_features


#: the side of the first probe image of models that take any input size
_SMALL_PROBE = 64

#: (timm model class, adapter class) pairs, in registration order; filled by :func:`register_adapter`
ADAPTERS: list[tuple[type[nn.Module], type[AnchorAdapter]]] = []

_A = TypeVar('_A', bound=type[AnchorAdapter])


def register_adapter(*model_classes: type[nn.Module]) -> Callable[[_A], _A]:
    """Class decorator registering an adapter for the timm model classes it drives (as timm registers models).

    :func:`adapter_for` picks the most specific registered class the model is an instance of; a class registered twice
    raises ``ValueError``, so two families cannot silently claim one model class.
    """
    def register(adapter_cls: _A) -> _A:
        for model_cls in model_classes:
            for known, other in ADAPTERS:
                if known is model_cls:
                    raise ValueError(f'{model_cls.__name__} already has an adapter: {other.__name__}')
            ADAPTERS.append((model_cls, adapter_cls))
        return adapter_cls
    return register


def adapter_for(model: nn.Module) -> AnchorAdapter:
    """The adapter that drives ``model``, verified on a probe image (:meth:`AnchorAdapter.verify`).

    Raises ``TypeError`` for a model no adapter can split, ``ValueError`` when the adapter's pieces do not
    reproduce the model's own output."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'an anchor must be a timm model (an nn.Module), got {type(model).__name__}')
    # the most specific registered class wins (GenericAdapter, registered for nn.Module, is the fallback)
    _, adapter_cls = max(((m, a) for m, a in ADAPTERS if isinstance(model, m)), key=lambda e: len(e[0].__mro__))
    adapter = adapter_cls(model)
    adapter.verify()
    return adapter


def first_conv_channels(model: nn.Module) -> Optional[int]:
    """The input channels of the model's first conv: the one its ``pretrained_cfg`` names, else the first
    ``Conv2d``/``Linear`` it holds, else its ``in_chans`` attribute."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('first_conv') or ()
    modules = dict(model.named_modules())
    for name in ([names] if isinstance(names, str) else list(names)):
        for candidate in (name, f'{name}.conv'):
            layer = modules.get(candidate)
            if isinstance(layer, nn.Conv2d):
                return layer.in_channels
    in_chans = getattr(model, 'in_chans', None)
    if isinstance(in_chans, int):
        return in_chans
    layer = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return layer.in_channels if layer is not None else None


def params_of(*items: Optional[nn.Module | nn.Parameter]) -> Iterator[nn.Parameter]:
    """Parameters of the given modules and parameters, skipping ``None``."""
    for item in items:
        if isinstance(item, nn.Parameter):
            yield item
        elif isinstance(item, nn.Module):
            yield from item.parameters()
