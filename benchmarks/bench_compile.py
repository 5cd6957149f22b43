"""Benchmark 4: ``timm_stitch.compile`` (one graph per route) against eager, per route, and switching under it."""
from __future__ import annotations

import argparse
import time
from functools import partial

import timm
import torch
from _timing import interleaved, ratio_line, setup_torch

import timm_stitch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--routes', type=int, nargs='+', default=[0, 24, 56])
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args(argv)
    setup_torch()
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, *timm.data.resolve_data_config(model=model)['input_size'])
    compiled = timm_stitch.compile(model)
    print(f'== torch.compile per route: {args.model}, bs{args.batch_size}, routes {args.routes} ==')
    with torch.no_grad():
        for k in args.routes:
            start = time.perf_counter()
            compiled(x, stitch_id=k)
            first = time.perf_counter() - start
            stats = interleaved({'compiled': partial(compiled, x, stitch_id=k),
                                 'eager': partial(model, x, stitch_id=k)}, args.repeats)
            print(ratio_line(f'route {k} compiled / eager (compile {first:.1f} s)', stats['compiled'], stats['eager']))
        # switching between compiled routes must not recompile: time a pass over all of them again
        recompiles_before = torch._dynamo.utils.counters['stats']['unique_graphs']
        for k in args.routes * 3:
            compiled(x, stitch_id=k)
        after = torch._dynamo.utils.counters['stats']['unique_graphs']
    print(f'graphs compiled: {after} for {len(args.routes)} routes; new graphs while switching: '
          f'{after - recompiles_before}')


if __name__ == '__main__':
    main()
