"""The one route runner: embed -> units -> stitch -> ... -> finish, for every caller that runs a stitched route.

The plain forward, mixed-route batches and shared prefixes (:mod:`timm_stitch.serving`), cascades,
``forward_intermediates`` (:mod:`timm_stitch.features`) and exported routes (:mod:`timm_stitch.export`) all run
routes through :class:`RouteRun`. Its hooks: ``start`` resumes from the activation after that many units (a shared
prefix, a cascade stage), ``stop`` ends after that many units (``stop_early``, a shared prefix), ``collect`` sees the
activation after every unit (intermediates, kept prefixes), and ``checkpointing`` recomputes each unit in the
backward pass, as timm's ``checkpoint_seq`` does for its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from timm.models import checkpoint
from torch import nn

from .adapters import AnchorAdapter
from .routes import Route, StitchRef

__all__ = ['RouteRun', 'RouteSegment', 'Collect', 'route_spans', 'route_segments', 'run_unit']

#: ``collect(step, activation)``: called with the activation after ``step`` units (-1: the stem, inside the embedding)
Collect = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class RouteSegment:
    """Part of a stitched route: units of one anchor, then the stitching layer into the next (if any)."""
    units: tuple[nn.Module, ...]
    stitch: Optional[nn.Module]


def route_spans(route: Route, adapters: Sequence[AnchorAdapter]) -> list[tuple[int, int, int]]:
    """``(anchor, start, stop)`` per anchor of ``route``: it runs that anchor's ``units[start:stop]``."""
    spans, start = [], 0
    for i, anchor in enumerate(route.anchors):
        adapter = adapters[anchor]
        if i < len(route.cuts):
            (front, end), ref = route.cuts[i], route.stitches[i]
            spans.append((anchor, start, adapter.unit_index(ref.stage, front) + 1))
            start = adapters[route.anchors[i + 1]].unit_index(ref.resume_stage, end)
        else:
            spans.append((anchor, start, len(adapter.units)))
    return spans


def route_segments(route: Route, adapters: Sequence[AnchorAdapter],
                   stitch_layer: Callable[[StitchRef], nn.Module]) -> Optional[tuple[RouteSegment, ...]]:
    """The segments ``route`` runs between its embedding and its finish (None for an anchor route)."""
    if route.is_anchor:
        return None
    spans = route_spans(route, adapters)
    return tuple(RouteSegment(adapters[anchor].units[start:stop], stitch_layer(route.stitches[i]) if
                              i < len(route.stitches) else None) for i, (anchor, start, stop) in enumerate(spans))


def run_unit(unit: nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """One unit of a route (recomputed in the backward pass with ``checkpointing``)."""
    return checkpoint(unit, x) if checkpointing else unit(x)


class RouteRun:
    """How one stitched route runs: the first anchor's embedding, its segments, the last anchor's finish.

    Args:
        adapters: The adapter of each segment's anchor, in route order.
        segments: The route's segments.
    """

    def __init__(self, adapters: Sequence[AnchorAdapter], segments: Sequence[RouteSegment]):
        if len(adapters) != len(segments):
            raise ValueError(f'got {len(adapters)} adapters for {len(segments)} segments: give one per segment')
        self.adapters, self.segments = tuple(adapters), tuple(segments)

    @property
    def num_units(self) -> int:
        return sum(len(s.units) for s in self.segments)

    def embed(self, x: torch.Tensor, collect: Optional[Collect] = None) -> torch.Tensor:
        """The first anchor's embedding of images ``x`` (its stem intermediate goes to ``collect`` as step -1)."""
        if collect is None:
            return self.adapters[0].embed(x)
        x, stem = self.adapters[0].embed_intermediate(x)
        if stem is not None:
            collect(-1, stem)
        return x

    def run(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None, collect: Optional[Collect] = None,
            checkpointing: bool = False) -> torch.Tensor:
        """The activation after the route's units from ``x``, the activation after its first ``start`` units (taken
        before the stitching layer that may follow them). With ``stop``, the run ends after ``stop`` units, before
        any stitching layer after them. ``collect(step, x)`` sees the activation after ``start`` units, then after
        each unit run (before a stitching layer)."""
        if collect is not None:
            collect(start, x)
        step = 0
        for segment in self.segments:
            for unit in segment.units:
                step += 1
                if start < step and (stop is None or step <= stop):
                    x = run_unit(unit, x, checkpointing)
                    if collect is not None:
                        collect(step, x)
            if stop is not None and step >= stop:
                break
            if segment.stitch is not None and step >= start:
                x = segment.stitch(x)
        return x

    def finish(self, x: torch.Tensor, final_norm: bool, stop: Optional[int] = None) -> torch.Tensor:
        """``forward_features`` output from the activation after ``stop`` units (default: all): the finish of the
        anchor whose units ran last (with its final norm if ``final_norm``)."""
        return self.adapter_at(stop).finish(x, final_norm)

    def adapter_at(self, stop: Optional[int] = None) -> AnchorAdapter:
        """The adapter of the anchor whose units produce the activation after ``stop`` units (default: all)."""
        if stop is None:
            return self.adapters[-1]
        step = 0
        for adapter, segment in zip(self.adapters, self.segments):
            step += len(segment.units)
            if stop <= step:
                return adapter
        return self.adapters[-1]

    def forward_features(self, x: torch.Tensor, final_norm: bool, checkpointing: bool = False) -> torch.Tensor:
        """``forward_features`` of the route on images ``x``."""
        return self.finish(self.run(self.embed(x), checkpointing=checkpointing), final_norm)
