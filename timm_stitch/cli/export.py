"""``timm-stitch export --model MODEL --route K --out DIR``: one route of a stitched network as a folder timm loads,
a ``torch.export`` program or an ONNX file.

``--format timm`` (the default) writes a folder ``timm.create_model('local-dir:DIR', pretrained=True)`` loads: an
anchor route as the plain timm model it is (:func:`~timm_stitch.export_stitch`, its own weights only), a stitched
route as the stitched network with that route active (``config.json`` names it, so the loaded model runs it by
default). ``torch-export`` and ``onnx`` trace the route alone (:func:`~timm_stitch.export_stitch`: only the weights
it uses, low-rank stitches merged) at a fixed input shape into ``DIR/model.pt2`` or ``DIR/model.onnx`` (the
``[onnx]`` extra).
"""
from __future__ import annotations

import argparse
import os

import torch

from .._io import make_folder
from ..arguments import int_at_least
from ..export import export_stitch
from ..input_size import model_input_size
from ._model import add_model_args, build_model

__all__ = ['add_parser', 'run', 'FORMATS']

#: the file each traced format writes into the output folder
FORMATS = {'timm': None, 'torch-export': 'model.pt2', 'onnx': 'model.onnx'}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch export``."""
    p = subparsers.add_parser('export', help='one route as a timm-loadable folder, a torch.export program or ONNX',
                              description=__doc__.split('\n\n')[1].replace('\n', ' '))
    add_model_args(p)
    p.add_argument('--route', type=int_at_least(0), default=None, metavar='ID',
                   help="the route to export (default: the model's active route, e.g. from --model-kwargs "
                        'stitch_id=K)')
    p.add_argument('--format', choices=tuple(FORMATS), default='timm',
                   help='timm: a folder timm.create_model loads; torch-export: DIR/model.pt2; onnx: DIR/model.onnx '
                        '(default: timm)')
    p.add_argument('--batch-size', type=int_at_least(1), default=1,
                   help='batch size of the traced input of torch-export and onnx (default: 1)')
    p.add_argument('--out', required=True, help='output folder')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export route ``args.route`` of the model the arguments name into ``args.out``."""
    model = build_model(args)
    route = model.stitch_id if args.route is None else args.route
    model.set_stitch(route)  # checks the id against the model's routes
    if args.format == 'timm':
        from ..hub import save_pretrained
        anchor = model.plan.routes[route].is_anchor
        folder = save_pretrained(export_stitch(model, route) if anchor else model, args.out)
        what = 'its anchor, a plain timm model' if anchor else f'{args.model} running it'
        print(f'exported route {route} ({what}) -> {folder}')
        return 0
    if args.format == 'onnx':
        for package in ('onnx', 'onnxscript'):
            try:
                __import__(package)
            except ImportError:
                raise ModuleNotFoundError(f'--format onnx needs {package}: pip install timm-stitch[onnx]') from None
    module = export_stitch(model, route)
    example = (torch.randn(args.batch_size, *model_input_size(model)),)
    make_folder(args.out)
    path = os.path.join(args.out, FORMATS[args.format])
    if args.format == 'torch-export':
        torch.export.save(torch.export.export(module, example), path)
    else:
        torch.onnx.export(module, example, path, dynamo=True)
    print(f'exported route {route} ({args.format}, input {tuple(example[0].shape)}) -> {path}')
    return 0
