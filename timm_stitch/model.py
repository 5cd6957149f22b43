"""The stitched network: several timm anchors joined by stitching layers, one route active at a time."""
from __future__ import annotations

import numbers
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ._timm_compat import update_model_input_size
from .adapters import AnchorAdapter, adapter_for
from .anchor_checks import check_anchors
from .anchors import AnchorSpec, anchor_name, build_anchor, check_anchor_sequence, per_anchor_kwargs
from .bn import RouteBatchNormStats, prepare_load, recalibrate_bn, route_bn_stats
from .card_state import RouteCardMixin
from .errors import RouteIdError
from .export import export_stitch
from .features import prune_route_intermediates, route_feature_info, route_intermediates
from .input_size import anchor_first_convs, set_anchors_input_size
from .ls_init import init_stitches
from .macs import count_route_macs
from .route_spaces import StitchOptions, plan_routes
from .routes import Route, StitchRef
from .runner import RouteRun, RouteSegment, route_segments
from .serving import mixed_forward
from .stitching import StitchingLayer, deployed_parameters

if TYPE_CHECKING:
    from .serving import RouteIds

__all__ = ['StitchedNet', 'AnchorSpec', 'RouteSegment', 'build_anchor', 'anchor_name', 'register_release_loader']


class StitchedNet(RouteCardMixin, nn.Module):
    """A stitchable network (SN-Net) over timm anchors.

    Anchors are ordinary timm models kept in ``self.anchors`` (smallest first); stitching layers live in
    ``self.stitch_layers[stage][pair][layer]``. Route ids follow the official SN-Net enumeration. One route is
    active at a time (``set_stitch``); ``forward(x, stitch_id=k)`` runs route ``k`` for that call only.

    Args:
        anchors: timm model names, ``timm.create_model`` kwargs dicts (with ``model_name``), or built models.
        num_classes: Classes of every anchor head (default: each named anchor's own default).
        in_chans: Input channels of every anchor (default: each named anchor's own default).
        img_size: Input size passed to every anchor built by name (default: each anchor's own).
        options: Where and how the anchors are stitched (:class:`~timm_stitch.StitchOptions`: window, stages, layer
            mapping, route space); its fields may also be given flat (``kernel_size=2``, ``route_space='two_way'``),
            as ``config.json`` records them. The anchors are checked against it (``ValueError`` naming what
            differs when they cannot be stitched).
        final_norm_on_stitched_routes: Apply the last anchor's final norm on stitched routes (the official DeiT
            code skips it; set False to reproduce its checkpoint).
        pretrained_anchors: Load each anchor's own timm pretrained weights.
        stitch_lora_rank: Rank of a trainable low-rank update on every stitching layer, whose base weight is then
            frozen (0: plain layers); ``stitch_lora_alpha`` scales it by ``alpha / rank`` (SN-Netv2: 64 and 1).
        stitch_id: The route made active (as ``set_stitch``; default: the largest anchor's), so that
            ``timm.create_model(..., stitch_id=k)`` and stock timm scripts' ``--model-kwargs stitch_id=k`` pick a route.
        device, dtype: timm's factory arguments: anchors built by name and the stitching layers are made there.
        anchor_names: The names the anchors are known by (default: each spec's name, or a built model's
            architecture).
        **anchor_kwargs: Passed to ``timm.create_model`` for every anchor given by name (``drop_path_rate``...);
            ``drop_path_rate`` may be a sequence with one rate per anchor (SN-Netv2 gives each anchor its own).
    """

    def __init__(
            self,
            anchors: Sequence[AnchorSpec],
            num_classes: Optional[int] = None,
            in_chans: Optional[int] = None,
            img_size: Optional[Union[int, tuple[int, int]]] = None,
            options: Optional[StitchOptions] = None,
            final_norm_on_stitched_routes: bool = True,
            pretrained_anchors: bool = False,
            stitch_id: Optional[int] = None,
            stitch_lora_rank: int = 0,
            stitch_lora_alpha: float = 1.0,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            anchor_names: Optional[Sequence[str]] = None,
            **anchor_kwargs: Any,
    ):
        super().__init__()
        options = StitchOptions.of(options, anchor_kwargs)
        check_anchor_sequence(anchors)
        if img_size is not None:
            anchor_kwargs['img_size'] = img_size
        anchor_kwargs.update((k, v) for k, v in (('device', device), ('dtype', dtype)) if v is not None)
        models = [build_anchor(a, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained_anchors, **kwargs)
                  for a, kwargs in zip(anchors, per_anchor_kwargs(anchor_kwargs, len(anchors)))]
        self.anchors = nn.ModuleList(models)
        self.adapters: list[AnchorAdapter] = [adapter_for(m) for m in models]
        self.anchor_names = list(anchor_names or (anchor_name(a, m) for a, m in zip(anchors, models)))
        if len(self.anchor_names) != len(models):
            raise ValueError(f'got {len(self.anchor_names)} anchor names for {len(models)} anchors')
        #: where and how the anchors are stitched (``stages``: those checked and planned)
        geometry = check_anchors(models, self.anchor_names, options, self.adapters)
        self.options = replace(options, stages=geometry.stages)
        self.num_classes = models[0].num_classes
        self.in_chans = self.adapters[0].in_chans
        self._traits = {'first_conv': anchor_first_convs(self.anchors)}  # timm adapts each to in_chans when loading
        self._set_fixed_input_size()
        self.final_norm_on_stitched_routes = final_norm_on_stitched_routes
        self.grad_checkpointing = False

        self.plan = plan_routes([a.stage_depths() for a in self.adapters], self.options, geometry.end_stages)
        self.stitch_layers = nn.ModuleDict()
        for group in self.plan.groups:
            front, end = self.adapters[group.front_anchor], self.adapters[group.end_anchor]
            if str(group.stage) not in self.stitch_layers:
                self.stitch_layers[str(group.stage)] = nn.ModuleList()
            stage = self.stitch_layers[str(group.stage)]
            assert len(stage) == group.pair, 'stitch groups are planned stage by stage, pair by pair'
            stage.append(nn.ModuleList(
                StitchingLayer(front.stage_dims()[group.stage], end.stage_dims()[group.resume_stage],
                               front.stage_layouts()[group.stage], end.stage_layouts()[group.resume_stage],
                               stitch_lora_rank, stitch_lora_alpha, **geometry.layer_grids(group))
                for _ in range(group.num_layers)
            ))
        #: per-route BatchNorm statistics (registered buffers, last in the state_dict; see :mod:`timm_stitch.bn`)
        self.route_bn = RouteBatchNormStats(self.anchors)
        if device is not None or dtype is not None:  # timm's factory kwargs: the new modules follow the anchors
            self.stitch_layers.to(device=device, dtype=dtype)
            self.route_bn.to(device=device, dtype=dtype)
        self._runs = [self._route_run(r) for r in self.plan.routes]
        self._stitch_id = len(self.anchors) - 1  # the largest anchor, as a plain timm model would behave
        self._route_cache: Optional[list[Route]] = None
        if stitch_id is not None:
            self.set_stitch(stitch_id)

    def _set_fixed_input_size(self) -> None:
        #: the (H, W) every input must have (the first anchor with a fixed size decides), or None
        self.fixed_input_size = next((s for s in (a.input_size() for a in self.adapters) if s is not None), None)

    def set_input_size(self, img_size: Optional[Union[int, tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, tuple[int, int]]] = None, **kwargs: Any) -> None:
        """Resize every anchor's input with timm's own ``set_input_size`` (position embeddings resampled as timm
        does); route MACs then follow the new size."""
        set_anchors_input_size(self.anchors, img_size, patch_size, **kwargs)
        self._set_fixed_input_size()
        update_model_input_size(self, self.fixed_input_size or img_size, patch_size=patch_size)  # timm's input config
        self._route_cache = None

    # ---- routes -------------------------------------------------------------------------------------------------

    @property
    def route_space(self) -> str:
        """``'one_way'`` (SN-Net) or ``'two_way'`` (SN-Netv2): the route space of ``options``."""
        return self.options.route_space

    @property
    def num_routes(self) -> int:
        return len(self.plan.routes)

    @property
    def stitch_id(self) -> int:
        """The route used by calls that do not pass ``stitch_id``."""
        return self._stitch_id

    def set_stitch(self, stitch_id: int) -> None:
        """Make route ``stitch_id`` the active one; on a bad id, raises and leaves the active route unchanged."""
        self._stitch_id = self.check_stitch_id(stitch_id)

    def counted_routes(self) -> list[Route]:
        """Every route with its structure, params and MACs only (counted on first call: they depend on the
        architecture alone)."""
        if self._route_cache is None:
            routes = [replace(r, params=self._route_params(r)) for r in self.plan.routes]
            self._route_cache = [replace(r, macs=m) for r, m in zip(routes, count_route_macs(self))]
        return list(self._route_cache)

    def stitch_layer(self, ref: StitchRef) -> StitchingLayer:
        return self.stitch_layers[str(ref.stage)][ref.pair][ref.layer]

    def route_segments(self, stitch_id: int) -> Optional[tuple[RouteSegment, ...]]:
        """The segments route ``stitch_id`` runs between its embedding and its head (None for an anchor route)."""
        run = self.route_run(stitch_id)
        return None if run is None else run.segments

    def check_stitch_id(self, stitch_id: Any) -> int:
        """``stitch_id`` as an int; ``TypeError`` for a non-integer, ``ValueError`` naming the valid range."""
        if isinstance(stitch_id, bool) or not isinstance(stitch_id, numbers.Integral):
            raise TypeError(f'stitch_id must be an int, got {type(stitch_id).__name__} {stitch_id!r}')
        stitch_id = int(stitch_id)
        if not 0 <= stitch_id < self.num_routes:
            raise RouteIdError(
                f'stitch_id {stitch_id} is out of range: valid ids are 0..{self.num_routes - 1} '
                f'({self.num_routes} routes)')
        return stitch_id

    def resolve_stitch_id(self, stitch_id: Optional[int]) -> int:
        """``stitch_id`` checked, or the active route's id when it is None."""
        return self._stitch_id if stitch_id is None else self.check_stitch_id(stitch_id)

    def route_run(self, stitch_id: int) -> Optional[RouteRun]:
        """How route ``stitch_id`` runs (see :mod:`timm_stitch.runner`); None for an anchor route."""
        return self._runs[self.check_stitch_id(stitch_id)]

    def _route_run(self, route: Route) -> Optional[RouteRun]:
        segments = route_segments(route, self.adapters, self.stitch_layer)
        if segments is None:
            return None
        return RouteRun([self.adapters[a] for a in route.anchors], segments)

    def _route_params(self, route: Route) -> int:
        if route.is_anchor:
            return sum(p.numel() for p in self.anchors[route.anchors[0]].parameters())
        params = {id(p): p for p in self.adapters[route.anchors[0]].embed_parameters()}
        for segment in self._runs[route.id].segments:
            modules = segment.units + ((segment.stitch,) if segment.stitch is not None else ())
            params.update((id(p), p) for p in deployed_parameters(modules))
        last = self.adapters[route.anchors[-1]]
        params.update((id(p), p) for p in last.head_parameters(self.final_norm_on_stitched_routes))
        return sum(p.numel() for p in params.values())

    # ---- forward ------------------------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` naming what is wrong unless ``x`` is an image batch this network takes
        (4-D, its input channels, its fixed input size if it has one)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'expected an image tensor, got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(f'expected a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})')
        size = self.fixed_input_size
        if size is not None and tuple(x.shape[-2:]) != size:
            raise ValueError(f'expected {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]}')

    def forward_features(self, x: torch.Tensor, stitch_id: Optional[int] = None) -> torch.Tensor:
        """Features of route ``stitch_id`` (default: the active route), before the head."""
        stitch_id = self.resolve_stitch_id(stitch_id)
        with route_bn_stats(self, stitch_id):
            return self._route_features(x, stitch_id)

    def _route_features(self, x: torch.Tensor, stitch_id: int) -> torch.Tensor:
        """``forward_features`` of a resolved route, inside the caller's BatchNorm-statistics context."""
        self.check_input(x)
        route = self.plan.routes[stitch_id]
        if route.is_anchor:
            return self.anchors[route.anchors[0]].forward_features(x)
        return self._runs[stitch_id].forward_features(x, self.final_norm_on_stitched_routes, self.checkpointing)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, stitch_id: Optional[int] = None) -> torch.Tensor:
        """Head of the last anchor of route ``stitch_id`` on features from ``forward_features`` (with the route's
        BatchNorm statistics: LeViT's heads hold BatchNorm layers)."""
        stitch_id = self.resolve_stitch_id(stitch_id)
        with route_bn_stats(self, stitch_id):
            return self.adapters[self.plan.routes[stitch_id].anchors[-1]].head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, stitch_id: Optional[Union[int, RouteIds]] = None) -> torch.Tensor:
        """Logits of route ``stitch_id`` (default: the active route), or with one route id per sample (a 1-D integer
        tensor or sequence): see :func:`timm_stitch.serving.mixed_forward`."""
        if isinstance(stitch_id, (torch.Tensor, np.ndarray)) and stitch_id.ndim == 0:
            stitch_id = stitch_id.item()  # one route, given as a 0-d tensor or array
        elif isinstance(stitch_id, (torch.Tensor, np.ndarray, list, tuple)):
            return mixed_forward(self, x, stitch_id)
        stitch_id = self.resolve_stitch_id(stitch_id)
        with route_bn_stats(self, stitch_id):  # BatchNorm in heads (LeViT) too
            return self.forward_head(self._route_features(x, stitch_id), stitch_id=stitch_id)

    # ---- timm model conventions ---------------------------------------------------------------------------------

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
                              stitch_id: Optional[int] = None, stop_early: bool = False) -> Any:
        """timm's ``forward_intermediates`` on route ``stitch_id``; see :mod:`timm_stitch.features` for indexing."""
        return route_intermediates(self, x, indices, norm, output_fmt, intermediates_only, stitch_id, stop_early)

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True, stitch_id: Optional[int] = None) -> list[int]:
        """timm's ``prune_intermediate_layers``: blocks are shared between routes, so only heads go."""
        return prune_route_intermediates(self, indices, prune_norm, prune_head, stitch_id)

    @property
    def feature_info(self) -> list[dict]:
        """timm ``feature_info`` of the active route's intermediates (channels follow the route)."""
        return route_feature_info(self, self._stitch_id)

    @property
    def num_features(self) -> int:
        """Feature width of the active route (its last anchor's)."""
        return self.adapters[self.plan.routes[self._stitch_id].anchors[-1]].num_features

    @property
    def head_hidden_size(self) -> int:
        return getattr(self.anchors[self.plan.routes[self._stitch_id].anchors[-1]], 'head_hidden_size',
                       self.num_features)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier of the active route."""
        return self.anchors[self.plan.routes[self._stitch_id].anchors[-1]].get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset every anchor's classifier (each route ends in one of them)."""
        for anchor in self.anchors:
            anchor.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self._route_cache = None
        self._weights_changed()
        self.route_bn.discard()  # new heads (LeViT's hold BatchNorm layers): the routes' statistics no longer fit
        self.route_bn.layers.clear()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Each anchor's own no-decay parameters (cls/pos tokens...), and the stitching layers' biases."""
        names = {f'anchors.{i}.{n}' for i, a in enumerate(self.anchors) for n in getattr(a, 'no_weight_decay',
                                                                                         lambda: ())()}
        names |= {f'stitch_layers.{n}' for n, _ in self.stitch_layers.named_parameters() if n.endswith('.bias')}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Each anchor's own grouping under ``anchors.{i}.``; stitching layer ``l`` groups with block ``l``."""
        groups: dict[str, list] = {}
        for i, anchor in enumerate(self.anchors):
            for name, spec in anchor.group_matcher(coarse=coarse).items():
                specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
                groups.setdefault(name, []).extend((_prefix_pattern(p, i), o) for p, o in specs)
        groups.setdefault('blocks', []).append((r'^stitch_layers\.\d+\.\d+\.(\d+)', None))
        return groups

    @property
    def checkpointing(self) -> bool:
        """Whether route units are recomputed in the backward pass now (gradient checkpointing on, grads enabled)."""
        return self.grad_checkpointing and torch.is_grad_enabled()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for anchor in self.anchors:
            anchor.set_grad_checkpointing(enable)

    # ---- least-squares init -------------------------------------------------------------------------------------

    def init_stitches(self, data: Union[torch.Tensor, Iterable], **kwargs: Any) -> None:
        """Least-squares init of every stitching layer; see :func:`timm_stitch.ls_init.init_stitches`."""
        init_stitches(self, data, **kwargs)
        self._weights_changed()

    # ---- quantization -------------------------------------------------------------------------------------------

    #: the quantization scheme of the weights (set by :func:`timm_stitch.quantize`), None for a float model
    quant_scheme: Optional[str] = None
    #: whether the stitching layers are quantized too (with ``quant_scheme``)
    quant_stitches: bool = False

    def load_pretrained(self, checkpoint_path: str, prefix: str = '') -> None:
        """timm's ``custom_load`` hook (``pretrained=True`` on an official SN-Net release): load the release file
        (converted on first load, the conversion cached beside it) or a converted safetensors file, with the
        loader :mod:`timm_stitch.models` registers (see :func:`register_release_loader`)."""
        if _RELEASE_LOADER is None:
            raise RuntimeError('no release loader is registered: import timm_stitch (it registers its releases)')
        _RELEASE_LOADER(self, checkpoint_path)

    # ---- families -----------------------------------------------------------------------------------------------

    def recalibrate_bn(
            self,
            data: Union[torch.Tensor, Iterable],
            stitch_id: Optional[int] = None,
            num_batches: Optional[int] = 10,
            **kwargs: Any,
    ) -> int:
        """Estimate route ``stitch_id``'s own BatchNorm statistics (BN families: ResNet, LeViT...) from a short
        pass over ``data``; eval-mode calls of that route then use them. See :mod:`timm_stitch.bn`."""
        return recalibrate_bn(self, data, stitch_id=stitch_id, num_batches=num_batches, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        # per-route BatchNorm statistics exist only for calibrated routes: make room for those the state dict holds
        prepare_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._weights_changed()

    # ---- hub & export -------------------------------------------------------------------------------------------

    def export_stitch(self, stitch_id: int) -> nn.Module:
        """Route ``stitch_id`` as a standalone module with only its weights; see :func:`timm_stitch.export`."""
        return export_stitch(self, stitch_id)


#: reads an official release file into a model; the release formats live above the model, which runs routes only
_RELEASE_LOADER: Optional[Callable[[StitchedNet, str], None]] = None


def register_release_loader(loader: Callable[[StitchedNet, str], None]) -> None:
    """Make ``loader(model, path)`` what :meth:`StitchedNet.load_pretrained` calls (``timm_stitch`` registers
    :func:`timm_stitch.models._release.load_release` when imported)."""
    global _RELEASE_LOADER
    _RELEASE_LOADER = loader


def _prefix_pattern(pattern: str, anchor: int) -> str:
    """Anchor a timm group regex (possibly an unparenthesised alternation) under ``anchors.{i}.``."""
    body = re.sub(r'(^|\|)\^', r'\1', pattern)
    return rf'^anchors\.{anchor}\.(?:{body})'
