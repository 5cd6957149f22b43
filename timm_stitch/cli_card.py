"""``timm-stitch card MODEL --out DIR``: write a model card folder (routes.json, README.md, MACs-accuracy plot)."""
from __future__ import annotations

import argparse
import os

from .cards import RouteCard, write_card_dir
from .cli import add_model_args, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('card', help='write a model card folder: routes.json, README.md and a plot',
                              description='Count every route (MACs, params) and write routes.json, a Hugging '
                                          'Face README.md and a MACs-accuracy PNG into --out. Accuracy and latency '
                                          'come from --card; --accuracy takes accuracies from another file.')
    add_model_args(p)
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--accuracy', default=None,
                   help='a routes.json or official JSON-lines results file to take the accuracies from')
    p.add_argument('--reported-by', default=None,
                   help='mark the accuracies as reported by these authors rather than measured here')
    p.add_argument('--no-plot', action='store_true', help='skip the PNG (matplotlib not needed)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    card = RouteCard.from_model(model, checkpoint=args.checkpoint)
    source = model.card
    if source is not None:
        for profile in source.latency_profiles:
            stats = {r.id: r.latency[profile] for r in source.routes if profile in r.latency}
            record = next((p for p in source.provenance if p.get('profile') == profile), {'profile': profile})
            card = card.with_latency(profile, stats, record)
    accuracy = RouteCard.load(args.accuracy, model=card.model) if args.accuracy else source
    if accuracy is not None and any(r.top1 is not None or r.top5 is not None for r in accuracy.routes):
        accuracy.check_model(model)
        tags = next((r.accuracy for r in accuracy.routes if r.accuracy), None) or {}
        kind = 'reported' if args.reported_by else tags.get('source', 'measured')
        record = {'who': args.reported_by} if args.reported_by else {}
        if args.accuracy:
            record['source_file'] = os.path.basename(args.accuracy)
        card = card.with_accuracy(accuracy, tags.get('dataset', 'unknown'), kind, **record)
    for path in write_card_dir(card, args.out, plot=not args.no_plot):
        print(f'wrote {path}')
    return 0
