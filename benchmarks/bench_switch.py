"""Benchmark 1: the cost of switching routes.

Latency of one route when every call runs it (fixed) against when calls alternate with another route, through
``set_stitch`` and through the per-call ``stitch_id`` (with a control that runs the other route's blocks as a
separate module, to tell CPU cache eviction from any cost of switching); and the host-side cost of
``set_stitch`` itself (time per call, Python allocations, tensor allocations, weight storage untouched).
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from functools import partial

import timm
import torch
from _timing import Stats, _stats, setup_torch

import timm_stitch  # noqa: F401


def fixed_vs_alternating(model, x, route: int, other: int, per_call: bool, repeats: int) -> tuple[Stats, ...]:
    """Latency of ``route`` right after itself (fixed), right after route ``other`` of the same model
    (alternating), and right after a separate module holding route ``other``'s blocks (control: the same cache
    eviction with no route switch), interleaved."""
    standalone_other = model.export_stitch(other).eval()

    def run(k: int):
        if per_call:
            return model(x, stitch_id=k)
        model.set_stitch(k)
        return model(x)

    def timed(k: int) -> float:
        start = time.perf_counter()
        run(k)
        return time.perf_counter() - start

    samples: tuple[list[float], ...] = ([], [], [])
    for i in range(repeats + 2):
        for series, before in zip(samples, (partial(run, route), partial(run, other), partial(standalone_other, x))):
            before()
            sample = timed(route)
            if i >= 2:
                series.append(sample)
    return tuple(_stats(series) for series in samples)


def host_switch_cost(model, calls: int = 200_000) -> dict[str, float]:
    ids = [3, 56] * (calls // 2)
    start = time.perf_counter_ns()
    for k in ids:
        model.set_stitch(k)
    ns = (time.perf_counter_ns() - start) / calls
    ptrs = [p.data_ptr() for p in model.parameters()]
    tracemalloc.start()
    snapshot_before = tracemalloc.take_snapshot()
    for k in ids[:10_000]:
        model.set_stitch(k)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snapshot_before, 'filename')
                if s.traceback[0].filename.endswith('model.py'))
    tracemalloc.stop()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for k in ids[:1000]:
            model.set_stitch(k)
    tensor_events = len(prof.events())
    unchanged = ptrs == [p.data_ptr() for p in model.parameters()]
    return dict(ns_per_call=ns, python_bytes_allocated=grown, torch_ops=tensor_events, weights_untouched=unchanged)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--route', type=int, default=24)
    parser.add_argument('--other', type=int, default=56)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args(argv)
    setup_torch()
    model = timm.create_model(args.model).eval()
    size = timm.data.resolve_data_config(model=model)['input_size']
    print(f'== switching cost: {args.model}, route {args.route} (alternating with {args.other}) ==')
    with torch.no_grad():
        for bs in args.batch_sizes:
            x = torch.randn(bs, *size)
            repeats = args.repeats if bs == 1 else max(5, args.repeats // 6)
            for per_call in (False, True):
                how = 'stitch_id=' if per_call else 'set_stitch'
                fixed, alternating, control = fixed_vs_alternating(model, x, args.route, args.other, per_call,
                                                                   repeats)
                print(f'bs{bs:<3} {how:<10} fixed       {fixed}')
                for label, stats in (('alternating', alternating), ('control    ', control)):
                    print(f'bs{bs:<3} {how:<10} {label} {stats}   p50 ratio {stats.median / fixed.median:.3f}, '
                          f'p90 ratio {stats.p90 / fixed.p90:.3f}')
    cost = host_switch_cost(model)
    print(f"set_stitch host cost: {cost['ns_per_call'] / 1e3:.3f} us/call; Python bytes retained by model.py: "
          f"{cost['python_bytes_allocated']}; torch ops recorded: {cost['torch_ops']}; "
          f"weights untouched: {cost['weights_untouched']}")


if __name__ == '__main__':
    main()
