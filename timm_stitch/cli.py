"""The ``timm-stitch`` command line: one subcommand per module listed in ``SUBCOMMANDS``.

Each module exposes ``add_parser(subparsers)``, which registers its subcommand and sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import re
from typing import Optional, Sequence

from .model import StitchedNet

__all__ = ['main', 'SUBCOMMANDS', 'add_model_args', 'build_model', 'parse_count']

SUBCOMMANDS = [
    'timm_stitch.cli_routes',
    'timm_stitch.cli_profile',
    'timm_stitch.cli_card',
    'timm_stitch.convert',
    'timm_stitch.train',
    'timm_stitch.validate',
]

_SUFFIXES = {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}


def parse_count(text: str) -> float:
    """A number with an optional k/M/G/T suffix, for budgets on the command line: ``5e9``, ``5G``, ``22.5M``."""
    match = re.fullmatch(r'\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)\s*', text)
    try:
        return float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    except (AttributeError, ValueError):
        raise argparse.ArgumentTypeError(f'expected a number such as 5e9, 5G or 22.5M, got {text!r}') from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every subcommand uses to build a model: name, weights, card."""
    parser.add_argument('model', help='a registered snnet_* architecture, e.g. snnet_deit_tsb')
    parser.add_argument('--pretrained', action='store_true', help="load the architecture's pretrained weights")
    parser.add_argument('--checkpoint', default=None, help='a checkpoint file to load into the model')
    parser.add_argument('--card', default=None,
                        help='a routes.json card (or official JSON-lines results) with accuracy and latency')
    parser.add_argument('--official-final-norm', action='store_true',
                        help='skip the final norm on stitched routes, as the official SN-Net DeiT code does')


def build_model(args: argparse.Namespace) -> StitchedNet:
    """Build ``args.model`` through timm (untrained unless ``--pretrained``/``--checkpoint``) and load its card."""
    import timm

    import timm_stitch  # noqa: F401  (registers the architectures)
    kwargs = {'final_norm_on_stitched_routes': False} if args.official_final_norm else {}
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if not isinstance(model, StitchedNet):
        raise SystemExit(f'{args.model} is not a stitched network (expected an snnet_* architecture)')
    if args.checkpoint:
        timm.models.load_checkpoint(model, args.checkpoint)
    if args.card:
        model.load_card(args.card)
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='timm-stitch', description='Stitchable neural networks for timm.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for path in SUBCOMMANDS:
        importlib.import_module(path).add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == '__main__':
    raise SystemExit(main())
