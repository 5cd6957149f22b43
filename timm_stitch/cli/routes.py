"""``timm-stitch routes --model MODEL``: the route table, sorted and filtered by budget."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Sequence

from ..arguments import float_in, parse_count
from ..catalogue import RouteCatalogue
from ..errors import StaleCardError
from ..routes import Route, format_route_table
from ..selection import COST_FIELDS, QUALITY_FIELDS, filter_routes, select_route
from ._model import add_model_args, build_model

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
    p.add_argument('--max-latency-ms', type=float_in(0),
                   help='keep routes at most this slow (needs a card with latency)')
    p.add_argument('--min-top1', type=float_in(0, 100),
                   help='keep routes with at least this top-1, in percent (needs a card with accuracies)')
    p.add_argument('--pareto', action='store_true',
                   help='keep only the MACs/top-1 Pareto-optimal routes (needs a card with accuracies)')
    p.add_argument('--select', action='store_true',
                   help='print only the chosen route: the most accurate within the budgets, or with --min-top1 '
                        'alone the cheapest reaching it')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.set_defaults(func=run)


def _require_known(catalogue: RouteCatalogue, routes: Sequence[Route], field: str, option: str) -> None:
    """Refuse an option that needs ``field`` when no route knows it, rather than print an empty or unsorted table;
    say why when the card holds accuracies that are stale."""
    if field in QUALITY_FIELDS and catalogue.stale:
        raise StaleCardError(f'{option} needs route {field} values, and the route card is stale: {catalogue.stale}')
    if any(getattr(r, field) is not None for r in routes):
        return
    source = ('a card with latencies (write one with timm-stitch profile) as --card' if field == 'latency_ms'
              else 'a card with accuracies as --card, or --pretrained')
    raise ValueError(f'{option} needs route {field} values, and no route has one: pass {source}')


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    catalogue = RouteCatalogue.of(model)
    routes = catalogue.annotated()
    if args.min_top1 is not None and catalogue.stale:
        _require_known(catalogue, routes, 'top1', '--min-top1')
    if args.pareto:
        _require_known(catalogue, routes, 'top1', '--pareto')
        routes = catalogue.pareto()
    bounds = dict(max_macs=args.max_macs, max_params=args.max_params, max_latency_ms=args.max_latency_ms,
                  min_top1=args.min_top1)
    if args.select:
        routes = [select_route(routes, **bounds)]  # the floor alone: the cheapest route reaching it
    elif any(bound is not None for bound in bounds.values()):
        routes = filter_routes(routes, **bounds)  # explains why when nothing fits
    if args.sort != 'id':
        _require_known(catalogue, routes, args.sort, f'--sort {args.sort}')
        descending = args.sort in QUALITY_FIELDS
        known = [r for r in routes if getattr(r, args.sort) is not None]
        routes = sorted(known, key=lambda r: getattr(r, args.sort), reverse=descending) + [
            r for r in routes if getattr(r, args.sort) is None]
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != 'extra'} for r in routes], indent=1))
    else:
        print(format_route_table(routes, model.anchor_names))
    return 0
