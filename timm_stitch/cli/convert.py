"""``timm-stitch convert CHECKPOINT --model ARCH --out DIR``: an official SN-Net release file to a Hub-ready folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm.utils import ParseKwargs

from ..convert import OFFICIAL_FORMATS, convert_official


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch convert``."""
    parser = subparsers.add_parser(
        'convert', help='convert an official SN-Net checkpoint to a Hub-ready folder',
        description='Convert an official SN-Net release checkpoint (ziplab/SN-Net) into a Hub-ready folder that '
                    "timm.create_model('local-dir:DIR', pretrained=True) loads. The file is read without running "
                    'pickled code. timm.create_model(ARCH, pretrained=True) downloads and converts the releases '
                    'itself; this command is for files you already have.')
    parser.add_argument('checkpoint', help='the official release file, e.g. snnet_deit.pth')
    parser.add_argument('--model', '-m', '--arch', dest='model', default='snnet_deit_tsb',
                        choices=sorted(OFFICIAL_FORMATS), metavar='MODEL',
                        help='the architecture of the release (--arch: older spelling): ' + '; '.join(
                            f'{arch} for {fmt.release}' for arch, fmt in OFFICIAL_FORMATS.items())
                        + ' (default: %(default)s)')
    parser.add_argument('--out', required=True, help='output folder (config.json, model.safetensors, routes.json, '
                                                     'README.md); replaced atomically')
    parser.add_argument('--repo-id', default=None, help='the Hub repo id the model card names')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='architecture arguments describing the checkpoint, e.g. num_classes=100')
    parser.add_argument('--model-args', dest='model_kwargs', type=json.loads, metavar='JSON',
                        help='the same as one JSON object (older spelling), e.g. \'{"num_classes": 100}\'')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.checkpoint`` and save it into ``args.out``."""
    from ..hub import save_pretrained
    model = convert_official(args.checkpoint, args.model, **args.model_kwargs)
    folder = save_pretrained(model, args.out, repo_id=args.repo_id or f'timm-stitch/{args.model}')
    print(f'converted {args.checkpoint} ({args.model}, {model.num_routes} routes) -> {Path(folder)}')
    return 0
