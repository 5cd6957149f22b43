"""``timm-stitch card --model MODEL --out DIR``: a model card folder (routes.json, README.md, MACs-accuracy plot)."""
from __future__ import annotations

import argparse
import os

from ..arguments import existing_file
from ..card_readme import write_card_dir
from ..cards import RouteCard
from ._model import add_model_args, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('card', help='write a model card folder: routes.json, README.md and a plot',
                              description='Count every route (MACs, params) and write routes.json, a Hugging '
                                          'Face README.md and a MACs-accuracy PNG into --out. A card already in '
                                          '--out is updated, not lost: its accuracies, latencies and provenance '
                                          'stay unless --card or --accuracy brings new ones. Latency and accuracy '
                                          'come from --card; --accuracy takes accuracies from another file.')
    add_model_args(p)
    p.add_argument('--out', required=True, help='output folder; a card already there is merged into')
    p.add_argument('--replace', action='store_true',
                   help='start from the counts alone, dropping what a card already in --out holds')
    p.add_argument('--accuracy', type=existing_file, default=None,
                   help='a routes.json or official JSON-lines results file to take the accuracies from')
    p.add_argument('--reported-by', default=None,
                   help='mark the accuracies (of --accuracy, else of --card) as reported by these authors rather '
                        'than measured here')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG (matplotlib not needed)')
    p.set_defaults(func=run)


def _has_accuracy(card: RouteCard) -> bool:
    return any(r.top1 is not None or r.top5 is not None for r in card.routes)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    card = RouteCard.from_model(model, checkpoint=args.checkpoint)
    existing = os.path.join(args.out, 'routes.json')
    if os.path.isfile(existing) and not args.replace:
        previous = RouteCard.load(existing)
        try:
            previous.check_model(model)
        except ValueError as e:
            raise ValueError(f'{existing} is not a card of this model ({e}): choose another --out, or pass '
                             '--replace to overwrite it') from None
        card = card.with_measurements(previous)
    if model.card is not None:
        card = card.with_measurements(model.card)
    accuracy = RouteCard.load(args.accuracy, model=card.model) if args.accuracy else None
    if accuracy is None and args.reported_by:
        accuracy = model.card
        if accuracy is None or not _has_accuracy(accuracy):
            raise ValueError('--reported-by marks accuracies, and there are none to mark: pass --accuracy FILE, '
                             'or a --card with accuracies')
    if accuracy is not None and _has_accuracy(accuracy):
        accuracy.check_model(model)
        tags = next((r.accuracy for r in accuracy.routes if r.accuracy), None) or {}
        kind = 'reported' if args.reported_by else tags.get('source', 'measured')
        record = {'who': args.reported_by} if args.reported_by else {}
        if args.accuracy:
            record['source_file'] = os.path.basename(args.accuracy)
        card = card.with_accuracy(accuracy, tags.get('dataset', 'unknown'), kind, **record)
    elif accuracy is not None:
        raise ValueError(f'--accuracy {args.accuracy}: the file holds no accuracies (no top1 or top5 values)')
    for path in write_card_dir(card, args.out, plot=not args.no_plot):
        print(f'wrote {path}')
    return 0
