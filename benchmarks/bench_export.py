"""Benchmark 2: each route's latency in the stitched model divided by the latency of ``export_stitch(k)`` (the
same blocks as a plain module). Targets: <= 1.05 at batch 1 for every route, <= 1.03 at batch 32.

Batch 32 on a 2-core CPU costs seconds per call for the larger routes, so by default batch 32 covers every
``--bs32-every``-th route (all routes with ``--bs32-every 1``).
"""
from __future__ import annotations

import argparse
import statistics
from functools import partial

import timm
import torch
from _timing import interleaved, ratio_line, setup_torch

import timm_stitch  # noqa: F401


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--bs32-repeats', type=int, default=5)
    parser.add_argument('--bs32-every', type=int, default=10)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32], choices=[1, 32])
    parser.add_argument('--warmup', type=int, default=2)
    args = parser.parse_args(argv)
    setup_torch()
    model = timm.create_model(args.model).eval()
    size = timm.data.resolve_data_config(model=model)['input_size']
    print(f'== stitched route vs exported route: {args.model} ==')
    for bs, repeats, routes, target in (
            (1, args.repeats, range(model.num_routes), 1.05),
            (32, args.bs32_repeats, range(0, model.num_routes, args.bs32_every), 1.03)):
        if bs not in args.batch_sizes:
            continue
        x = torch.randn(bs, *size)
        ratios = []
        with torch.no_grad():
            for k in routes:
                exported = model.export_stitch(k).eval()
                stats = interleaved({'route': partial(model, x, stitch_id=k), 'export': partial(exported, x)}, repeats,
                                    args.warmup)
                ratios.append(stats['route'].median / stats['export'].median)
                print(ratio_line(f'bs{bs} route {k:>3} / export_stitch({k})', stats['route'], stats['export'], target))
        print(f'bs{bs}: {len(ratios)} routes, ratio median {statistics.median(ratios):.3f}, max {max(ratios):.3f}, '
              f'{sum(r <= target for r in ratios)}/{len(ratios)} within {target}')


if __name__ == '__main__':
    main()
