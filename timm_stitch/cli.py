"""The ``timm-stitch`` command line: one subcommand per module listed in ``SUBCOMMANDS``.

Each module exposes ``add_parser(subparsers)``, which registers its subcommand and sets ``func(args) -> int``.
Errors are reported here, once for every subcommand: ``timm-stitch: error: ...`` and exit status 2 when the
user's input is at fault (a bad value, a missing file), 1 for other failures; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Optional, Sequence

import torch

from .model import StitchedNet

__all__ = [
    'main', 'build_parser', 'SUBCOMMANDS', 'USAGE_ERRORS', 'add_model_args', 'build_model', 'parse_count',
    'parse_device', 'existing_file', 'int_at_least', 'float_in',
]

PROG = 'timm-stitch'

SUBCOMMANDS = [
    'timm_stitch.cli_routes',
    'timm_stitch.cli_profile',
    'timm_stitch.cli_card',
    'timm_stitch.convert',
    'timm_stitch.train',
    'timm_stitch.validate',
]

# errors the library raises when a value it was given is wrong: reported as usage errors (exit status 2)
USAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError)

_SUFFIXES = {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}


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


# ---- argument types: bad values are refused while parsing, naming the valid range ----

def parse_count(text: str) -> float:
    """A non-negative number with an optional k/M/G/T suffix, for budgets: ``5e9``, ``5G``, ``22.5M``."""
    match = re.fullmatch(r'\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)\s*', text)
    try:
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    except (AttributeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'expected a non-negative number such as 5e9, 5G or 22.5M, got {text!r}')
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argument type: an integer ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f'expected an integer >= {low}, got {text!r}')
        return value
    return parse


def float_in(low: float, high: float = float('inf')) -> Callable[[str], float]:
    """An argument type: a number in ``[low, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float('nan')
        if not low <= value <= high:
            valid = f'>= {low:g}' if high == float('inf') else f'in [{low:g}, {high:g}]'
            raise argparse.ArgumentTypeError(f'expected a number {valid}, got {text!r}')
        return value
    return parse


def existing_file(text: str) -> str:
    """An argument type: the path of a file that exists."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f'{text!r} is a folder, not a file' if os.path.isdir(text)
                                         else f'no such file: {text!r}')
    return text


def parse_device(text: str) -> str:
    """An argument type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f'invalid device {text!r}: expected cpu, cuda, cuda:N or mps') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            build = f'torch {torch.__version__}' + ('' if torch.version.cuda else ', built without CUDA')
            raise argparse.ArgumentTypeError(f'device {text!r}: CUDA is not available on this machine ({build}); '
                                             'use --device cpu')
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f'device {text!r}: this machine has cuda:0..cuda:{count - 1}')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'device {text!r}: MPS is not available on this machine; use --device cpu')
    return text


def stitched_model_name(text: str) -> str:
    """An argument type: a registered stitched architecture, or a ``hf-hub:``/``local-dir:`` model timm resolves."""
    import timm
    if ':' in text or timm.is_model(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: expected a registered stitched architecture, one of "
                                     f"{', '.join(timm.list_models('snnet*'))}")


# ---- shared by the subcommands ----

def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every subcommand uses to build a model: name, weights, card."""
    parser.add_argument('model', type=stitched_model_name,
                        help='a registered snnet_* architecture, e.g. snnet_deit_tsb')
    parser.add_argument('--pretrained', action='store_true', help="load the architecture's pretrained weights")
    parser.add_argument('--checkpoint', type=existing_file, default=None,
                        help='a checkpoint file to load into the model')
    parser.add_argument('--card', type=existing_file, default=None,
                        help='a routes.json card (or official JSON-lines results) with accuracy and latency')
    parser.add_argument('--official-final-norm', action='store_true',
                        help='skip the final norm on stitched routes, as the official SN-Net DeiT code does')


def build_model(args: argparse.Namespace) -> StitchedNet:
    """Build ``args.model`` through timm (untrained unless ``--pretrained``/``--checkpoint``) and load its card."""
    import timm

    kwargs = {'final_norm_on_stitched_routes': False} if args.official_final_norm else {}
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if not isinstance(model, StitchedNet):
        raise ValueError(f'{args.model} is not a stitched network (expected an snnet_* architecture)')
    if args.checkpoint:
        timm.models.load_checkpoint(model, args.checkpoint)
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
