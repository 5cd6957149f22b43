"""``timm-stitch validate --model MODEL ...``: :mod:`timm_stitch.validate` as a subcommand, with the same arguments
as ``python -m timm_stitch.validate`` and ``torchrun -m timm_stitch.validate``."""
from __future__ import annotations

import argparse

from .. import validate as script


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch validate``."""
    p = subparsers.add_parser('validate', help='top-1/top-5 of every route on a dataset (torchrun-ready)',
                              description=script.__doc__.split('\n')[0])
    script.build_parser(p)
    p.set_defaults(func=script.run)
