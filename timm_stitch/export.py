"""Export of one route as a standalone module holding only that route's weights (for torch.export, ONNX, serving)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ._modes import eval_mode
from .adapters import AnchorAdapter
from .bn import route_bn_stats
from .runner import RouteRun, RouteSegment
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['export_stitch', 'StitchedRoute']


class StitchedRoute(nn.Module):
    """A stitched route as a plain module: the first anchor's embedding, each anchor's blocks of the route joined by
    their stitching layers, then the last anchor's finish and head.

    ``anchors`` are copies of the route's anchors, each once (a two-way route may pass through one twice), with
    every module and parameter the route does not run removed (replaced by ``nn.Identity`` / ``None``);
    ``adapters`` and ``units`` follow the route, one entry per anchor it passes through; ``stitches`` are copies of
    the route's stitching layers.
    """

    def __init__(
            self,
            anchors: Sequence[nn.Module],
            adapters: Sequence[AnchorAdapter],
            units: Sequence[Sequence[nn.Module]],
            stitches: Sequence[nn.Module],
            final_norm: bool,
    ):
        super().__init__()
        self.anchors = nn.ModuleList(anchors)
        self.stitches = nn.ModuleList(stitches)
        self.final_norm = final_norm
        # the modules are owned by ``anchors`` and ``stitches``, listed in run order
        self._run = RouteRun(adapters, [RouteSegment(tuple(u), self.stitches[i] if i < len(self.stitches) else None)
                                        for i, u in enumerate(units)])
        self.num_classes = getattr(self.anchors[-1], 'num_classes', None)
        self.num_features = adapters[-1].num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run.forward_features(x, self.final_norm)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._run.adapters[-1].head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def export_stitch(model: StitchedNet, stitch_id: int) -> nn.Module:
    """Route ``stitch_id`` of ``model`` as a standalone module with only the weights it uses, in eval mode.

    An anchor route is a copy of that anchor (an ordinary timm model); a stitched route is a :class:`StitchedRoute`
    whose outputs equal ``model(x, stitch_id=stitch_id)`` and whose parameter count equals the route's ``params``;
    low-rank stitching layers are merged into plain linear layers.
    BatchNorm statistics recalibrated for the route are baked in. A model inside ``torch.compile``, DDP or
    DataParallel is exported from the model itself.
    """
    model = unwrap_stitched(model, 'export_stitch')
    segments = model.route_segments(stitch_id)
    route = model.plan.routes[stitch_id]
    with eval_mode(model), route_bn_stats(model, route.id):
        if segments is None:
            return copy.deepcopy(model.anchors[route.anchors[0]]).eval()
        # copy the anchors, stitches and the adapters' view of them together so that they stay linked
        parts = ([model.anchors[a] for a in dict.fromkeys(route.anchors)],
                 [model.adapters[a] for a in route.anchors],
                 [s.stitch for s in segments if s.stitch is not None], [s.units for s in segments])
        anchors, adapters, stitches, units = copy.deepcopy(parts)
    stitches = [s.merge_lora_() for s in stitches]
    used = {id(p) for p in adapters[0].embed_parameters()}
    used |= {id(p) for m in (*stitches, *(u for us in units for u in us)) for p in m.parameters()}
    used |= {id(p) for p in adapters[-1].head_parameters(model.final_norm_on_stitched_routes)}
    for anchor in anchors:
        _prune(anchor, used)
    return StitchedRoute(anchors, adapters, units, stitches, model.final_norm_on_stitched_routes).eval()


def _prune(module: nn.Module, used: set[int]) -> None:
    """Replace every submodule whose parameters are all unused by ``nn.Identity`` and drop unused parameters."""
    for name, child in list(module.named_children()):
        params = list(child.parameters())
        if params and not any(id(p) in used for p in params):
            setattr(module, name, nn.Identity())
        else:
            _prune(child, used)
    for name, param in list(module._parameters.items()):
        if param is not None and id(param) not in used:
            module.register_parameter(name, None)
