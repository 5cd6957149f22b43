"""Stitch-only fast fit against the full recipe, on the shipped Fashion-MNIST SN-Net: what minutes of CPU buy.

The fast fit keeps the shipped anchors frozen, least-squares initialises every stitching layer from 2,000 clean
training images, then trains the stitching layers alone for a few epochs (``--freeze-anchors``). Each fit is
evaluated on all 35 routes over the 10,000 test images and summarised per segment (Ti-S and S-B stitched routes):
mean and best top-1, and how many stitched routes lie on the MACs/top-1 front strictly between the segment's anchors
(MACs and top-1 both between theirs). The last row is the shipped model itself (the full recipe).

    PYTHONPATH=. .venv/bin/python benchmarks/fmnist_fast_fit.py --work /tmp/fast_fit            # epochs 0 1 3
    PYTHONPATH=. .venv/bin/python benchmarks/fmnist_fast_fit.py --work /tmp/fast_fit --epochs 1 --kd

Epoch 0 is the least-squares init alone. ``--kd`` adds soft distillation from anchor B. A stage whose output exists in
``--work`` is reused. Train minutes are wall time of ``timm_stitch.train`` on this machine (2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
from fmnist_pipeline import COMMON, TRAIN, distill_from_base, run, shipped_fp32  # benchmarks/ is the script's folder
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from timm_stitch.cards import RouteCard
from timm_stitch.data import GreyImageDataset, load_fashion_mnist, prepare_fashion_mnist
from timm_stitch.evaluation import eval_loader
from timm_stitch.ls_init import init_stitches
from timm_stitch.models.snnet_vit_fmnist import SHIPPED_DIR

INIT_SAMPLES = 2000
SEGMENTS = {'Ti-S': (0, 1), 'S-B': (1, 2)}


def ls_init_only(start: Path, source: Path | None, out: Path) -> None:
    """Epoch 0: the shipped anchors with stitching layers least-squares initialised from clean training images."""
    if out.exists():
        return
    model = timm.create_model('snnet_vit_fmnist_tsb')
    model.load_state_dict(load_file(start))
    images, labels = load_fashion_mnist('train', source)
    loader = eval_loader(GreyImageDataset(images[:INIT_SAMPLES], labels[:INIT_SAMPLES]),
                         resolve_data_config(model=model), 64)
    init_stitches(model, (x for x, _ in loader))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


def segment_summary(card: RouteCard) -> dict[str, dict[str, float]]:
    """Per segment: mean and best top-1 of its stitched routes, and how many lie on the front between its anchors."""
    routes = {r.id: r for r in card.routes}
    front = [r for r in routes.values()
             if not any(o.macs <= r.macs and o.top1 >= r.top1 and (o.macs, o.top1) != (r.macs, r.top1)
                        for o in routes.values())]
    summary = {}
    for name, (lo, hi) in SEGMENTS.items():
        stitched = [r for r in routes.values() if tuple(r.anchors) == (lo, hi)]
        a, b = routes[lo], routes[hi]
        between = [r.id for r in front if tuple(r.anchors) == (lo, hi)
                   and a.macs < r.macs < b.macs and a.top1 < r.top1 < b.top1]
        summary[name] = dict(mean=sum(r.top1 for r in stitched) / len(stitched), best=max(r.top1 for r in stitched),
                             on_front=len(between), ids=between)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', type=Path, required=True, help='working folder (runs, logs, evaluations)')
    parser.add_argument('--source', type=Path, default=None, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('--epochs', type=int, nargs='+', default=[0, 1, 3], help='stitch-only epochs per fit')
    parser.add_argument('--lr', type=float, default=1e-3, help='stitching layers learning rate')
    parser.add_argument('--kd', action='store_true', help='soft distillation from anchor B (alpha 0.5)')
    args = parser.parse_args(argv)
    work = args.work.resolve()
    (work / 'logs').mkdir(parents=True, exist_ok=True)
    data = prepare_fashion_mnist(work / 'data', args.source)
    data_args = ['--data-dir', str(data), *COMMON]
    start = shipped_fp32(work / 'shipped_fp32.safetensors')
    distill, tag = (distill_from_base(start, work / 'teacher_B.safetensors', 0.5), '_kd') if args.kd else ([], '')

    rows = []
    for epochs in args.epochs:
        name = f'fit{epochs}{tag if epochs else ""}'
        weights = work / 'runs' / name / 'last.safetensors'
        if epochs == 0:
            ls_init_only(start, args.source, weights)
        else:
            run(name, 'timm_stitch.train', [
                *data_args, *TRAIN, '--model', 'snnet_vit_fmnist_tsb', '--initial-checkpoint', str(start),
                '--freeze-anchors', '--stitch-init-samples', str(INIT_SAMPLES), '--epochs', str(epochs),
                '--lr', str(args.lr), '--warmup-epochs', '0', '--val-routes', 'none', *distill,
                '--out', str(work / 'runs'), '--experiment', name,
            ], work, weights)
        run(f'eval_{name}', 'timm_stitch.validate', [
            *data_args, '--split', 'test', '--model', 'snnet_vit_fmnist_tsb', '--checkpoint', str(weights),
            '--routes', 'all', '--out', str(work / f'eval_{name}'), '-b', '500',
        ], work, work / f'eval_{name}' / 'routes.json')
        minutes = json.loads((work / 'minutes.json').read_text()).get(name, 0.0) if epochs else 0.0
        rows.append((f'fast fit, {epochs} epoch(s){" + KD from B" if distill and epochs else ""}', minutes,
                     segment_summary(RouteCard.load(work / f'eval_{name}' / 'routes.json'))))
    shipped = RouteCard.load(SHIPPED_DIR / 'routes.json')
    rows.append(('full recipe (shipped model)', None, segment_summary(shipped)))

    print(f"{'fit':<34} {'train min':>9}  " + '  '.join(f'{s + " mean/best/front":>24}' for s in SEGMENTS))
    for label, minutes, summary in rows:
        cells = '  '.join(f"{v['mean']:>9.2f} {v['best']:>6.2f} {v['on_front']:>7d}" for v in summary.values())
        print(f"{label:<34} {'-' if minutes is None else f'{minutes:.1f}':>9}  {cells}")
    (work / 'fast_fit.json').write_text(json.dumps(
        [dict(fit=label, train_minutes=m, segments=s) for label, m, s in rows], indent=2))


if __name__ == '__main__':
    main()
