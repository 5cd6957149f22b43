"""Train a stitched network on timm's machinery: ``python -m timm_stitch.train``, ``torchrun -m timm_stitch.train``
or ``timm-stitch train``.

Arguments follow timm's ``train.py`` (names and defaults) where they apply, plus SN-Net's: least-squares init of the
stitching layers, separate learning-rate scales for stitches and anchors, the route sampler (one route per step,
the same on every rank by default) and distillation from a timm teacher. ``-c/--config`` takes a YAML file of
argument defaults (``timm_stitch/configs/*.yaml`` holds the official recipes). Checkpoints are ``.safetensors``
weights beside a ``.state.pth`` training state (optimizer, scheduler, epoch, step, route sampler, AMP scaler),
committed together as one unit (see :mod:`timm_stitch.checkpoint`); a run holds a lock on its output folder, so a
second run writing there is refused. ``--resume`` continues a run where it stopped, however it stopped (even killed
mid-write): each epoch re-seeds every RNG from (seed, epoch, rank), so a resumed run repeats the uninterrupted one.

A run is :func:`~timm_stitch.train_setup.setup` (everything built from the arguments into a ``TrainRun``), then
:func:`train_loop` (the epochs: train, validate, checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from timm.utils import distribute_bn, random_seed, setup_default_logging, update_summary
from torch import nn

from ._io import atomic_write, full_disk_named
from .checkpoint import keep_history, load_state, plain_args, save_checkpoint, trim_summary
from .evaluation import evaluate_routes
from .fingerprint import weights_fingerprint
from .train_args import build_parser, mixup_active, parse_args
from .train_setup import TrainRun, param_groups, setup

__all__ = ['build_parser', 'parse_args', 'main', 'run', 'setup', 'train_loop', 'train_one_epoch',
           'param_groups', 'save_checkpoint', 'load_state']

_logger = logging.getLogger('timm_stitch.train')


def check_ranks_agree(model: nn.Module) -> str:
    """The fingerprint of ``model``'s weights and buffers; under ``torch.distributed``, raises ``RuntimeError``
    unless every rank has the same."""
    digest = weights_fingerprint(model, length=64)
    if dist.is_available() and dist.is_initialized():
        digests: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f'the ranks ended with different weights: {digests}')
    return digest


# ---- the loop -----------------------------------------------------------------------------------------------------

def train_one_epoch(run: TrainRun, epoch: int) -> dict[str, float]:
    """One epoch of ``run``, one route per step (drawn by its sampler); advances ``run.num_updates`` and returns
    the metrics (the mean loss over every rank)."""
    from timm.utils import AverageMeter, dispatch_clip_grad, unwrap_model
    args, model, loader, optimizer, device = run.args, run.train_model, run.loader_train, run.optimizer, run.device
    model.train()
    losses, batch_time = AverageMeter(), AverageMeter()
    params = [p for p in model.parameters() if p.requires_grad]
    end = time.time()
    for batch_idx, (images, target) in enumerate(loader):
        images, target = images.to(device), target.to(device)
        if run.mixup_fn is not None:
            images, target = run.mixup_fn(images, target)
        stitch_id = run.route_ids[run.sampler()]
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            output = model(images, stitch_id=stitch_id)
            loss = run.criterion(images, output, target) if run.takes_images else run.criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if run.loss_scaler is not None:
            run.loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params)
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(params, args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        run.num_updates += 1
        if run.model_ema is not None:
            run.model_ema.update(unwrap_model(model), step=run.num_updates)
        if args.sched_on_updates:
            run.lr_scheduler.step_update(run.num_updates)
        losses.update(loss.item(), images.shape[0])
        batch_time.update(time.time() - end)
        end = time.time()
        if args.rank == 0 and (batch_idx % args.log_interval == 0 or batch_idx == len(loader) - 1):
            lr = optimizer.param_groups[0]['lr']
            _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{len(loader)}] route {stitch_id:>3d} '
                         f'loss {losses.val:#.3g} ({losses.avg:#.3g}) '
                         f'time {batch_time.val:.3f}s ({args.batch_size * args.world_size / batch_time.avg:.1f}/s) '
                         f'lr {lr:.3e}')
    loss_avg = torch.tensor([losses.sum, losses.count], dtype=torch.float64, device=device)
    if args.distributed:
        dist.all_reduce(loss_avg)
    return OrderedDict(loss=(loss_avg[0] / loss_avg[1].clamp(min=1)).item())


def _evaluate(run: TrainRun) -> dict[str, float]:
    """The mean loss/top-1/top-5 of the validated routes (empty without ``--val-routes``), logged per route."""
    metrics: dict[str, float] = OrderedDict()
    if run.loader_eval is None:
        return metrics
    primary = run.args.rank == 0
    results = evaluate_routes(run.model, run.loader_eval, run.val_ids, run.device, run.amp_dtype,
                              progress=primary and not run.args.no_progress)
    for key in ('loss', 'top1', 'top5'):
        metrics[key] = sum(r[key] for r in results.values()) / len(results)
    if primary:
        _logger.info('Eval: ' + ', '.join(f"route {k} top1 {r['top1']:.2f} top5 {r['top5']:.2f}"
                                         for k, r in results.items()))
    return metrics


def _save_epoch(run: TrainRun, epoch: int, metric: Optional[float]) -> None:
    """Update the best metric and the kept epochs, then commit this epoch's checkpoint (rank 0)."""
    args = run.args
    decreasing = args.eval_metric == 'loss'
    if metric is not None:
        best_metric = run.best[0]
        if best_metric is None or (metric < best_metric if decreasing else metric > best_metric):
            run.best = (metric, epoch)
        run.history = keep_history(run.history, metric, epoch, args.checkpoint_hist, decreasing)
    state = {
        'epoch': epoch, 'num_updates': run.num_updates, 'arch': args.model, 'optimizer': run.optimizer.state_dict(),
        'lr_scheduler': run.lr_scheduler.state_dict(), 'sampler': run.sampler.state_dict(), 'metric': metric,
        'args': plain_args(vars(args)), 'version': 2, 'best_metric': run.best[0], 'best_epoch': run.best[1],
        'checkpoint_files': run.history}
    if run.loss_scaler is not None:
        state['amp_scaler'] = run.loss_scaler.state_dict()
    save_checkpoint(os.path.join(run.output_dir, 'last'), run.model, state,
                    run.model_ema.module if run.model_ema is not None else None)


def train_loop(run: TrainRun) -> str:
    """Train from ``run.start_epoch`` to ``--stop-epoch`` (or the schedule's end): each epoch trains, syncs the
    BatchNorm statistics across ranks, validates, steps the schedule and (rank 0) writes the summary row and the
    checkpoint. Returns the fingerprint of the final weights, checked equal on every rank."""
    args, model = run.args, run.model
    primary = args.rank == 0
    summary = os.path.join(run.output_dir, 'summary.csv')
    if primary:
        atomic_write(os.path.join(run.output_dir, 'args.yaml'), yaml.safe_dump(vars(args)))
        trim_summary(summary, run.start_epoch - 1)  # epochs this run (re)writes
        _logger.info(f'{model.num_routes} routes, training {len(run.route_ids)} ({args.route_sampling}, '
                     f'{args.route_sync}); {len(run.loader_train)} steps per epoch; output in {run.output_dir}')
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    stop_epoch = run.num_epochs if args.stop_epoch is None else min(args.stop_epoch, run.num_epochs)
    for epoch in range(run.start_epoch, stop_epoch):
        random_seed(args.seed + 100_003 * epoch, args.rank)
        if args.distributed and hasattr(run.loader_train.sampler, 'set_epoch'):
            run.loader_train.sampler.set_epoch(epoch)
        if mixup_active(args) and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            if run.mixup_fn is not None:
                run.mixup_fn.mixup_enabled = False
            elif hasattr(run.loader_train, 'mixup_enabled'):
                run.loader_train.mixup_enabled = False
        train_metrics = train_one_epoch(run, epoch)
        if args.distributed and args.dist_bn and has_bn:
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = _evaluate(run)
        metric = eval_metrics.get(args.eval_metric)
        run.lr_scheduler.step(epoch + 1, metric)
        if primary:
            lrs = [g['lr'] for g in run.optimizer.param_groups]
            with full_disk_named(summary):
                update_summary(epoch, train_metrics, eval_metrics, summary, lr=sum(lrs) / len(lrs))
            _save_epoch(run, epoch, metric)
    return check_ranks_agree(model)


def run(args: argparse.Namespace) -> int:
    """Train with parsed arguments (see :func:`parse_args`): :func:`setup`, then :func:`train_loop`."""
    if not logging.root.handlers:
        setup_default_logging()
    with contextlib.ExitStack() as locks:
        train_run = setup(args, locks)
        digest = train_loop(train_run)
        if args.rank == 0:
            ranks = f'identical on {args.world_size} ranks, ' if args.distributed else ''
            best, epoch = train_run.best
            best_text = 'none (no evaluation)' if best is None else f'{best:.4g} (epoch {epoch})'
            _logger.info(f'done: weights {ranks}fingerprint {digest[:16]}; best {args.eval_metric} {best_text}')
    if args.distributed:
        dist.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == '__main__':
    raise SystemExit(main())
