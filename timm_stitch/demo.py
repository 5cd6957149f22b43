"""The offline main job: build a stitched network, show its routes, switch routes and classify a batch.

Run with ``python -m timm_stitch.demo [--model snnet_deit_tsb]``. Uses untrained weights (no download).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import timm
import torch

from .routes import format_route_table


def _median_ns(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return sorted(times)[len(times) // 2]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb', help='a registered snnet_* architecture')
    parser.add_argument('--routes', type=int, nargs='*', default=None, help='route ids to run (default: a spread)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model).eval()
    print(f'{args.model}: {len(model.anchors)} anchors ({", ".join(model.anchor_names)}), '
          f'{model.num_routes} routes, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in all')
    print(format_route_table(model.routes(), model.anchor_names))

    config = timm.data.resolve_data_config(model=model)
    images = torch.randn(args.batch_size, *config['input_size'])
    route_ids = args.routes if args.routes is not None else sorted({0, 1, model.num_routes // 3,
                                                                    model.num_routes - 1, len(model.anchors) - 1})
    print(f'\nclassifying a random batch of {args.batch_size} on routes {route_ids} (untrained weights):')
    with torch.no_grad():
        for stitch_id in route_ids:
            model.set_stitch(stitch_id)
            start = time.perf_counter()
            logits = model(images)
            elapsed = (time.perf_counter() - start) * 1e3
            route = model.route()
            print(f'  route {stitch_id:>3} anchors={route.anchors} cuts={route.cuts} '
                  f'params={route.params / 1e6:.2f}M  top-1 classes {logits.argmax(-1).tolist()}  {elapsed:.1f} ms')

    switch_ns = _median_ns(lambda: model.set_stitch(3), 20000)
    print(f'\nset_stitch cost: median {switch_ns / 1e3:.2f} us per call (host side, no weight copies)')


if __name__ == '__main__':
    main()
