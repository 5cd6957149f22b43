"""Accuracy of the shipped Fashion-MNIST SN-Net's routes quantized once: per route top-1 at float32 and each variant,
the drop, and the worst route. Two uses:

    # the variants behind the choices of timm_stitch.quantize (stitches quantized or not, torchao's per-token
    # dynamic activations against PyTorch's per-tensor ones), on the first --images test images
    .venv/bin/python benchmarks/fmnist_quantize.py --images 2000

    # the per-route table of docs/quantization.md from `timm-stitch validate [--quantize S]` cards
    .venv/bin/python benchmarks/fmnist_quantize.py --cards fp32=DIR/routes.json int8-wo=... int8-dyn=...
"""
from __future__ import annotations

import argparse
import copy
import json
from typing import Callable

import timm
import torch
from timm.data import resolve_data_config

import timm_stitch
from timm_stitch.cards import RouteCard
from timm_stitch.data import GreyImageDataset, load_fashion_mnist
from timm_stitch.evaluation import eval_loader, evaluate_routes
from timm_stitch.routes import Route

MODEL = 'snnet_vit_fmnist_tsb'


def _torchao(config_name: str) -> Callable[[timm_stitch.StitchedNet], timm_stitch.StitchedNet]:
    def apply(model: timm_stitch.StitchedNet) -> timm_stitch.StitchedNet:
        import torchao.quantization as tq
        model = copy.deepcopy(model)
        tq.quantize_(model, getattr(tq, config_name)())
        return model
    return apply


VARIANTS = {
    'int8-wo': lambda m: timm_stitch.quantize(m, 'int8-wo'),
    'int8-wo, float stitches': lambda m: timm_stitch.quantize(m, 'int8-wo', quantize_stitches=False),
    'int8-dyn': lambda m: timm_stitch.quantize(m, 'int8-dyn'),
    'int8-dyn, float stitches': lambda m: timm_stitch.quantize(m, 'int8-dyn', quantize_stitches=False),
    'torchao int8-dyn (per-token)': _torchao('Int8DynamicActivationInt8WeightConfig'),
    'torchao int8-wo': _torchao('Int8WeightOnlyConfig'),
}


def _describe(route: Route) -> str:
    names = ('Ti', 'S', 'B')
    if route.is_anchor:
        return f'{names[route.anchors[0]]} (anchor)'
    return '→'.join(names[a] for a in route.anchors) + ' ' + ' '.join(f'({j},{k})' for j, k in route.cuts)


def table(routes: list[Route], columns: dict[str, dict[int, float]]) -> str:
    """A markdown table of top-1 per route and column, drops against the first column, and a summary."""
    base_name, base = next(iter(columns.items()))
    head = '| id | route | MMACs | ' + ' | '.join(columns) + ' |'
    lines = [head, '|---:|---|---:|' + '---:|' * len(columns)]
    for r in routes:
        cells = [f'{base[r.id]:.2f}'] + [f'{c[r.id]:.2f} ({c[r.id] - base[r.id]:+.2f})' for c in
                                         list(columns.values())[1:]]
        lines.append(f'| {r.id} | {_describe(r)} | {r.macs / 1e6:.2f} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'| {base_name} → | mean top-1 | mean drop | worst drop (route) |', '|---|---:|---:|---:|']
    for name, values in columns.items():
        drops = {k: base[k] - v for k, v in values.items()}
        worst = max(drops, key=drops.get)
        lines.append(f'| {name} | {sum(values.values()) / len(values):.2f} | '
                     f'{sum(drops.values()) / len(drops):.2f} | {drops[worst]:.2f} (route {worst}) |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=2000, help='first N test images (variants mode)')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS)[:-1], choices=list(VARIANTS),
                        help='default: all but torchao int8-wo (which dequantizes per call, as int8-wo does)')
    parser.add_argument('--cards', nargs='+', default=None, metavar='NAME=ROUTES_JSON',
                        help='make the table from validate cards (routes.json) or records (routes.jsonl) instead, '
                             'on the routes all of them hold (the first is the reference)')
    args = parser.parse_args(argv)
    model = timm.create_model(MODEL, pretrained=True).eval()
    routes = model.counted_routes()
    if args.cards:
        columns = {}
        for item in args.cards:
            name, _, path = item.partition('=')
            if path.endswith('.jsonl'):  # validate's records, written as its passes finish
                with open(path) as f:
                    columns[name] = {r['stitch_id']: r['top1'] for r in map(json.loads, filter(str.strip, f))}
            else:
                columns[name] = {r.id: r.top1 for r in RouteCard.load(path).routes if r.top1 is not None}
        measured = set.intersection(*(set(c) for c in columns.values()))
        print(table([r for r in routes if r.id in measured], {n: {k: c[k] for k in measured}
                                                               for n, c in columns.items()}))
        return
    images, labels = load_fashion_mnist('test')
    dataset = GreyImageDataset(images[:args.images], labels[:args.images])
    loader = eval_loader(dataset, resolve_data_config(model=model), batch_size=500)
    ids = [r.id for r in routes]
    columns = {'fp32': {k: v['top1'] for k, v in evaluate_routes(model, loader, ids, torch.device('cpu'),
                                                                 progress=False).items()}}
    for name in args.variants:
        try:
            variant = VARIANTS[name](model)
        except ImportError as e:
            print(f'skipping {name}: {e}')
            continue
        results = evaluate_routes(variant, loader, ids, torch.device('cpu'), progress=False)
        columns[name] = {k: v['top1'] for k, v in results.items()}
        print(f'{name}: done', flush=True)
    print(f'\ntop-1 (%) on the first {len(dataset):,} test images\n')
    print(table(routes, columns))


if __name__ == '__main__':
    main()
