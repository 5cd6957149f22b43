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
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

import timm
import torch
import torch.distributed as dist
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (
    ModelEmaV3,
    NativeScaler,
    distribute_bn,
    init_distributed_device,
    random_seed,
    setup_default_logging,
    update_summary,
)
from torch import nn

from ._io import atomic_write
from .checkpoint import keep_history, load_state, output_lock, plain_args, publish, save_checkpoint, trim_summary
from .evaluation import (
    create_image_dataset,
    create_stitched_model,
    eval_loader,
    evaluate_routes,
    parse_ids,
    resolve_amp_dtype,
    resolve_device,
)
from .sampling import RouteSampler
from .train_args import build_parser, check_args, mixup_active, parse_args

__all__ = ['build_parser', 'parse_args', 'main', 'add_parser', 'param_groups', 'save_checkpoint', 'load_state']

_logger = logging.getLogger('timm_stitch.train')


# ---- pieces -------------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float, stitch_lr_scale: float = 1.0,
                 anchor_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: stitching layers and anchors (each with its ``lr_scale``, which timm's schedulers apply),
    each split into decayed and not decayed (1-D params, biases and ``model.no_weight_decay()``)."""
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = OrderedDict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith('.bias') or name in skip
        groups.setdefault((name.startswith('stitch_layers.'), no_decay), []).append(param)
    return [{'params': params, 'weight_decay': 0.0 if no_decay else weight_decay,
             'lr_scale': stitch_lr_scale if stitch else anchor_lr_scale}
            for (stitch, no_decay), params in groups.items()]


def route_costs(model: nn.Module) -> list[float]:
    """Per-route MACs for flops-grouped sampling."""
    return [float(r.macs) for r in model.routes()]


def _scaled_lr(args: argparse.Namespace) -> float:
    """timm's rule: ``lr_base * global_batch / lr_base_size`` (square root of the ratio for adaptive optimizers)."""
    ratio = args.batch_size * args.world_size / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _ls_init(model: nn.Module, args: argparse.Namespace, data_config: dict[str, Any], device: torch.device) -> None:
    """LS init on rank 0 from ``--stitch-init-samples`` clean (eval-transformed) training images, then broadcast."""
    if args.rank == 0:
        dataset = create_image_dataset(args, args.train_split, model.in_chans)
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        loader = eval_loader(dataset, data_config, min(64, args.stitch_init_samples), args.workers,
                             indices=indices[:args.stitch_init_samples].tolist())
        model.init_stitches(loader, mode=args.stitch_init_mode, progress=not args.no_progress)
        _logger.info(f'least-squares init of the stitching layers from {min(len(dataset), args.stitch_init_samples)} '
                     'images')
    if args.distributed:
        for param in model.stitch_layers.parameters():
            dist.broadcast(param.data, 0)


def _build_criterion(args: argparse.Namespace, use_mixup: bool, num_classes: int, device: torch.device
                     ) -> tuple[nn.Module, bool]:
    """Training loss (timm's), wrapped for distillation; returns it and whether it takes the images."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if use_mixup:
        base = SoftTargetCrossEntropy()
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    if not args.kd_model:
        return base.to(device), False
    from .distill import DistillationLoss
    teacher = timm.create_model(args.kd_model, pretrained=args.kd_pretrained and not args.kd_checkpoint,
                                num_classes=num_classes)
    if args.kd_checkpoint:
        timm.models.load_checkpoint(teacher, args.kd_checkpoint)
    return DistillationLoss(base, teacher, args.kd_type, args.kd_alpha, args.kd_tau).to(device), True


def _model_digest(model: nn.Module) -> str:
    import hashlib
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: nn.Module) -> str:
    """The sha256 of ``model``'s state; under ``torch.distributed``, raises ``RuntimeError`` unless every rank has
    the same weights and buffers."""
    digest = _model_digest(model)
    if dist.is_available() and dist.is_initialized():
        digests: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f'the ranks ended with different weights: {digests}')
    return digest


# ---- the loop -----------------------------------------------------------------------------------------------------

def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        takes_images: bool,
        sampler: RouteSampler,
        route_ids: Sequence[int],
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler: Any,
        num_updates: int,
        amp_dtype: Optional[torch.dtype] = None,
        loss_scaler: Any = None,
        model_ema: Optional[nn.Module] = None,
        mixup_fn: Any = None,
) -> tuple[dict[str, float], int]:
    """One epoch, one route per step (drawn by ``sampler``); returns the metrics and the update count."""
    from timm.utils import AverageMeter, dispatch_clip_grad, unwrap_model
    model.train()
    losses, batch_time = AverageMeter(), AverageMeter()
    params = [p for p in model.parameters() if p.requires_grad]
    end = time.time()
    for batch_idx, (images, target) in enumerate(loader):
        images, target = images.to(device), target.to(device)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        stitch_id = route_ids[sampler()]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images, stitch_id=stitch_id)
            loss = criterion(images, output, target) if takes_images else criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params)
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(params, args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=num_updates)
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates)
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
    return OrderedDict(loss=(loss_avg[0] / loss_avg[1].clamp(min=1)).item()), num_updates


def _val_route_ids(text: str, model: nn.Module) -> list[int]:
    if text == 'none':
        return []
    if text == 'anchors':
        return [r.id for r in model.plan.routes if r.is_anchor]
    return parse_ids(text, model.num_routes)


def run(args: argparse.Namespace) -> int:
    """Train with parsed arguments (see :func:`parse_args`)."""
    with contextlib.ExitStack() as locks:
        return _run(args, locks)


def _run(args: argparse.Namespace, locks: contextlib.ExitStack) -> int:
    import yaml

    if not logging.root.handlers:
        setup_default_logging()
    check_args(args)
    args.device = resolve_device(args.device)
    device = init_distributed_device(args)
    primary = args.rank == 0
    if args.aug_repeats and not args.distributed:
        _logger.warning('repeated augmentation (--aug-repeats) needs torchrun with several ranks: turned off')
        args.aug_repeats = 0
    if args.distributed:
        _logger.info(f'rank {args.rank} of {args.world_size} on {device}')
    random_seed(args.seed, args.rank)

    extra: dict[str, Any] = {}
    if args.drop_path is not None:
        extra['drop_path_rate'] = args.drop_path
    if args.drop:
        extra['drop_rate'] = args.drop
    if args.pretrained_anchors:
        extra['pretrained_anchors'] = True
    model = create_stitched_model(args, **extra)
    if args.initial_checkpoint:
        timm.models.load_checkpoint(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.freeze_anchors:
        model.anchors.requires_grad_(False)
    model.to(device)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    if args.stitch_init_samples and not args.resume:
        _ls_init(model, args, data_config, device)

    if args.lr is None:
        args.lr = _scaled_lr(args)
    opt_kwargs = dict(args.opt_kwargs)
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    optimizer = create_optimizer_v2(
        param_groups(model, args.weight_decay, args.stitch_lr_scale, args.anchor_lr_scale),
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)
    amp_dtype = resolve_amp_dtype(args)
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    if args.resume and not args.experiment:
        output_dir = os.path.dirname(os.path.abspath(args.resume)) if not os.path.isdir(args.resume) \
            else args.resume
    else:
        name = args.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}"
        output_dir = os.path.join(args.output or os.path.join('output', 'train'), name)
    if primary:  # one writer per output folder, from before the resume reads it
        locks.enter_context(output_lock(output_dir))
    state: dict[str, Any] = {}
    if args.resume:
        state = load_state(args.resume, model, model_ema.module if model_ema is not None else None)
        if primary and not args.experiment and os.path.islink(os.path.join(output_dir, 'last')):
            publish(output_dir, 'last', state)  # finish what a killed run left between commit and epoch copies
        if not args.no_resume_opt:
            optimizer.load_state_dict(state['optimizer'])
            if loss_scaler is not None and 'amp_scaler' in state:
                loss_scaler.load_state_dict(state['amp_scaler'])
        if primary:
            _logger.info(f"resumed from {args.resume} after epoch {state['epoch']}")
    start_epoch = state['epoch'] + 1 if state else 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    num_updates = state.get('num_updates', 0)

    route_ids = [r.id for r in model.plan.routes if not (args.freeze_anchors and r.is_anchor)]
    costs = None
    if args.route_sampling == 'flops-grouped':
        all_costs = route_costs(model)
        costs = [all_costs[i] for i in route_ids]
    weights = None
    if args.anchor_route_weight != 1.0:
        weights = [args.anchor_route_weight if model.plan.routes[i].is_anchor else 1.0 for i in route_ids]
    sampler = RouteSampler(len(route_ids), args.route_sampling, costs, gap=args.route_group_gap * 1e9,
                           group_k=args.route_group_k, route_weights=weights, sync=args.route_sync, seed=args.seed,
                           rank=args.rank)
    if state:
        sampler.load_state_dict(state['sampler'])

    train_model: nn.Module = model
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        # each step trains one route: the other routes' parameters get no gradient
        ddp_kwargs = {'broadcast_buffers': False} if args.no_ddp_bb else {}
        train_model = DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None, find_unused_parameters=True, **ddp_kwargs)

    dataset_train = create_image_dataset(args, args.train_split, model.in_chans, is_training=True,
                                         batch_size=args.batch_size, seed=args.seed)
    val_ids = _val_route_ids(args.val_routes, model)
    loader_eval = None
    if val_ids:
        dataset_eval = create_image_dataset(args, args.val_split, model.in_chans)
        loader_eval = eval_loader(dataset_eval, data_config, args.validation_batch_size or args.batch_size,
                                  args.workers, args.rank, args.world_size, pin_memory=args.pin_mem)
    use_mixup = mixup_active(args)
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher
    collate_fn = mixup_fn = None
    if use_mixup:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=model.num_classes)
        if use_prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, interpolation=args.train_interpolation, mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher,
        persistent_workers=False)  # fresh workers each epoch, seeded from the epoch's RNG: exact resume
    if len(loader_train) == 0:
        raise ValueError(f'the training set ({len(dataset_train)} images) has less than one batch of '
                         f'{args.batch_size} per rank')
    criterion, takes_images = _build_criterion(args, use_mixup, model.num_classes, device)

    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs,
        patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=len(loader_train))
    if args.sched_on_updates:  # also applies each group's lr_scale from the first step
        lr_scheduler.step_update(start_epoch * len(loader_train))
    else:
        lr_scheduler.step(start_epoch)

    if primary:
        atomic_write(os.path.join(output_dir, 'args.yaml'), yaml.safe_dump(vars(args)))
        trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch - 1)  # epochs this run (re)writes
        _logger.info(f'{model.num_routes} routes, training {len(route_ids)} ({args.route_sampling}, '
                     f'{args.route_sync}); {len(loader_train)} steps per epoch; output in {output_dir}')

    history = [tuple(h) for h in state.get('checkpoint_files', [])]
    best = state.get('best_metric'), state.get('best_epoch')
    decreasing = args.eval_metric == 'loss'
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    stop_epoch = num_epochs if args.stop_epoch is None else min(args.stop_epoch, num_epochs)
    for epoch in range(start_epoch, stop_epoch):
        random_seed(args.seed + 100_003 * epoch, args.rank)
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        if use_mixup and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            if mixup_fn is not None:
                mixup_fn.mixup_enabled = False
            elif hasattr(loader_train, 'mixup_enabled'):
                loader_train.mixup_enabled = False
        train_metrics, num_updates = train_one_epoch(
            epoch, train_model, loader_train, optimizer, criterion, takes_images, sampler, route_ids, args, device,
            lr_scheduler, num_updates, amp_dtype, loss_scaler, model_ema, mixup_fn)
        if args.distributed and args.dist_bn and has_bn:
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics: dict[str, float] = OrderedDict()
        if loader_eval is not None:
            results = evaluate_routes(model, loader_eval, val_ids, device, amp_dtype,
                                      progress=primary and not args.no_progress)
            for key in ('loss', 'top1', 'top5'):
                eval_metrics[key] = sum(r[key] for r in results.values()) / len(results)
            if primary:
                _logger.info('Eval: ' + ', '.join(f"route {k} top1 {r['top1']:.2f} top5 {r['top5']:.2f}"
                                                 for k, r in results.items()))
        metric = eval_metrics.get(args.eval_metric)
        lr_scheduler.step(epoch + 1, metric)
        if primary:
            lrs = [g['lr'] for g in optimizer.param_groups]
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                           lr=sum(lrs) / len(lrs))
            ckpt_state = {
                'epoch': epoch, 'num_updates': num_updates, 'arch': args.model, 'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(), 'sampler': sampler.state_dict(), 'metric': metric,
                'args': plain_args(vars(args)), 'version': 2}
            if loss_scaler is not None:
                ckpt_state['amp_scaler'] = loss_scaler.state_dict()
            if metric is not None:
                is_better = best[0] is None or (metric < best[0] if decreasing else metric > best[0])
                best = (metric, epoch) if is_better else best
            if metric is not None:
                history = keep_history(history, metric, epoch, args.checkpoint_hist, decreasing)
            ckpt_state.update(best_metric=best[0], best_epoch=best[1], checkpoint_files=history)
            save_checkpoint(os.path.join(output_dir, 'last'), model, ckpt_state,
                            model_ema.module if model_ema is not None else None)
    digest = check_ranks_agree(model)
    if primary:
        ranks = f'identical on {args.world_size} ranks, ' if args.distributed else ''
        best_text = 'none (no evaluation)' if best[0] is None else f'{best[0]:.4g} (epoch {best[1]})'
        _logger.info(f'done: weights {ranks}sha256 {digest[:16]}; best {args.eval_metric} {best_text}')
    if args.distributed:
        dist.destroy_process_group()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch train``: the same arguments as ``python -m timm_stitch.train``."""
    parent = build_parser(add_help=False)
    for action in parent._actions:  # keep only what the command line gives, so the config file can fill the rest
        action.default = argparse.SUPPRESS
    p = subparsers.add_parser('train', help='train a stitched network (torchrun-ready)', parents=[parent],
                              description=__doc__.split('\n')[0])
    p.set_defaults(func=_run_subcommand)


def _run_subcommand(namespace: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(namespace).items() if k not in ('command', 'func')}
    args = parse_args(['-c', given['config']] if given.get('config') else [])
    vars(args).update(given)
    return run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == '__main__':
    raise SystemExit(main())
