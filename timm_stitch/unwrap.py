"""Models handed over inside a wrapper: ``torch.compile``, ``DistributedDataParallel``/``DataParallel``, timm's
model EMA and :func:`timm_stitch.compile`. Every public function taking a stitched network unwraps it here, so a
wrapped model is saved, profiled, exported and counted as the model inside.

This module sits below the model: it recognises a stitched network by what it does (:func:`is_stitched`), and
:class:`timm_stitch.CompiledStitchedNet` by its base :class:`StitchedWrapper`, importing neither."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.utils import unwrap_model
from torch import nn

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['StitchedWrapper', 'is_stitched', 'unwrap', 'unwrap_stitched']


class StitchedWrapper:
    """Base of wrappers calling a stitched network held as ``self.model`` (:class:`timm_stitch.CompiledStitchedNet`)."""
    model: StitchedNet


def is_stitched(module: Any) -> bool:
    """Whether ``module`` is a stitched network (a module whose class runs routes), not a wrapper around one."""
    return isinstance(module, nn.Module) and callable(getattr(type(module), 'route_run', None))


def unwrap(model: Any) -> Any:
    """The module inside any wrappers (``_orig_mod`` of ``torch.compile``, ``module`` of DDP, DataParallel and
    timm's ``ModelEmaV2/V3``, ``model`` of a :class:`StitchedWrapper`)."""
    while True:
        inner = model.model if isinstance(model, StitchedWrapper) else unwrap_model(model)
        if inner is model:
            return model
        model = inner


def unwrap_stitched(model: Any, what: str) -> StitchedNet:
    """The stitched network inside ``model``; ``TypeError`` naming ``what`` (the caller) for anything else."""
    inner = unwrap(model)
    if not is_stitched(inner):
        wrapped = f' wrapping a {type(inner).__name__}' if inner is not model else ''
        raise TypeError(f'{what} takes a stitched network (a StitchedNet, possibly inside torch.compile, DDP or '
                        f'DataParallel), got a {type(model).__name__}{wrapped}')
    return inner
