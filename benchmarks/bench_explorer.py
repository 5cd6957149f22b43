"""The route explorer on this machine: server start-up, the page's time to first paint, and per-image latency.

Serves the explorer of the shipped ``snnet_vit_fmnist_tsb`` (offline) and drives it in headless Chromium
(``tests/explorer_page.py``): first-contentful-paint of fresh browsers (cold: empty cache) and of reloads (warm), from
the browser's performance timeline; per image, the route's forward as the page measures it ("latency now", the
median of its timed batch-1 calls) and the page's round trip (Classify pressed to the answer shown), for the routes
two MACs budgets select. Writes a screenshot of the page with two routes compared (``--screenshot``).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from explorer_page import ExplorerPage, answered, find_browser, wait_idle  # noqa: E402

import timm_stitch  # noqa: E402, F401
from timm_stitch.arguments import parse_count  # noqa: E402
from timm_stitch.explorer import build_app, launch  # noqa: E402
from timm_stitch.profiling import latency_stats  # noqa: E402


def _median(values: list[float]) -> str:
    stats = latency_stats(values)
    return f"median {stats['median_ms']:8.1f} ms  p90 {stats['p90_ms']:8.1f} ms  (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_vit_fmnist_tsb', help='an snnet_* model with pretrained weights')
    parser.add_argument('--cold', type=int, default=3, help='page loads in a fresh browser (default: 3)')
    parser.add_argument('--warm', type=int, default=5, help='reloads in one browser (default: 5)')
    parser.add_argument('--images', type=int, default=10, help='shipped test images per route (default: 10)')
    parser.add_argument('--budgets', nargs='+', default=['12M', '40M'], help='MACs budgets (default: 12M 40M)')
    parser.add_argument('--screenshot', default=None, help='write a PNG of the page here (e.g. docs/explorer.png)')
    args = parser.parse_args()
    chromium, driver, reason = find_browser()
    if reason:
        raise SystemExit(reason)

    started = time.perf_counter()
    model = timm.create_model(args.model, pretrained=True).eval()
    app = launch(build_app(model), block=False, quiet=True)
    print(f'{args.model}: served at {app.local_url} {time.perf_counter() - started:.1f} s after the start '
          f'(model load and Gradio start; torch threads: {torch.get_num_threads()})')
    try:
        cold = []
        for _ in range(args.cold):
            page = ExplorerPage(app.local_url, chromium, driver)
            cold.append(page.first_contentful_paint_ms())
            page.close()
        page = ExplorerPage(app.local_url, chromium, driver)
        warm = []
        for _ in range(args.warm):
            page.driver.refresh()
            page.wait_for(lambda: page.js("return !!document.querySelector('#route-plot .js-plotly-plot')"),
                          'the route scatter to render')
            warm.append(page.first_contentful_paint_ms())
        print(f'first contentful paint, fresh browser: {_median(cold)}')
        print(f'first contentful paint, reload:        {_median(warm)}')
        print(f'requests to anything but the local server: {page.foreign_requests() or "none"}')

        for budget in args.budgets:
            page.select_budget(max_macs=budget)
            expected = model.select_stitch(max_macs=parse_count(budget)).id
            page.wait_for(lambda: page.highlighted_route() == expected, f'route {expected}')  # noqa: B023
            forward, round_trip = [], []
            for index in range(args.images):
                page.set_image_index(index)
                start = time.perf_counter()
                result, _ = page.classify()
                round_trip.append((time.perf_counter() - start) * 1e3)
                assert answered(result)[0] == expected, (expected, result)
                forward.append(float(re.search(r'latency now: ([0-9.]+) ms', result).group(1)))
            print(f'budget {budget} -> route {expected}: forward (latency now) {_median(forward)}')
            print(f'{"":>{len(budget) + 17 + len(str(expected))}} page round trip      {_median(round_trip)}')

        if args.screenshot:  # the cheaper budget's route beside route 33, on an image only route 33 gets right
            page.select_budget(max_macs=args.budgets[0])
            page.choose_compare(33)
            page.set_image_index(21)
            page.classify()
            page.driver.execute_script('window.scrollTo(0, 0)')
            wait_idle(1.0)
            page.screenshot(args.screenshot)
            print(f'wrote {args.screenshot}')
        page.close()
    finally:
        app.close()


if __name__ == '__main__':
    main()
