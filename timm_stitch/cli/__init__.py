"""The ``timm-stitch`` command line: one subcommand per module of this package, listed in ``SUBCOMMANDS``.

Each module exposes ``add_parser(subparsers)``, which registers its subcommand and sets ``func(args) -> int``.
Every command names its model with ``--model`` (``-m``; ``routes``, ``profile``, ``card``, ``serve``, ``explore``
and ``export`` also take it positionally), a route list with ``--routes``, its output with ``--out`` and extra
model arguments with ``--model-kwargs`` (see :mod:`timm_stitch.cli._model`). Errors are reported here, once for
every subcommand: ``timm-stitch: error: ...`` and exit status 2 when the user's input is at fault (a bad value, a
missing file), 1 for other failures; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn, Optional, Sequence

from .._io import ForeignFilesError

__all__ = ['main', 'build_parser', 'SUBCOMMANDS', 'USAGE_ERRORS', 'PROG', 'package_version']

PROG = 'timm-stitch'

SUBCOMMANDS = [
    'timm_stitch.cli.routes',
    'timm_stitch.cli.profile',
    'timm_stitch.cli.card',
    'timm_stitch.cli.export',
    'timm_stitch.cli.serve',
    'timm_stitch.cli.convert',
    'timm_stitch.cli.train',
    'timm_stitch.cli.validate',
    'timm_stitch.cli.explore',
]

# errors the library raises when a value it was given is wrong (a target holding a user's files included): reported
# as usage errors (exit status 2)
USAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ForeignFilesError)


class HelpFormatter(argparse.HelpFormatter):
    """Help text with docstring markup (``literal``) shown as plain text."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace('``', ''))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace('``', '')


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors read ``timm-stitch: error: ...``, whichever subcommand they come from."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f'{PROG}: error: {message}\n')


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the source tree's ``__version__``."""
    try:
        return version('timm-stitch')
    except PackageNotFoundError:
        from .. import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-stitch`` parser with every subcommand of ``SUBCOMMANDS`` (each with ``--debug``)."""
    parser = Parser(prog=PROG, description='Stitchable neural networks for timm.')
    parser.add_argument('--version', action='version', version=f'{PROG} {package_version()}')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND', parser_class=Parser)
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
    """Run ``timm-stitch`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
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
