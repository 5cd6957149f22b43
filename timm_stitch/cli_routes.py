"""``timm-stitch routes MODEL``: the route table, sorted and filtered by budget."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .cli import add_model_args, build_model, parse_count
from .routes import format_route_table
from .selection import COST_FIELDS, QUALITY_FIELDS, select_route

SORT_KEYS = ('id', *COST_FIELDS, *QUALITY_FIELDS)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('routes', help='list the routes of a stitched architecture',
                              description='List every route with its params, MACs and (from a card) accuracy and '
                                          'latency. Budgets keep only the routes within them; --select prints '
                                          'the best one.')
    add_model_args(p)
    p.add_argument('--sort', choices=SORT_KEYS, default='id', help='sort by this column (accuracy descending)')
    p.add_argument('--max-macs', type=parse_count, help='keep routes with at most this many MACs (e.g. 5G)')
    p.add_argument('--max-params', type=parse_count, help='keep routes with at most this many params (e.g. 30M)')
    p.add_argument('--max-latency-ms', type=float, help='keep routes at most this slow (needs a card with latency)')
    p.add_argument('--min-top1', type=float, help='keep routes with at least this top-1 (needs a card)')
    p.add_argument('--pareto', action='store_true', help='keep only the MACs/top-1 Pareto-optimal routes')
    p.add_argument('--select', action='store_true', help='print only the best route within the budgets')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    bounds = dict(max_macs=args.max_macs, max_params=args.max_params, max_latency_ms=args.max_latency_ms,
                  min_top1=args.min_top1)
    if args.select:
        try:
            routes = [select_route(model.routes(), **bounds)]
        except ValueError as e:
            raise SystemExit(f'error: {e}') from None
    else:
        routes = model.pareto() if args.pareto else model.routes()
        limits = {'macs': args.max_macs, 'params': args.max_params, 'latency_ms': args.max_latency_ms}
        for field, bound in limits.items():
            if bound is not None:
                routes = [r for r in routes if getattr(r, field) is not None and getattr(r, field) <= bound]
        if args.min_top1 is not None:
            routes = [r for r in routes if r.top1 is not None and r.top1 >= args.min_top1]
    if args.sort != 'id':
        descending = args.sort in QUALITY_FIELDS
        known = [r for r in routes if getattr(r, args.sort) is not None]
        routes = sorted(known, key=lambda r: getattr(r, args.sort), reverse=descending) + [
            r for r in routes if getattr(r, args.sort) is None]
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != 'extra'} for r in routes], indent=1))
    else:
        print(format_route_table(routes, model.anchor_names))
    return 0
