"""``timm-stitch profile --model MODEL``: measure every route's latency on a device and write a route card."""
from __future__ import annotations

import argparse

import torch

from ..arguments import add_routes_arg, add_shared_args, float_in, int_at_least, route_text
from ..evaluation import model_route_ids
from ..profiling import MAX_SPREAD, profile
from ..quantization import SCHEMES, quantize
from ..routes import format_route_table
from ._model import add_model_args, build_model

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('profile', help='measure route latencies on a device and write a card',
                              description='Time every route (warm-up, then repeated calls; median and p90) on '
                                          'random images and write the latencies into a routes.json card. The '
                                          'card given with --card (its accuracies, other devices\' latencies) is '
                                          'kept and the new latencies added to it.')
    add_model_args(p)
    add_shared_args(p, ('device',), device={'default': 'cpu'})
    p.add_argument('--batch-size', type=int_at_least(1), default=1, help='images per timed call (default: 1)')
    p.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                   help='weights and input dtype (default: float32)')
    p.add_argument('--quantize', choices=tuple(SCHEMES), default=None,
                   help='time the network quantized once with this scheme (see timm_stitch.quantize); the latencies '
                        'go under a profile named after it')
    p.add_argument('--warmup', type=int_at_least(0), default=2, help='untimed calls per route (default: 2)')
    p.add_argument('--repeats', type=int_at_least(1), default=10, help='timed calls per route (default: 10)')
    add_routes_arg(p, None, 'routes to time')
    p.add_argument('--max-spread', type=float_in(0), default=MAX_SPREAD,
                   help='largest relative interquartile range of a route\'s timings accepted; a route above it is '
                        'timed again, and left out of the card with a warning if it stays above '
                        f'(default: {MAX_SPREAD})')
    p.add_argument('--retries', type=int_at_least(0), default=2,
                   help='times an unstable route is timed again (default: 2)')
    p.add_argument('--out', default='routes.json', help='where to write the card (default: routes.json)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    route_ids = None if args.routes is None else model_route_ids(route_text(args.routes), model)
    if args.quantize:
        quantize(model, args.quantize, inplace=True)
    profile(model, device=args.device, batch_size=args.batch_size, dtype=DTYPES[args.dtype], warmup=args.warmup,
            repeats=args.repeats, routes=route_ids, out=args.out, max_spread=args.max_spread, retries=args.retries)
    routes = model.routes()
    if route_ids is not None:
        routes = [routes[i] for i in route_ids]
    print(format_route_table(routes, model.anchor_names))
    print(f'wrote {args.out}')
    return 0
