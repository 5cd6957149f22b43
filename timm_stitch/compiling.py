"""``torch.compile`` for stitched networks: one compiled graph per route, compiled on first use and cached.

Compiling ``model`` itself and switching routes makes dynamo recompile on every new route id (an integer attribute
or argument is a guard), and after ``torch._dynamo.config.recompile_limit`` (8) recompiles of one function it falls
back to eager for good. Here every route gets a function with its own code object, so each route is one cache entry
of its own: no guard misses while switching, no recompile limit, however many routes.

Mixed-route batches (one route id per sample) are grouped by route and each group runs its route's compiled
function, so a new set of ids compiles nothing new (a route's function compiles once more when its group size first
changes, then takes any size). ``torch.compile(model)`` itself runs mixed batches eagerly
(:func:`timm_stitch.serving.mixed_forward` is not traced), also without recompiling.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch

from .serving import mixed_forward

if TYPE_CHECKING:
    from .model import StitchedNet
    from .serving import RouteIds

__all__ = ['CompiledStitchedNet', 'compile']


def _route_forward(model: StitchedNet, x: torch.Tensor) -> torch.Tensor:
    return model(x, stitch_id=ROUTE_ID)  # noqa: F821  (bound per route in the function's globals)


def _route_function(stitch_id: int) -> Callable[[StitchedNet, torch.Tensor], torch.Tensor]:
    """A copy of ``_route_forward`` with a code object of its own, bound to one route id."""
    name = f'stitch_route_{stitch_id}'
    code = _route_forward.__code__.replace(co_name=name)
    return types.FunctionType(code, {**_route_forward.__globals__, 'ROUTE_ID': stitch_id}, name)


class CompiledStitchedNet:
    """Calls a stitched network through one ``torch.compile``'d graph per route.

    ``compiled(x)`` runs the model's active route, ``compiled(x, stitch_id=k)`` route ``k``, ``compiled(x,
    stitch_id=ids)`` route ``ids[i]`` for sample ``i`` (each route's samples through its graph); a route's graph is
    compiled the first time it runs. The model itself is shared, not copied: ``set_stitch``, ``train()``/``eval()``
    and weight updates on ``model`` apply (a mode change triggers a recompile of that route, as with any module).
    """

    def __init__(self, model: StitchedNet, **compile_kwargs: Any):
        self.model = model
        self.compile_kwargs = compile_kwargs
        self._compiled: dict[int, Callable] = {}

    def route_fn(self, stitch_id: int) -> Callable[[StitchedNet, torch.Tensor], torch.Tensor]:
        """The compiled function of route ``stitch_id`` (created on first use)."""
        fn = self._compiled.get(stitch_id)
        if fn is None:
            fn = self._compiled[stitch_id] = torch.compile(_route_function(stitch_id), **self.compile_kwargs)
        return fn

    def __call__(self, x: torch.Tensor, stitch_id: Optional[Union[int, RouteIds]] = None) -> torch.Tensor:
        if isinstance(stitch_id, (torch.Tensor, np.ndarray)) and stitch_id.ndim == 0:
            stitch_id = stitch_id.item()
        elif isinstance(stitch_id, (torch.Tensor, np.ndarray, list, tuple)):
            return mixed_forward(self.model, x, stitch_id, share_prefix=False, run=self._run)
        return self._run(x, self.model.resolve_stitch_id(stitch_id))

    def _run(self, x: torch.Tensor, stitch_id: int) -> torch.Tensor:
        return self.route_fn(stitch_id)(self.model, x)

    @property
    def compiled_routes(self) -> list[int]:
        return sorted(self._compiled)


def compile(model: StitchedNet, **compile_kwargs: Any) -> CompiledStitchedNet:  # noqa: A001 (torch.compile's name)
    """Wrap ``model`` so that each route runs its own cached ``torch.compile`` graph (kwargs: ``torch.compile``'s)."""
    return CompiledStitchedNet(model, **compile_kwargs)
