"""The ``timm-stitch`` command line: one subcommand per module listed in ``SUBCOMMANDS``.

Each module exposes ``add_parser(subparsers)``, which registers its subcommand and sets ``func(args) -> int``.
Errors are reported here, once for every subcommand: ``timm-stitch: error: ...`` and exit status 2 when the
user's input is at fault (a bad value, a missing file), 1 for other failures; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import NoReturn, Optional, Sequence

from ._io import ForeignFilesError
from .arguments import (
    add_shared_args,
    existing_file,
    float_in,
    int_at_least,
    parse_count,
    parse_device,
    stitched_model_name,
)
from .model import StitchedNet

__all__ = [
    'main', 'build_parser', 'SUBCOMMANDS', 'USAGE_ERRORS', 'add_model_args', 'build_model', 'parse_count',
    'parse_device', 'existing_file', 'int_at_least', 'float_in', 'add_shared_args',
]

PROG = 'timm-stitch'

SUBCOMMANDS = [
    'timm_stitch.cli_routes',
    'timm_stitch.cli_profile',
    'timm_stitch.cli_card',
    'timm_stitch.cli_serve',
    'timm_stitch.convert',
    'timm_stitch.train',
    'timm_stitch.validate',
    'timm_stitch.cli_explore',
]

# errors the library raises when a value it was given is wrong (a target holding a user's files included): reported
# as usage errors (exit status 2)
USAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ForeignFilesError)


class _HelpFormatter(argparse.HelpFormatter):
    """Help text with docstring markup (``literal``) shown as plain text."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace('``', ''))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace('``', '')


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors read ``timm-stitch: error: ...``, whichever subcommand they come from."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f'{PROG}: error: {message}\n')


# ---- shared by the subcommands ----

def add_model_args(parser: argparse.ArgumentParser, model_option: bool = False) -> None:
    """The arguments every subcommand uses to build a model: name, weights, card. With ``model_option`` the name
    may also come as ``--model`` (``-m``), as ``timm-stitch validate`` takes it."""
    help = 'a registered snnet_* architecture, e.g. snnet_deit_tsb'
    parser.add_argument('model', type=stitched_model_name, help=help,
                        **({'nargs': '?', 'metavar': 'MODEL'} if model_option else {}))
    if model_option:
        parser.add_argument('--model', '-m', dest='model_option', type=stitched_model_name, default=None,
                            metavar='MODEL', help='the architecture, as the positional MODEL')
    add_shared_args(parser, ('pretrained', 'checkpoint', 'route_space'))
    parser.add_argument('--card', type=existing_file, default=None,
                        help='a routes.json card (or official JSON-lines results) with accuracy and latency')
    parser.add_argument('--official-final-norm', action='store_true',
                        help='skip the final norm on stitched routes, as the official SN-Net DeiT code does')


def build_model(args: argparse.Namespace) -> StitchedNet:
    """Build ``args.model`` through timm (untrained unless ``--pretrained``/``--checkpoint``) and load its card."""
    import timm

    option = getattr(args, 'model_option', None)
    if option is not None and args.model is not None and option != args.model:
        raise ValueError(f'two models given: {args.model} and --model {option}')
    args.model = args.model or option
    if args.model is None:
        raise ValueError('no model given: pass MODEL or --model MODEL, e.g. snnet_vit_fmnist_tsb')
    kwargs = {'final_norm_on_stitched_routes': False} if args.official_final_norm else {}
    if args.route_space is not None:
        kwargs['route_space'] = args.route_space
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if not isinstance(model, StitchedNet):
        raise ValueError(f'{args.model} is not a stitched network (expected an snnet_* architecture)')
    if args.checkpoint:
        from .evaluation import load_weights
        load_weights(model, args.checkpoint)
    if args.card:
        model.load_card(args.card)
    return model.eval()


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-stitch`` parser with every subcommand of ``SUBCOMMANDS`` (each with ``--debug``)."""
    parser = _Parser(prog=PROG, description='Stitchable neural networks for timm.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for path in SUBCOMMANDS:
        importlib.import_module(path).add_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.add_argument('--debug', action='store_true', help='show the Python traceback of an error')
    return parser


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]  # str(KeyError) would add quotes
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f'{error.strerror.lower()}: {error.filename!r}'  # not Python's '[Errno 2] ...' form
    return str(error) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f'{PROG}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f'{PROG}: error: {_message(e)}', file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1


if __name__ == '__main__':
    raise SystemExit(main())
