"""The offline main job: the shipped Fashion-MNIST SN-Net, its routes, budget-driven route choice and accuracy.

Run with ``python -m timm_stitch.demo``. Loads ``snnet_vit_fmnist_tsb`` with ``pretrained=True`` from the package
itself (no network), times every route on this machine, prints the route table (MACs, params, measured test
top-1, latency), picks a route for each MACs budget with ``select_stitch`` and classifies test images on it.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import numpy as np
import timm
import torch
from timm.data import resolve_data_config

from .data import FASHION_MNIST_CLASSES, GreyImageDataset, load_fashion_mnist, load_fashion_mnist_sample
from .data.fashion_mnist import SAMPLE_FILE, find_source
from .evaluation import eval_loader, evaluate_routes
from .profiling import latency_stats, profile
from .routes import format_route_table

MODEL = 'snnet_vit_fmnist_tsb'


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return latency_stats(times)['median_ms']


def _test_images(source: Optional[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """The full test split when its IDX files are found, else the 1,000-image sample shipped with the package."""
    try:
        images, labels = load_fashion_mnist('test', source)
        return images, labels, f'the Fashion-MNIST test split from {find_source(source)}'
    except FileNotFoundError:
        if source is not None:
            raise
        images, labels = load_fashion_mnist_sample()
        return images, labels, (f'the first {len(images):,} test images shipped in {SAMPLE_FILE.name} '
                                '(apt-get install dataset-fashion-mnist for all 10,000)')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--budgets', type=float, nargs='+', default=[12.0, 40.0], metavar='MMACS',
                        help='MACs budgets (millions) to pick routes for (default: 12 40)')
    parser.add_argument('--source', default=None, help='folder with the Fashion-MNIST IDX files '
                        '(default: Debian\'s dataset-fashion-mnist, else the shipped 1,000-image sample)')
    parser.add_argument('--repeats', type=int, default=20, help='timed batch-1 calls per route (default: 20)')
    parser.add_argument('--examples', type=int, default=8, help='test images whose predictions are printed')
    args = parser.parse_args(argv)
    if any(b <= 0 for b in args.budgets):
        parser.error(f'--budgets must be positive MMACs, got {args.budgets}')

    start = time.perf_counter()
    model = timm.create_model(MODEL, pretrained=True).eval()
    print(f'{MODEL}: {len(model.anchors)} anchors ({", ".join(model.anchor_names)}), {model.num_routes} routes, '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, loaded offline from '
          f'{model.pretrained_cfg["file"]}')

    profile(model, 'cpu', batch_size=1, repeats=args.repeats, progress=False)
    routes = model.routes()
    print(f'\nroutes (top-1: measured on the 10,000 test images; ms: batch-1 median on this machine, '
          f'torch threads: {torch.get_num_threads()}; * = on the MACs/top-1 Pareto front, '
          f'{len(model.pareto())} of {len(routes)}):')
    print(format_route_table(routes, ['Ti', 'S', 'B']))

    images, labels, where = _test_images(args.source)
    loader = eval_loader(GreyImageDataset(images, labels), resolve_data_config(model=model), batch_size=500)
    batch = torch.stack([loader.dataset[i][0] for i in range(min(args.examples, len(images)))])
    print(f'\nclassifying {len(images):,} images: {where}')
    for budget in args.budgets:
        try:
            route = model.select_stitch(max_macs=budget * 1e6)
        except ValueError as error:
            print(f'  budget {budget:g} MMACs: {error}')
            continue
        began = time.perf_counter()
        result = evaluate_routes(model, loader, [route.id], torch.device('cpu'), progress=False)[route.id]
        seconds = time.perf_counter() - began
        with torch.no_grad():
            predicted = model(batch).argmax(-1).tolist()  # the route select_stitch made active
        print(f'  budget {budget:g} MMACs -> route {route.id} (anchors {route.anchors}, cuts {route.cuts}): '
              f'{route.macs / 1e6:.2f} MMACs, {route.params / 1e6:.2f}M params, {route.latency_ms:.2f} ms\n'
              f'    top-1 {result["top1"]:.2f}% on these images (card: {route.top1:.2f}% on the test split), '
              f'{len(images) / seconds:,.0f} images/s\n'
              f'    first {len(predicted)} predicted: ' + ', '.join(
                  f'{FASHION_MNIST_CLASSES[p]}{"" if p == t else " (wrong: " + FASHION_MNIST_CLASSES[t] + ")"}'
                  for p, t in zip(predicted, labels[:len(predicted)].tolist())))

    switch_ms = _median_ms(lambda: model.set_stitch(3), 20000)
    print(f'\nset_stitch cost: median {switch_ms * 1e3:.2f} us per call (host side, no weight copies); '
          f'demo took {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
