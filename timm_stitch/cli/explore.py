"""``timm-stitch explore --model MODEL``: the route explorer, a local web page (see :mod:`timm_stitch.explorer`)."""
from __future__ import annotations

import argparse

from ..arguments import add_shared_args, int_at_least
from ._model import add_model_args, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('explore', help='a local web page to see the routes, pick one and try it on images',
                              description='Serve the route explorer on this machine (needs timm-stitch[explore]): '
                                          'every route on a MACs or latency / top-1 scatter with the Pareto front, '
                                          'budgets that select a route as select_stitch does, and images classified '
                                          'by the selected route and another side by side. Works offline.')
    add_model_args(p)
    add_shared_args(p, ('device',), device={'default': 'cpu'})
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (default: 127.0.0.1, this machine only)')
    p.add_argument('--port', type=int_at_least(1, 65535), default=None,
                   help='port to serve on (default: 7860, or the next free one)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..explorer import explore
    model = build_model(args).to(args.device)
    explore(model, host=args.host, port=args.port)
    return 0
