"""``timm-stitch train --model MODEL ...``: :mod:`timm_stitch.train` as a subcommand, with the same arguments as
``python -m timm_stitch.train`` and ``torchrun -m timm_stitch.train``."""
from __future__ import annotations

import argparse

from .. import train as script
from ..train_args import build_parser, parse_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch train``: the same arguments as ``python -m timm_stitch.train``."""
    parent = build_parser(add_help=False)
    for action in parent._actions:  # keep only what the command line gives, so the config file can fill the rest
        action.default = argparse.SUPPRESS
    p = subparsers.add_parser('train', help='train a stitched network (torchrun-ready)', parents=[parent],
                              description=script.__doc__.split('\n')[0])
    p.set_defaults(func=run)


def run(namespace: argparse.Namespace) -> int:
    """Train with the arguments given, over the defaults of ``-c/--config`` and then the parser's."""
    given = {k: v for k, v in vars(namespace).items() if k not in ('command', 'func')}
    args = parse_args(['-c', given['config']] if given.get('config') else [])
    vars(args).update(given)
    return script.run(args)
