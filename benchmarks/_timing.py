"""Timing helpers shared by the benchmark scripts: interleaved (side-by-side) measurement, medians and p90s."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from timm_stitch.profiling import latency_stats

__all__ = ['Stats', 'interleaved', 'time_calls', 'ratio_line', 'setup_torch']


@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds."""
    median: float
    p90: float
    runs: int

    def __str__(self) -> str:
        return f'p50 {self.median:8.3f} ms  p90 {self.p90:8.3f} ms  (n={self.runs})'


def _stats(samples_s: list[float]) -> Stats:
    stats = latency_stats([s * 1e3 for s in samples_s])
    return Stats(stats['median_ms'], stats['p90_ms'], len(samples_s))


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> Stats:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _stats(samples)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, Stats]:
    """Time several functions round-robin, so that machine noise falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: _stats(s) for name, s in samples.items()}


def ratio_line(label: str, num: Stats, den: Stats, target: float | None = None) -> str:
    ratio = num.median / den.median
    verdict = '' if target is None else ('  OK' if ratio <= target else f'  ABOVE TARGET {target}')
    return f'{label:<44} {num.median:9.3f} / {den.median:9.3f} ms = {ratio:6.3f}{verdict}'


def setup_torch(threads: int | None = None) -> None:
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
