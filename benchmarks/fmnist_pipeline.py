"""Rebuild the shipped Fashion-MNIST SN-Net from scratch: anchors, stitching, evaluation, card, plot.

    .venv/bin/python benchmarks/fmnist_pipeline.py --work /tmp/fmnist            # everything (~80 min on 2 CPU cores)
    .venv/bin/python benchmarks/fmnist_pipeline.py --work /tmp/fmnist --ship     # ... and replace the shipped files
    .venv/bin/python benchmarks/fmnist_pipeline.py --work /tmp/smoke --subset 2000 --anchor-epochs 1 1 1

A stage whose output already exists in ``--work`` is reused, so an interrupted run picks up where it stopped.

Stages, each with the project's own trainer/validator (``timm_stitch.train`` / ``timm_stitch.validate``):
1. Fashion-MNIST laid out for timm (Debian's ``dataset-fashion-mnist``, or ``--source`` IDX folder).
2. Each anchor (``vit_fmnist_tiny/small/base``) trained from scratch, alone.
3. The anchors assembled into ``snnet_vit_fmnist_tsb``, its stitching layers least-squares initialised, then the
   whole network trained 12 epochs, one route per step (stitching layers at 1e-3, anchors at 1e-4; each anchor
   route drawn 3x as often as a stitched one, which keeps the anchors within 0.5 points of their own accuracy).
   ``--from-shipped`` skips stages 2 and 3 and starts from the shipped weights instead.
4. Refinement of the Ti->S segment (``--refine-epochs``): only the 16 Ti->S routes are drawn, with soft
   distillation from anchor B (stitching layers at 1e-3, anchors at 3e-5). Without it no Ti->S route beats Ti
   (Ti and S are only 1.2 points apart); anchor routes are not drawn, so the anchors barely move.
5. Every route evaluated on the 10k test images; the route card (measured top-1, MACs, params) and the
   MACs-accuracy plot written; with ``--ship`` the fp16 weights and card replace the ones in the package.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

import timm_stitch
from timm_stitch._io import atomic_path
from timm_stitch.card_readme import write_card_dir
from timm_stitch.cards import RouteCard
from timm_stitch.data import (
    GreyImageDataset,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    prepare_fashion_mnist,
    write_idx,
)
from timm_stitch.data.fashion_mnist import SAMPLE_FILE
from timm_stitch.evaluation import eval_loader, evaluate_routes
from timm_stitch.models.snnet_vit_fmnist import FMNIST_ANCHORS, SHIPPED_DIR

REPO = Path(__file__).resolve().parents[1]
COMMON = ['--dataset', 'torch/fashion_mnist', '--workers', '1', '--no-progress']
ANCHOR_TOP1_ALONE = 'anchor test top-1 before stitching (each trained alone)'
#: ids of the Ti->S stitched routes (anchors 0-2 come first, then Ti->S, then S->B)
TI_S_ROUTES = '3-18'
TRAIN = ['--log-interval', '200', '--train-split', 'train', '--val-split', 'test', '--no-aug', '--hflip', '0',
         '--smoothing', '0.1', '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine', '--sched-on-updates',
         '--min-lr', '1e-5', '-b', '128']


def write_subset(source: Path | None, out: Path, n_train: int) -> Path:
    """IDX files holding the first ``n_train`` training and ``n_train // 4`` test images (for smoke runs)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (('train', n_train), ('t10k', n_train // 4)):
        images, labels = load_fashion_mnist('train' if split == 'train' else 'test', source)
        write_idx(out / f'{split}-images-idx3-ubyte.gz', images[:n])
        write_idx(out / f'{split}-labels-idx1-ubyte.gz', labels[:n])
    return out


def run(stage: str, module: str, args: list[str], work: Path, output: Path) -> None:
    """Run ``python -m module args`` (log in ``work/logs/{stage}.log``) unless ``output`` exists; its wall time
    goes to ``work/minutes.json`` so that a resumed run still reports every stage."""
    times_file = work / 'minutes.json'
    if output.exists():
        print(f'[{stage}] reusing {output}', flush=True)
        return
    print(f'[{stage}] python -m {module} {" ".join(args)}', flush=True)
    log = work / 'logs' / f'{stage}.log'
    start = time.perf_counter()
    command = [sys.executable, '-m', module, *args]
    with open(log, 'w', buffering=1) as f, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                            text=True, cwd=REPO) as process:
        for line in process.stdout:  # everything to the log, each epoch's evaluation to the console
            f.write(line)
            if line.startswith(('Eval:', 'done:')):
                print(f'[{stage}] {line}', end='', flush=True)
    if process.returncode:
        raise SystemExit(f'[{stage}] failed (exit {process.returncode}); see {log}:\n' + log.read_text()[-3000:])
    minutes = (time.perf_counter() - start) / 60
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    times_file.write_text(json.dumps({**times, stage: round(minutes, 2)}, indent=2))
    print(f'[{stage}] done in {minutes:.1f} min', flush=True)


def last_top1(log: Path) -> float:
    """The last ``Eval: route 0 top1 X`` the trainer logged."""
    lines = [line for line in log.read_text().splitlines() if line.startswith('Eval: route 0 top1')]
    return float(lines[-1].split()[4])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', type=Path, required=True, help='working folder (data, runs, logs)')
    parser.add_argument('--source', type=Path, default=None, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('--subset', type=int, default=None, help='train on the first N images only (smoke runs)')
    parser.add_argument('--anchor-epochs', type=int, nargs=3, default=[10, 10, 10], metavar=('TI', 'S', 'B'))
    parser.add_argument('--stitch-epochs', type=int, default=12)
    parser.add_argument('--stitch-lr', type=float, default=1e-4, help='stitched training: base learning rate')
    parser.add_argument('--stitch-lr-scale', type=float, default=10.0, help='... times this for stitching layers')
    parser.add_argument('--anchor-lr-scale', type=float, default=1.0, help='... times this for the anchors')
    parser.add_argument('--anchor-route-weight', type=float, default=3.0,
                        help='stitched training: draw anchor routes this many times as often as stitched ones')
    parser.add_argument('--kd-alpha', type=float, default=0.0,
                        help='weight of soft distillation from the largest anchor in stitched training (0: none)')
    parser.add_argument('--refine-epochs', type=int, default=6,
                        help='refinement of the Ti->S routes after stitched training (0: none)')
    parser.add_argument('--refine-kd-alpha', type=float, default=0.5,
                        help='refinement: weight of soft distillation from anchor B')
    parser.add_argument('--from-shipped', action='store_true',
                        help='skip stages 2-3: start the refinement from the shipped weights (and their card\'s '
                        'anchor accuracies trained alone)')
    parser.add_argument('--ship', action='store_true', help='write the fp16 weights and card into the package')
    args = parser.parse_args(argv)
    if args.ship and args.subset:
        parser.error('--ship publishes accuracy measured on the full test split: drop --subset')
    work = args.work.resolve()
    (work / 'logs').mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    source = write_subset(args.source, work / 'subset', args.subset) if args.subset else args.source
    data = prepare_fashion_mnist(work / 'data', source)
    data_args = ['--data-dir', str(data), *COMMON]
    runs = work / 'runs'

    model = timm.create_model('snnet_vit_fmnist_tsb')
    if args.from_shipped:
        stitched, anchor_top1 = shipped_start(work)
    else:
        stitched, anchor_top1 = train_stitched(args, model, work, data_args, runs)
    if args.refine_epochs:  # the Ti->S routes alone, distilled from anchor B; anchor routes are not drawn
        distill = distill_from_base(stitched, work / 'teacher_refine.safetensors', args.refine_kd_alpha)
        run('refine', 'timm_stitch.train', [
            *data_args, *TRAIN, '--model', 'snnet_vit_fmnist_tsb', '--initial-checkpoint', str(stitched),
            '--train-routes', TI_S_ROUTES, '--epochs', str(args.refine_epochs), '--lr', '1e-4',
            '--stitch-lr-scale', '10', '--anchor-lr-scale', '0.3', '--warmup-epochs', '0', *distill,
            '--val-routes', 'none',
            '--out', str(runs), '--experiment', 'refined',
        ], work, runs / 'refined' / 'last.safetensors')
        stitched = runs / 'refined' / 'last.safetensors'

    # the card is measured on the weights exactly as shipped: fp16, loaded into the fp32 model
    shipped = work / 'model.safetensors'
    if not shipped.exists():
        write_fp16(stitched, shipped)
    run('evaluation', 'timm_stitch.validate', [
        *data_args, '--split', 'test', '--model', 'snnet_vit_fmnist_tsb', '--checkpoint', str(shipped),
        '--routes', 'all', '--out', str(work / 'evaluation'), '-b', '500',
    ], work, work / 'evaluation' / 'routes.json')

    model.load_state_dict(load_file(shipped))
    card = RouteCard.load(work / 'evaluation' / 'routes.json')
    card.provenance.append(dict(what=ANCHOR_TOP1_ALONE, values=anchor_top1,
                                by='benchmarks/fmnist_pipeline.py'))
    minutes = json.loads((work / 'minutes.json').read_text())
    card.provenance.append(dict(what='training and evaluation wall minutes per stage (2 CPU cores)', values=minutes,
                                by='benchmarks/fmnist_pipeline.py'
                                + (' --from-shipped (stages 2-3: the previously shipped weights)'
                                   if args.from_shipped else '')))
    card.provenance.append(dict(what=f'top-1 on the shipped test sample ({SAMPLE_FILE.name})',
                                values=sample_top1(model), by='benchmarks/fmnist_pipeline.py'))
    model.load_card(card)
    routes = model.routes()
    front = model.pareto('macs', 'top1')
    write_card_dir(card, work / 'card')
    summary = dict(anchor_top1_before_stitching=anchor_top1,
                   anchor_top1_after_stitching={n: routes[i].top1 for i, (n, _, _) in enumerate(FMNIST_ANCHORS)},
                   pareto_routes=[r.id for r in front], minutes=minutes,
                   total_minutes=round(sum(minutes.values()), 2),
                   minutes_this_run=round((time.perf_counter() - start) / 60, 2))
    (work / 'summary.json').write_text(json.dumps(summary, indent=2))
    print(timm_stitch.format_route_table(routes, ['Ti', 'S', 'B']))
    print(json.dumps(summary, indent=2))
    print(f'card and plot in {work / "card"}', flush=True)

    if args.ship:
        ship(shipped, card)



def train_stitched(args: argparse.Namespace, model, work: Path, data_args: list[str], runs: Path
                   ) -> tuple[Path, dict[str, float]]:
    """Stages 2 and 3: each anchor trained alone, then the stitched network; its weights and the anchors' top-1."""
    anchor_top1 = {}
    for (name, _, _), epochs in zip(FMNIST_ANCHORS, args.anchor_epochs):
        run(name, 'timm_stitch.train', [
            *data_args, *TRAIN, '--model', 'snnet', '--anchors', name, '--epochs', str(epochs), '--lr', '1e-3',
            '--warmup-epochs', '1', '--warmup-lr', '1e-4', '--out', str(runs), '--experiment', name,
        ], work, runs / name / 'last.safetensors')
        anchor_top1[name] = last_top1(work / 'logs' / f'{name}.log')
        print(f'[{name}] test top-1 {anchor_top1[name]:.2f}', flush=True)

    # assemble the stitched network from the trained anchors (single-anchor runs store them as anchors.0.*)
    for i, (name, _, _) in enumerate(FMNIST_ANCHORS):
        weights = load_file(runs / name / 'last.safetensors')
        model.anchors[i].load_state_dict({k.removeprefix('anchors.0.'): v for k, v in weights.items()})
    init = work / 'stitched_init.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init)
    # soft distillation from the largest anchor, trained alone
    distill = distill_from_base(init, work / 'teacher.safetensors', args.kd_alpha) if args.kd_alpha > 0 else []

    # LS init, then the whole network trained, one sampled route per step
    run('stitching', 'timm_stitch.train', [
        *data_args, *TRAIN, '--model', 'snnet_vit_fmnist_tsb', '--initial-checkpoint', str(init),
        '--stitch-init-samples', '2000', '--route-sampling', 'uniform', '--epochs', str(args.stitch_epochs),
        '--lr', str(args.stitch_lr), '--stitch-lr-scale', str(args.stitch_lr_scale), '--anchor-lr-scale',
        str(args.anchor_lr_scale), '--anchor-route-weight', str(args.anchor_route_weight), '--warmup-epochs', '0',
        *distill, '--val-routes', '0-2,3,13,19,32',
        '--out', str(runs), '--experiment', 'stitched',
    ], work, runs / 'stitched' / 'last.safetensors')

    return runs / 'stitched' / 'last.safetensors', anchor_top1


def shipped_start(work: Path) -> tuple[Path, dict[str, float]]:
    """The shipped weights (fp32) as stage 3's output, and its card's anchor top-1 trained alone."""
    card = RouteCard.load(SHIPPED_DIR / 'routes.json')
    alone = next(p['values'] for p in card.provenance if p.get('what') == ANCHOR_TOP1_ALONE)
    return shipped_fp32(work / 'shipped_start.safetensors'), alone


def shipped_fp32(out: Path) -> Path:
    """The shipped fp16 weights as an fp32 checkpoint (the trainer's ``--initial-checkpoint``), written once."""
    if not out.exists():
        save_file({k: (v.float() if v.is_floating_point() else v).contiguous()
                   for k, v in load_file(SHIPPED_DIR / 'model.safetensors').items()}, out)
    return out


def distill_from_base(weights: Path, teacher: Path, alpha: float) -> list[str]:
    """Trainer arguments for soft distillation (weight ``alpha``) from anchor B of the stitched ``weights``, whose
    B is saved once to ``teacher``."""
    if not teacher.exists():
        model = timm.create_model('snnet_vit_fmnist_tsb')
        model.load_state_dict(load_file(weights))
        save_file({k: v.contiguous() for k, v in model.anchors[-1].state_dict().items()}, teacher)
    return ['--kd-model', FMNIST_ANCHORS[-1][0], '--kd-checkpoint', str(teacher), '--kd-type', 'soft',
            '--kd-alpha', str(alpha)]

def write_fp16(checkpoint: Path, out: Path) -> None:
    """``checkpoint`` with its floating-point tensors in fp16 (3.3 MB instead of 6.6 MB)."""
    with atomic_path(out) as tmp:
        save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in load_file(checkpoint).items()}, tmp, metadata={'format': 'pt'})


def sample_top1(model) -> dict[str, float]:
    """Top-1 of every route on the shipped 1,000-image test sample, which the test suite checks against."""
    loader = eval_loader(GreyImageDataset(*load_fashion_mnist_sample()), resolve_data_config(model=model), 250)
    results = evaluate_routes(model, loader, range(model.num_routes), torch.device('cpu'), progress=False)
    return {str(k): v['top1'] for k, v in results.items()}


def ship(weights: Path, card: RouteCard) -> None:
    """Copy the fp16 weights and the card into the package, and write the model card folder."""
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(SHIPPED_DIR / 'model.safetensors') as tmp:
        shutil.copyfile(weights, tmp)
    card.save(SHIPPED_DIR / 'routes.json')
    write_card_dir(card, REPO / 'model_cards' / 'snnet_vit_fmnist_tsb')
    print(f'shipped to {SHIPPED_DIR}', flush=True)


if __name__ == '__main__':
    main()
