"""Rebuild the shipped Fashion-MNIST SN-Net from scratch: anchors, stitching, evaluation, card, plot.

    .venv/bin/python benchmarks/fmnist_pipeline.py --work /tmp/fmnist            # everything (CPU, ~1 hour)
    .venv/bin/python benchmarks/fmnist_pipeline.py --work /tmp/fmnist --ship     # ... and replace the shipped files

Stages, each with the project's own trainer/validator (``timm_stitch.train`` / ``timm_stitch.validate``):
1. Fashion-MNIST laid out for timm (Debian's ``dataset-fashion-mnist``, or ``--source`` IDX folder).
2. Each anchor (``vit_fmnist_tiny/small/base``) trained from scratch, alone.
3. The anchors assembled into ``snnet_vit_fmnist_tsb``, its stitching layers least-squares initialised, then the
   whole network trained a few epochs with uniform route sampling.
4. Every route evaluated on the 10k test images; the route card (measured top-1, MACs, params) and the
   MACs-accuracy plot written; with ``--ship`` the fp16 weights and card replace the ones in the package.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import timm
from safetensors.torch import load_file, save_file

import timm_stitch
from timm_stitch.cards import RouteCard, write_card_dir
from timm_stitch.data import prepare_fashion_mnist
from timm_stitch.models.snnet_vit_fmnist import FMNIST_ANCHORS, SHIPPED_DIR

REPO = Path(__file__).resolve().parents[1]
COMMON = ['--dataset', 'torch/fashion_mnist', '--workers', '1', '--no-progress', '--log-interval', '200']
TRAIN = ['--train-split', 'train', '--val-split', 'test', '--no-aug', '--hflip', '0', '--smoothing', '0.1',
         '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine', '--min-lr', '1e-5', '-b', '128']


def run(stage: str, module: str, args: list[str], log: Path) -> float:
    """Run ``python -m module args`` with its output in ``log``; returns the wall time."""
    print(f'[{stage}] python -m {module} {" ".join(args)}', flush=True)
    start = time.perf_counter()
    with open(log, 'w') as f:
        result = subprocess.run([sys.executable, '-m', module, *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode:
        raise SystemExit(f'[{stage}] failed (exit {result.returncode}); see {log}:\n' + log.read_text()[-3000:])
    elapsed = time.perf_counter() - start
    print(f'[{stage}] done in {elapsed / 60:.1f} min', flush=True)
    return elapsed


def last_top1(log: Path) -> float:
    """The last ``Eval: route 0 top1 X`` the trainer logged."""
    lines = [line for line in log.read_text().splitlines() if line.startswith('Eval: route 0 top1')]
    return float(lines[-1].split()[4])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', type=Path, required=True, help='working folder (data, runs, logs)')
    parser.add_argument('--source', default=None, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('--anchor-epochs', type=int, nargs=3, default=[3, 2, 2], metavar=('TI', 'S', 'B'))
    parser.add_argument('--stitch-epochs', type=int, default=1)
    parser.add_argument('--ship', action='store_true', help='write the fp16 weights and card into the package')
    args = parser.parse_args(argv)
    work = args.work.resolve()
    (work / 'logs').mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    total = time.perf_counter()

    data = prepare_fashion_mnist(work / 'data', args.source)
    data_args = ['--data-dir', str(data), *COMMON]

    anchor_top1 = {}
    for (name, _, _), epochs in zip(FMNIST_ANCHORS, args.anchor_epochs):
        log = work / 'logs' / f'{name}.log'
        times[name] = run(name, 'timm_stitch.train', [
            *data_args, *TRAIN, '--model', 'snnet', '--anchors', name, '--epochs', str(epochs), '--lr', '1e-3',
            '--warmup-epochs', '1', '--warmup-lr', '1e-4', '--output', str(work / 'runs'), '--experiment', name,
        ], log)
        anchor_top1[name] = last_top1(log)
        print(f'[{name}] test top-1 {anchor_top1[name]:.2f}', flush=True)

    # assemble the stitched network from the trained anchors (single-anchor runs store them as anchors.0.*)
    model = timm.create_model('snnet_vit_fmnist_tsb')
    for i, (name, _, _) in enumerate(FMNIST_ANCHORS):
        weights = load_file(work / 'runs' / name / 'last.safetensors')
        model.anchors[i].load_state_dict({k.removeprefix('anchors.0.'): v for k, v in weights.items()})
    init = work / 'stitched_init.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)

    times['stitching'] = run('stitching', 'timm_stitch.train', [
        *data_args, *TRAIN, '--model', 'snnet_vit_fmnist_tsb', '--initial-checkpoint', str(init),
        '--stitch-init-samples', '2000', '--route-sampling', 'uniform', '--epochs', str(args.stitch_epochs),
        '--lr', '1e-4', '--stitch-lr-scale', '10', '--warmup-epochs', '0', '--val-routes', 'anchors',
        '--output', str(work / 'runs'), '--experiment', 'stitched',
    ], work / 'logs' / 'stitched.log')

    stitched = work / 'runs' / 'stitched' / 'last.safetensors'
    times['evaluation'] = run('evaluation', 'timm_stitch.validate', [
        *data_args, '--split', 'test', '--model', 'snnet_vit_fmnist_tsb', '--checkpoint', str(stitched),
        '--stitch-ids', 'all', '--output', str(work / 'validate'), '-b', '500',
    ], work / 'logs' / 'validate.log')

    card = RouteCard.load(work / 'validate' / 'routes.json')
    model.load_state_dict(load_file(stitched))
    model.load_card(card)
    routes = model.routes()
    front = model.pareto('macs', 'top1')
    summary = dict(anchor_top1_before_stitching=anchor_top1,
                   anchor_top1_after_stitching={n: routes[i].top1 for i, (n, _, _) in enumerate(FMNIST_ANCHORS)},
                   pareto_routes=[r.id for r in front], minutes={k: round(v / 60, 2) for k, v in times.items()},
                   total_minutes=round((time.perf_counter() - total) / 60, 2))
    (work / 'summary.json').write_text(json.dumps(summary, indent=2))
    print(timm_stitch.format_route_table(routes, ['Ti', 'S', 'B']))
    print(json.dumps(summary, indent=2))

    if args.ship:
        ship(model, card, anchor_top1)


def ship(model, card: RouteCard, anchor_top1: dict[str, float]) -> None:
    """Write the fp16 weights and the card into the package, and the model card folder."""
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    tmp = SHIPPED_DIR / 'model.safetensors.tmp'
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, tmp, metadata={'format': 'pt'})
    tmp.replace(SHIPPED_DIR / 'model.safetensors')
    card.provenance.append(dict(what='anchor test top-1 before stitching (trained alone)', values=anchor_top1,
                                by='benchmarks/fmnist_pipeline.py'))
    card.save(SHIPPED_DIR / 'routes.json')
    write_card_dir(card, REPO / 'model_cards' / 'snnet_vit_fmnist_tsb')
    print(f'shipped to {SHIPPED_DIR}', flush=True)


if __name__ == '__main__':
    main()
