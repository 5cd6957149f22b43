"""Serving memory, process by process: one deployment of every route against one deployment per front route.

Each deployment is measured as its own child process, the way a server replica holds it: the process imports
torch, timm and timm_stitch, loads what it serves, answers one batch-1 request per route it serves, and reports its
resident size (``VmRSS``). Three kinds of process, side by side in one run:

- the runtime: the same imports and one request to a one-layer module (what every replica costs before weights);
- one deployment serving every route: the stitched network (anchors and stitching layers once);
- one deployment per route of the card's MACs/top-1 front: that route exported (``export_stitch``) and saved by the
  parent, loaded alone by the child.

Printed: the all-route process against the runtime plus the network's weights (target: within 1.1x), and the sum of
the per-route processes against the all-route one (target: at least 3x; SuperServe reports 2.6x), with and without
each process's runtime.

    python benchmarks/bench_serve_memory.py --model fmnist
    python benchmarks/bench_serve_memory.py --model deit      # full-size DeiT-Ti/S/B structure, reported card
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_memory import tensor_bytes
from bench_slo import load_model

from timm_stitch.input_size import model_input_size

_CHILD = '''
import json, sys, warnings
sys.path.insert(0, {bench!r})
import torch, timm, timm_stitch
from bench_memory import _rss_kib
from bench_slo import load_model
kind, arg, size = {kind!r}, {arg!r}, {size!r}
torch.set_num_threads(1)
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    if kind == 'runtime':
        model, routes = torch.nn.Linear(8, 8).eval(), [None]
        size = (8,)
    elif kind == 'all':
        model = load_model(arg)
        routes = list(range(model.num_routes))
    else:
        model, routes = torch.load(arg, weights_only=False).eval(), [None]
    with torch.inference_mode():
        for k in routes:
            x = torch.randn(1, *size)
            model(x) if k is None else model(x, stitch_id=k)
print(json.dumps(dict(rss_mib=_rss_kib() / 1024)))
'''


def child_rss(kind: str, arg: str, size: tuple) -> float:
    """Resident MiB of a fresh process that loads ``kind``/``arg`` and answers one request per route it serves."""
    code = _CHILD.format(bench=str(Path(__file__).parent), kind=kind, arg=arg, size=tuple(size))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])['rss_mib']


def bench(name: str) -> dict:
    model = load_model(name)
    size = tuple(model_input_size(model))
    weights = tensor_bytes(model) / 2**20
    front = [r.id for r in model.pareto('macs', 'top1')]
    runtime = child_rss('runtime', '', size)
    shared = child_rss('all', name, size)
    per_route = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'route.pt'
        for i, k in enumerate(front):
            torch.save(model.export_stitch(k), path)
            per_route.append(child_rss('route', str(path), size))
            print(f'  route {k:>3} ({i + 1}/{len(front)}): {per_route[-1]:.1f} MiB', flush=True)
    result = dict(model=name, weights_mib=weights, runtime_mib=runtime, all_routes_mib=shared,
                  per_route_mib=sum(per_route), front_routes=len(front),
                  all_vs_weights_plus_runtime=shared / (weights + runtime), per_route_vs_all=sum(per_route) / shared,
                  above_runtime_ratio=(sum(per_route) - len(front) * runtime) / (shared - runtime))
    print(f'{name}: runtime {runtime:.1f} MiB; weights {weights:.1f} MiB; one all-route process {shared:.1f} MiB '
          f'= {result["all_vs_weights_plus_runtime"]:.3f}x (runtime + weights; target <= 1.1)')
    print(f'{name}: {len(front)} per-route processes {sum(per_route):.1f} MiB = {result["per_route_vs_all"]:.2f}x '
          f'the all-route process (target >= 3; SuperServe 2.6x); above the runtime alone '
          f'{result["above_runtime_ratio"]:.2f}x')
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', choices=('fmnist', 'deit'), nargs='+', default=['fmnist', 'deit'])
    parser.add_argument('--out', type=Path, help='write the figures as JSON here')
    args = parser.parse_args()
    results = [bench(name) for name in args.model]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
