"""Models handed over inside a wrapper: ``torch.compile``, ``DistributedDataParallel``/``DataParallel``, timm's
model EMA and :func:`timm_stitch.compile`. Every public function taking a stitched network unwraps it here, so a
wrapped model is saved, profiled, exported and counted as the model inside."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.utils import unwrap_model

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['unwrap', 'unwrap_stitched']


def unwrap(model: Any) -> Any:
    """The module inside any wrappers (``_orig_mod`` of ``torch.compile``, ``module`` of DDP, DataParallel and
    timm's ``ModelEmaV2/V3``, ``model`` of :class:`timm_stitch.CompiledStitchedNet`)."""
    from .compiling import CompiledStitchedNet
    while True:
        inner = model.model if isinstance(model, CompiledStitchedNet) else unwrap_model(model)
        if inner is model:
            return model
        model = inner


def unwrap_stitched(model: Any, what: str) -> StitchedNet:
    """The stitched network inside ``model``; ``TypeError`` naming ``what`` (the caller) for anything else."""
    from .model import StitchedNet
    inner = unwrap(model)
    if not isinstance(inner, StitchedNet):
        wrapped = f' wrapping a {type(inner).__name__}' if inner is not model else ''
        raise TypeError(f'{what} takes a stitched network (a StitchedNet, possibly inside torch.compile, DDP or '
                        f'DataParallel), got a {type(model).__name__}{wrapped}')
    return inner
