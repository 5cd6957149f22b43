"""Benchmark: serving a mixed-route stream with one stitched model.

For a uniform and a skewed mix of routes, at each batch size, times round-robin in the same run:
``mixed`` = ``model(x, stitch_id=ids)`` on the whole batch; each route's group alone (``model(x[g], stitch_id=k)``;
their sum is the ideal); and the same groups on separately exported routes (``export_stitch(k)``). Targets:
mixed / ideal throughput >= 0.95. Memory: the stitched model's parameter and buffer bytes against those of the
exported routes (measured for the routes served, and from the routes' parameter counts for every route).

Full-size DeiT on a 2-core CPU is slow: by default a subset of routes (``--routes``) and a few repeats.
"""
from __future__ import annotations

import argparse
import json

import timm
import torch
from _timing import interleaved, setup_torch
from bench_memory import tensor_bytes

import timm_stitch  # noqa: F401
from timm_stitch.serving import group_by_route

MIXES = ('uniform', 'skewed')


def draw_ids(routes: list[int], batch_size: int, mix: str, seed: int = 0) -> torch.Tensor:
    """Route ids of one batch: uniform over ``routes``, or skewed (weights 1/2, 1/4, ... to the routes in order)."""
    weights = torch.ones(len(routes)) if mix == 'uniform' else 0.5 ** torch.arange(1, len(routes) + 1.0)
    picks = torch.multinomial(weights, batch_size, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(routes)[picks]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--routes', type=int, nargs='+', default=[0, 3, 10, 1],
                        help='the routes served (default: Ti, two Ti->S routes, S)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64])
    parser.add_argument('--mixes', nargs='+', default=list(MIXES), choices=MIXES)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--json', default=None, help='also write the figures to this file')
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    model = timm.create_model(args.model).eval()
    size = timm.data.resolve_data_config(model=model)['input_size']
    exports = {k: model.export_stitch(k).eval() for k in args.routes}
    figures: dict = {'routes': args.routes, 'threads': torch.get_num_threads(), 'runs': []}
    print(f'== mixed-route serving: {args.model}, routes {args.routes}, {torch.get_num_threads()} threads ==')
    with torch.no_grad():
        for mix in args.mixes:
            for bs in args.batch_sizes:
                x = torch.randn(bs, *size)
                ids = draw_ids(args.routes, bs, mix)
                groups = group_by_route(ids)
                parts = [(k, x[pos]) for k, pos in groups]
                fns = {'mixed': lambda x=x, ids=ids: model(x, stitch_id=ids)}
                for k, xg in parts:
                    fns[f'group {k}'] = lambda xg=xg, k=k: model(xg, stitch_id=k)
                fns['exports'] = lambda parts=parts: [exports[k](xg) for k, xg in parts]
                stats = interleaved(fns, args.repeats, args.warmup)
                ideal = sum(stats[f'group {k}'].median for k, _ in groups)
                run = {'mix': mix, 'batch_size': bs, 'group_sizes': {k: len(p) for k, p in groups},
                       'mixed_ms': stats['mixed'].median, 'ideal_ms': ideal, 'exports_ms': stats['exports'].median,
                       'mixed_over_ideal': ideal / stats['mixed'].median,
                       'mixed_over_exports': stats['exports'].median / stats['mixed'].median}
                figures['runs'].append(run)
                print(f"{mix:>8} bs {bs:3d}: mixed {run['mixed_ms']:9.1f} ms  ideal {ideal:9.1f} ms  exports "
                      f"{run['exports_ms']:9.1f} ms  throughput mixed/ideal {run['mixed_over_ideal']:.3f}"
                      f"{'  OK' if run['mixed_over_ideal'] >= 0.95 else '  BELOW TARGET 0.95'}  mixed/exports "
                      f"{run['mixed_over_exports']:.3f}  groups {run['group_sizes']}", flush=True)
    model_bytes = tensor_bytes(model)
    served = sum(tensor_bytes(m) for m in exports.values())
    bytes_per_param = model_bytes / sum(p.numel() for p in model.parameters())
    every = sum(r.params for r in model.counted_routes()) * bytes_per_param
    figures['memory'] = {'stitched_model_mb': model_bytes / 2**20, 'served_exports_mb': served / 2**20,
                         'all_route_exports_mb': every / 2**20}
    print(f'memory: one stitched model {model_bytes / 2**20:.1f} MiB; the {len(exports)} served routes exported '
          f'{served / 2**20:.1f} MiB; all {model.num_routes} routes exported ~{every / 2**20:.1f} MiB '
          '(from their parameter counts)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=1)


if __name__ == '__main__':
    main()
