"""What the subcommands share: the model options and the one model builder.

The model is named by ``--model`` (``-m``) on every command; the commands that act on a built model also take it as
the positional ``MODEL`` (an alias kept from the first releases). Its arguments are the shared options of
:mod:`timm_stitch.arguments` (``--pretrained``, ``--checkpoint``, ``--model-kwargs``, ``--route-space``...), built
by :func:`timm_stitch.evaluation.create_stitched_model`, the builder ``timm-stitch train`` and ``validate`` use too.
"""
from __future__ import annotations

import argparse

from ..arguments import MODEL_OPTIONS, add_shared_args, existing_file, stitched_model_name
from ..evaluation import create_stitched_model, load_weights
from ..model import StitchedNet

__all__ = ['add_model_args', 'build_model']


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options every model-building subcommand takes: ``MODEL``/``--model``, the shared model options,
    ``--checkpoint``, ``--card`` and ``--official-final-norm``."""
    # checked after parsing (in build_model), so that an unknown option's value taken as MODEL is reported as the
    # unknown option ('unrecognized arguments: --bogus'), not as an unknown model
    parser.add_argument('model_name', nargs='?', metavar='MODEL', default=None,
                        help='the architecture, as --model (either form)')
    add_shared_args(parser, (*MODEL_OPTIONS, 'checkpoint'))
    parser.add_argument('--card', type=existing_file, default=None,
                        help='a routes.json card (or official JSON-lines results) with accuracy and latency')
    parser.add_argument('--official-final-norm', action='store_true',
                        help='skip the final norm on stitched routes, as the official SN-Net DeiT code does')


def _model_name(args: argparse.Namespace) -> str:
    """The one model of the positional ``MODEL`` and ``--model``; ``ValueError`` for none or two."""
    positional = getattr(args, 'model_name', None)
    if positional is not None and args.model is not None and positional != args.model:
        raise ValueError(f'two models given: {positional} and --model {args.model}')
    if positional is None and args.model is None:
        raise ValueError('no model given: pass --model MODEL (or MODEL), e.g. snnet_vit_fmnist_tsb')
    try:
        return stitched_model_name(positional) if positional is not None else args.model
    except argparse.ArgumentTypeError as e:
        raise ValueError(f'argument MODEL: {e}') from None


def build_model(args: argparse.Namespace) -> StitchedNet:
    """The stitched model the arguments name, in eval mode: built through timm (untrained unless ``--pretrained``),
    then ``--checkpoint`` loaded into it and ``--card`` attached."""
    args.model = _model_name(args)
    extra = {'final_norm_on_stitched_routes': False} if getattr(args, 'official_final_norm', False) else {}
    model = create_stitched_model(args, **extra)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    if getattr(args, 'card', None):
        model.load_card(args.card)
    return model.eval()
