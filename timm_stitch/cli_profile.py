"""``timm-stitch profile MODEL``: measure every route's latency on a device and write a route card."""
from __future__ import annotations

import argparse

import torch

from .cli import add_model_args, build_model
from .profile import profile
from .routes import format_route_table

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('profile', help='measure route latencies on a device and write a card',
                              description='Time every route (warm-up, then repeated calls; median and p90) on '
                                          'random images and write the latencies into a routes.json card '
                                          '(merged into --card when given).')
    add_model_args(p)
    p.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda:0')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per route')
    p.add_argument('--repeats', type=int, default=10, help='timed calls per route')
    p.add_argument('--routes', type=int, nargs='+', default=None, help='route ids to time (default: all)')
    p.add_argument('--out', default='routes.json', help='where to write the card')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    profile(model, device=args.device, batch_size=args.batch_size, dtype=DTYPES[args.dtype], warmup=args.warmup,
            repeats=args.repeats, routes=args.routes, out=args.out)
    routes = model.routes()
    if args.routes is not None:
        routes = [routes[i] for i in args.routes]
    print(format_route_table(routes, model.anchor_names))
    print(f'wrote {args.out}')
    return 0
