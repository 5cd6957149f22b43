"""Resampling stitches on the shipped Fashion-MNIST SN-Net: routes across two patch grids against same-grid routes.

Both networks stitch the Ti and S anchors of the shipped ``snnet_vit_fmnist_tsb`` (patch 4: a 7x7 grid on 28x28
images) with least-squares init alone (the first 2,000 clean training images), and every route is evaluated on the
first ``--test-samples`` test images:

* **same grid**: the shipped Ti and S as they are (every stitch maps 7x7 + class token onto 7x7 + class token);
* **cross grid**: Ti rebuilt at patch 7 (timm's ``set_input_size(patch_size=7)`` resamples its patch and position
  embeddings: a 4x4 grid), fine-tuned alone for ``--tune-epochs`` on the training set, so that every Ti->S stitch
  resamples 4x4 -> 7x7.

The shipped model's own Ti->S routes (the full recipe: trained stitches, all 10,000 test images, from its route
card) are printed beside them for reference.

``--stitch-epochs N`` then trains the stitching layers alone (anchors frozen) for N epochs, one random stitched
route per step, in both networks, and evaluates again.

    PYTHONPATH=. .venv/bin/python benchmarks/fmnist_cross_grid.py --out /tmp/cross_grid.json
    PYTHONPATH=. .venv/bin/python benchmarks/fmnist_cross_grid.py --tune-epochs 2 --stitch-epochs 1

Needs the Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``, or ``--source``). Wall times are this
machine's (CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path
from typing import Iterator

import timm
import torch
import torch.nn.functional as F

import timm_stitch
from timm_stitch.data import load_fashion_mnist
from timm_stitch.evaluation import evaluate_routes
from timm_stitch.models.snnet_vit_fmnist import FMNIST_MEAN, FMNIST_STD

INIT_SAMPLES = 2000
SEGMENTS = {'Ti-S': (0, 1)}


def as_tensors(split: str, source: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 1, 28, 28) images and labels: the anchors' eval transform (no resize or crop at 28x28)."""
    images, labels = load_fashion_mnist(split, source)
    x = (torch.from_numpy(images.copy()).float().div(255).unsqueeze(1) - FMNIST_MEAN[0]) / FMNIST_STD[0]
    return x, torch.from_numpy(labels.copy()).long()


def batches(x: torch.Tensor, y: torch.Tensor, size: int, shuffle: bool = False) -> Iterator[tuple]:
    order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(xb).argmax(-1) == yb).sum().item() for xb, yb in batches(x, y, 1000))
    return 100 * hits / len(y)


def train(params: list[torch.nn.Parameter], step_loss, x: torch.Tensor, y: torch.Tensor, epochs: int,
          lr: float) -> float:
    """AdamW (weight decay 0.05, cosine to 0, label smoothing 0.1) over ``epochs``; returns the wall minutes."""
    start = time.time()
    steps = epochs * -(-len(x) // 128)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(epochs):
        for xb, yb in batches(x, y, 128, shuffle=True):
            loss = F.cross_entropy(step_loss(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return (time.time() - start) / 60


def evaluate(net, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    results = evaluate_routes(net, list(batches(x, y, 500)), range(net.num_routes), torch.device('cpu'),
                              progress=False)
    return [dict(id=r.id, anchors=list(r.anchors), cuts=[list(c) for c in r.cuts], macs=r.macs, params=r.params,
                 top1=results[r.id]['top1']) for r in net.counted_routes()]


def stitch_costs(net) -> dict[str, dict[str, int]]:
    """MACs (batch 1) and params of one stitching layer per segment, as the routes count them."""
    from timm_stitch.macs import count_anchor_macs
    _, stitches = count_anchor_macs(net)
    costs = {}
    for name, (lo, hi) in SEGMENTS.items():
        route = next(r for r in net.plan.routes if tuple(r.anchors) == (lo, hi))
        ref = route.stitches[0]
        layer = net.stitch_layer(ref)
        costs[name] = dict(macs=stitches[(ref, route.cuts[0][0])], params=sum(p.numel() for p in layer.parameters()),
                           layer=layer.extra_repr())
    return costs


def summary(routes: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for name, pair in SEGMENTS.items():
        stitched = [r for r in routes if tuple(r['anchors']) == pair]
        out[name] = dict(mean=sum(r['top1'] for r in stitched) / len(stitched), best=max(r['top1'] for r in stitched),
                         macs_min=min(r['macs'] for r in stitched), macs_max=max(r['macs'] for r in stitched))
    return out


def train_stitches(net, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """Stitching layers alone, one random stitched route per step."""
    for p in net.anchors.parameters():
        p.requires_grad_(False)
    stitched = [r.id for r in net.plan.routes if not r.is_anchor]
    net.train()
    for anchor in net.anchors:
        anchor.eval()
    return train(list(net.stitch_layers.parameters()), lambda xb: net(xb, stitch_id=random.choice(stitched)),
                 x, y, epochs, 1e-3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=Path, default=None, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('--patch', type=int, default=7, help='patch size Ti is rebuilt at (28 must divide by it)')
    parser.add_argument('--tune-epochs', type=int, default=1, help='epochs fine-tuning the rebuilt Ti alone')
    parser.add_argument('--stitch-epochs', type=int, default=0, help='stitch-only training epochs after LS init')
    parser.add_argument('--test-samples', type=int, default=2000, help='test images evaluated (10000: all)')
    parser.add_argument('--out', type=Path, default=None, help='write every route and summary here (JSON)')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    train_x, train_y = as_tensors('train', args.source)
    test_x, test_y = (t[:args.test_samples] for t in as_tensors('test', args.source))

    shipped = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    anchors = [copy.deepcopy(a) for a in shipped.anchors]
    rebuilt = copy.deepcopy(anchors[0])
    rebuilt.set_input_size(patch_size=args.patch)
    report = dict(patch=args.patch, tune_epochs=args.tune_epochs, stitch_epochs=args.stitch_epochs,
                  test_samples=len(test_y),
                  ti_top1=top1(anchors[0], test_x, test_y), ti_rebuilt_top1=top1(rebuilt, test_x, test_y))
    print(f"Ti rebuilt at patch {args.patch}: {report['ti_rebuilt_top1']:.2f} before tuning "
          f"(patch 4: {report['ti_top1']:.2f})", flush=True)
    rebuilt.train()
    report['tune_minutes'] = train(list(rebuilt.parameters()), rebuilt, train_x, train_y, args.tune_epochs, 5e-4)
    report['ti_rebuilt_tuned_top1'] = top1(rebuilt, test_x, test_y)
    print(f"tuned ({report['tune_minutes']:.1f} min): {report['ti_rebuilt_tuned_top1']:.2f}", flush=True)

    nets = {'same grid': [anchors[0], anchors[1]], 'cross grid': [rebuilt, anchors[1]]}
    for name, members in nets.items():
        net = timm_stitch.stitch([copy.deepcopy(a) for a in members], num_classes=10).eval()
        start = time.time()
        net.init_stitches(train_x[:INIT_SAMPLES], batch_size=500, progress=False)
        entry = dict(ls_init_seconds=time.time() - start, stitch_costs=stitch_costs(net))
        entry['ls_init'] = routes = evaluate(net, test_x, test_y)
        entry['ls_init_summary'] = summary(routes)
        if args.stitch_epochs:
            entry['stitch_train_minutes'] = train_stitches(net, train_x, train_y, args.stitch_epochs)
            entry['trained'] = evaluate(net.eval(), test_x, test_y)
            entry['trained_summary'] = summary(entry['trained'])
        report[name] = entry
        print(f'{name}: evaluated ({time.time() - start:.0f} s)', flush=True)

    print(f"Ti at patch 4: {report['ti_top1']:.2f}; rebuilt at patch {args.patch}: {report['ti_rebuilt_top1']:.2f}, "
          f"after {args.tune_epochs} epoch(s) alone ({report['tune_minutes']:.1f} min): "
          f"{report['ti_rebuilt_tuned_top1']:.2f}")
    for name in nets:
        entry = report[name]
        for stage in ('ls_init', 'trained'):
            if f'{stage}_summary' not in entry:
                continue
            anchors_top1 = ' '.join(f"{r['top1']:.2f}" for r in entry[stage][:2])
            cells = '  '.join(f"{s} mean {v['mean']:.2f} best {v['best']:.2f} MMACs {v['macs_min'] / 1e6:.2f}-"
                              f"{v['macs_max'] / 1e6:.2f}" for s, v in entry[f'{stage}_summary'].items())
            print(f'{name:<10} {stage:<8} anchors {anchors_top1}  {cells}')
        for seg, cost in entry['stitch_costs'].items():
            print(f"{name:<10} {seg} stitch: {cost['macs']} MACs, {cost['params']} params ({cost['layer']})")
    # the shipped routes of the same anchors and cuts (its ids count anchor B too)
    shipped_top1 = {(tuple(r.anchors), tuple(r.cuts)): r.top1 for r in shipped.routes() if 2 not in r.anchors}
    print(f"{'cut':>6} | {'same MMACs':>10} {'top1':>6} | {'cross MMACs':>11} {'top1':>6} | {'shipped top1':>12}")
    same, cross = report['same grid']['ls_init'], report['cross grid']['ls_init']
    for a, b in zip(same, cross):
        cut = str(tuple(a['cuts'][0])) if a['cuts'] else f"Ti/S {a['id']}"
        print(f"{cut:>6} | {a['macs'] / 1e6:>10.3f} {a['top1']:>6.2f} | {b['macs'] / 1e6:>11.3f} {b['top1']:>6.2f} | "
              f"{shipped_top1[(tuple(a['anchors']), tuple(map(tuple, a['cuts'])))]:>12.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
