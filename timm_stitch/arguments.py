"""Command-line arguments shared by every entry point (``timm-stitch`` subcommands, ``python -m timm_stitch.train``
and ``python -m timm_stitch.validate``): argument types that refuse a bad value while parsing, naming the valid range,
and the model and data options, defined once so they read and check the same everywhere."""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Callable, Iterable, Optional

import torch

from .route_spaces import ROUTE_SPACES

__all__ = [
    'parse_count', 'int_at_least', 'float_in', 'existing_file', 'parse_device', 'stitched_model_name',
    'default_workers', 'add_shared_args', 'route_token', 'route_text', 'add_routes_arg',
    'MODEL_OPTIONS', 'DATA_OPTIONS', 'RUNTIME_OPTIONS',
]

_ROUTE_TOKEN = re.compile(r'(all|anchors|none|\d+(-\d+)?)(,(all|anchors|none|\d+(-\d+)?))*,?')
_SUFFIXES = {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12}


def default_workers() -> int:
    """Data loading workers by default: 4, or fewer on a machine with fewer usable CPUs (more workers than CPUs
    make torch's DataLoader warn and only compete for the cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


# ---- argument types ----

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


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argument type: an integer ``>= low`` (and ``<= high`` when given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            valid = f'>= {low}' if high is None else f'in [{low}, {high}]'
            raise argparse.ArgumentTypeError(f'expected an integer {valid}, got {text!r}')
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


def route_token(text: str) -> str:
    """An argument type: route ids in the one route-list syntax (``all``, ``anchors``, ``3``, ``5-9`` and comma
    lists of them), checked against the model later, when it is built."""
    if not _ROUTE_TOKEN.fullmatch(text.replace(' ', '')):
        raise argparse.ArgumentTypeError(f"expected route ids such as 'all', 'anchors' or '0,3,5-9', got {text!r}")
    return text


def route_text(value: object) -> str:
    """The route list of an option given as one string or as several tokens, as one comma list."""
    return value if isinstance(value, str) else ','.join(value)


def add_routes_arg(parser: Any, default: Optional[str], what: str, *aliases: str) -> None:
    """``--routes`` (and ``aliases``, older spellings kept working): route ids in the one route-list syntax."""
    older = f"; {', '.join(aliases)}: the older spelling" if aliases else ''
    parser.add_argument('--routes', *aliases, dest='routes', type=route_token, nargs='+', default=default,
                        metavar='IDS', help=f"{what}: ids such as '0,3,5-9' (or 0 3 5-9), 'all' or 'anchors' "
                                        f"(default: {default or 'all'}{older})")


# ---- the model and data options ----

_COUNT, _POSITIVE, _FRACTION = int_at_least(0), int_at_least(1), float_in(0.01, 1.0)  # one object per check


def _shared_options() -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """Every shared option: its flags and ``add_argument`` keywords, by destination name."""
    from timm.utils import ParseKwargs
    return {
        'data_dir': (('--data-dir',), dict(default=None,
                                           help='dataset root (an ImageFolder, or what --dataset expects)')),
        'dataset': (('--dataset',), dict(default='', help='timm dataset type/name (default: folder)')),
        'dataset_download': (('--dataset-download',), dict(action='store_true',
                                                           help='allow download of the dataset (torch/ types)')),
        'class_map': (('--class-map',), dict(default='', help='path to a class to index mapping file')),
        'input_img_mode': (('--input-img-mode',), dict(
            default=None, help="Pillow mode to read images in (default: the model's, L for 1 channel, RGB for 3)")),
        'model': (('--model', '-m'), dict(default=None, help='snnet_* architecture, or snnet with --anchors')),
        'anchors': (('--anchors',), dict(default=None, help='comma-separated timm anchor names for --model snnet')),
        'route_space': (('--route-space',), dict(
            default=None, choices=ROUTE_SPACES,
            help="routes of the stitched network: 'one_way' (small to large anchors) or 'two_way' (SN-Netv2: two "
                 "plain token anchors stitched both ways) (default: the architecture's)")),
        'model_kwargs': (('--model-kwargs',), dict(nargs='*', default={}, action=ParseKwargs,
                                                   help='extra create_model kwargs')),
        'pretrained': (('--pretrained',), dict(action='store_true',
                                               help="load the architecture's pretrained stitched weights")),
        'checkpoint': (('--checkpoint',), dict(type=existing_file, default=None,
                                               help='weights to load into the model (.safetensors or .pth)')),
        'num_classes': (('--num-classes',), dict(type=_POSITIVE, default=None,
                                                 help="number of classes (default: the model's)")),
        'img_size': (('--img-size',), dict(type=_POSITIVE, default=None,
                                           help="input image size (default: the model's)")),
        'crop_pct': (('--crop-pct',), dict(type=_FRACTION, default=None,
                                           help="evaluation center crop fraction (default: the model's)")),
        'mean': (('--mean',), dict(type=float, nargs='+', default=None, help="pixel mean (default: the model's)")),
        'std': (('--std',), dict(type=float, nargs='+', default=None, help="pixel std (default: the model's)")),
        'interpolation': (('--interpolation',), dict(
            default='', help="evaluation resize interpolation (default: the model's)")),
        'batch_size': (('-b', '--batch-size'), dict(type=_POSITIVE, help='batch size per rank')),
        'workers': (('-j', '--workers'), dict(type=_COUNT, default=default_workers(),
                                              help='data loading workers per rank (default: 4, or the number of '
                                                   f'CPUs this process may use when fewer: {default_workers()})')),
        'pin_mem': (('--pin-mem',), dict(action='store_true', help='pin CPU memory in the loaders')),
        'amp': (('--amp',), dict(action='store_true', help='mixed precision (autocast)')),
        'amp_dtype': (('--amp-dtype',), dict(default=None, choices=('float16', 'bfloat16'),
                                             help='autocast dtype with --amp (default: float16)')),
        'device': (('--device',), dict(type=parse_device, default=None,
                                       help='device (default: cuda if available, else cpu)')),
        'no_progress': (('--no-progress',), dict(action='store_true', help='hide progress bars')),
    }


#: the shared options, in the order they are listed by ``--help``
MODEL_OPTIONS = ('model', 'anchors', 'route_space', 'model_kwargs', 'pretrained', 'num_classes', 'img_size')
DATA_OPTIONS = ('data_dir', 'dataset', 'dataset_download', 'class_map', 'input_img_mode', 'crop_pct', 'mean', 'std',
                'interpolation', 'batch_size', 'workers', 'pin_mem')
RUNTIME_OPTIONS = ('amp', 'amp_dtype', 'device', 'no_progress')


def add_shared_args(parser: Any, names: Iterable[str], **overrides: dict[str, Any]) -> None:
    """Add the shared options ``names`` (destinations, e.g. ``'data_dir'``) to ``parser`` (or an argument group),
    each with its one definition; ``overrides`` maps a name to keywords that differ for this entry point (e.g.
    ``batch_size={'default': 128}``, ``model={'required': True}``). A default given this way is stated in the help."""
    options = _shared_options()
    unknown = sorted(set(names) - set(options))
    if unknown:
        raise KeyError(f'no shared options {unknown}: choose from {sorted(options)}')
    for name in names:
        flags, kwargs = options[name]
        kwargs = dict(kwargs, **overrides.get(name, {}))
        if 'default' in overrides.get(name, {}) and kwargs.get('default') is not None:
            kwargs['help'] = f"{kwargs['help'].split(' (default')[0]} (default: {kwargs['default']})"
        parser.add_argument(*flags, **kwargs)
