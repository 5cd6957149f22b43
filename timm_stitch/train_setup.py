"""Everything a training run needs before its first step, built from the parsed arguments by :func:`setup` into a
:class:`TrainRun`: the stitched model (start weights, least-squares init of the stitches), optimizer groups with
their learning-rate scales, EMA, AMP, the route sampler, the data loaders, the loss (with distillation), the
schedule, the output folder and its lock, and the state of a resumed run."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import timm
import torch
import torch.distributed as dist
from timm.data import FastCollateMixup, Mixup, create_loader
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, init_distributed_device, random_seed
from torch import nn

from .checkpoint import load_state, output_lock, publish
from .evaluation import (
    create_image_dataset,
    create_stitched_model,
    data_config_for,
    eval_loader,
    load_weights,
    model_route_ids,
    resolve_amp_dtype,
    resolve_device,
)
from .sampling import RouteSampler
from .train_args import check_args, mixup_active

__all__ = ['TrainRun', 'setup', 'param_groups', 'route_costs']

_logger = logging.getLogger('timm_stitch.train')


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
        load_weights(teacher, args.kd_checkpoint)
    return DistillationLoss(base, teacher, args.kd_type, args.kd_alpha, args.kd_tau).to(device), True


@dataclass
class TrainRun:
    """What :func:`setup` builds for :func:`train_loop`: the model and its training machinery, the data, where the
    run writes, and where it starts (epoch, update count, best metric and kept checkpoints of a resumed run)."""
    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    train_model: nn.Module  # the model, or its DDP wrapper
    model_ema: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    amp_dtype: Optional[torch.dtype]
    loss_scaler: Any
    criterion: nn.Module
    takes_images: bool
    sampler: RouteSampler
    route_ids: list[int]
    loader_train: Any
    mixup_fn: Any
    loader_eval: Any
    val_ids: list[int]
    output_dir: str
    start_epoch: int = 0
    num_updates: int = 0
    best: tuple[Optional[float], Optional[int]] = (None, None)
    history: list[tuple[float, int]] = field(default_factory=list)


def _create_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The stitched model of ``args`` on ``device``, with its start weights, frozen parts and checkpointing."""
    extra: dict[str, Any] = {}
    if args.drop_path is not None:
        extra['drop_path_rate'] = args.drop_path[0] if len(args.drop_path) == 1 else tuple(args.drop_path)
    if args.drop:
        extra['drop_rate'] = args.drop
    if args.pretrained_anchors:
        extra['pretrained_anchors'] = True
    if args.stitch_lora_rank:
        extra.update(stitch_lora_rank=args.stitch_lora_rank, stitch_lora_alpha=args.stitch_lora_alpha)
    model = create_stitched_model(args, **extra)
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.freeze_anchors:
        model.anchors.requires_grad_(False)
    if args.stitch_lora_rank and not (args.stitch_init_samples or args.initial_checkpoint or args.pretrained
                                      or args.resume):
        _logger.warning('--stitch-lora-rank freezes the base weights of the stitching layers, and neither '
                        '--stitch-init-samples nor loaded weights set them: they stay at their random init')
    return model.to(device)


def _create_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer over :func:`param_groups`; sets ``args.lr`` from ``--lr-base`` when not given."""
    if args.lr is None:
        args.lr = _scaled_lr(args)
    opt_kwargs = dict(args.opt_kwargs)
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = args.opt_betas
    return create_optimizer_v2(
        param_groups(model, args.weight_decay, args.stitch_lr_scale, args.anchor_lr_scale),
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)


def _output_dir(args: argparse.Namespace) -> str:
    """The run folder: the folder of ``--resume`` (unless ``--experiment`` names another), else a new one."""
    if args.resume and not args.experiment:
        return args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}"
    return os.path.join(args.output or os.path.join('output', 'train'), name)


def _create_sampler(model: nn.Module, args: argparse.Namespace) -> tuple[RouteSampler, list[int]]:
    """The route sampler and the ids of the routes it draws from."""
    allowed = set(model_route_ids(args.train_routes, model))
    route_ids = [r.id for r in model.plan.routes if r.id in allowed and not (args.freeze_anchors and r.is_anchor)]
    if not route_ids:
        raise ValueError(f'--train-routes {args.train_routes!r} names only anchor routes, which --freeze-anchors '
                         'leaves nothing to train')
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
    return sampler, route_ids


def _create_train_loader(model: nn.Module, args: argparse.Namespace, data_config: dict[str, Any],
                         device: torch.device) -> tuple[Any, Any]:
    """timm's training loader (augmentation, mixup through the prefetcher or a ``Mixup``) and the ``Mixup`` to
    apply in the loop (None when the loader mixes, or without mixup)."""
    dataset = create_image_dataset(args, args.train_split, model.in_chans, is_training=True,
                                   batch_size=args.batch_size, seed=args.seed)
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher
    collate_fn = mixup_fn = None
    if mixup_active(args):
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=model.num_classes)
        if use_prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, interpolation=args.train_interpolation, mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher,
        persistent_workers=False)  # fresh workers each epoch, seeded from the epoch's RNG: exact resume
    if len(loader) == 0:
        raise ValueError(f'the training set ({len(dataset)} images) has less than one batch of '
                         f'{args.batch_size} per rank')
    return loader, mixup_fn


def setup(args: argparse.Namespace, locks: contextlib.ExitStack) -> TrainRun:
    """Check ``args``, start ``torch.distributed`` when launched by torchrun, and build everything the run needs,
    restoring a ``--resume`` checkpoint; the output folder's lock is entered into ``locks`` (rank 0)."""
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

    model = _create_model(args, device)
    data_config = data_config_for(args, model, verbose=primary)
    if args.stitch_init_samples and not args.resume:
        _ls_init(model, args, data_config, device)
    optimizer = _create_optimizer(model, args)
    amp_dtype = resolve_amp_dtype(args)
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)

    # the data before the output folder: a bad dataset or image mode fails before anything is written
    loader_train, mixup_fn = _create_train_loader(model, args, data_config, device)
    val_ids = model_route_ids(args.val_routes, model, allow_none=True)
    loader_eval = None
    if val_ids:
        dataset_eval = create_image_dataset(args, args.val_split, model.in_chans)
        loader_eval = eval_loader(dataset_eval, data_config, args.validation_batch_size or args.batch_size,
                                  args.workers, args.rank, args.world_size, pin_memory=args.pin_mem)
    output_dir = _output_dir(args)
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

    sampler, route_ids = _create_sampler(model, args)
    if state:
        sampler.load_state_dict(state['sampler'])
    train_model: nn.Module = model
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        # each step trains one route: the other routes' parameters get no gradient
        ddp_kwargs = {'broadcast_buffers': False} if args.no_ddp_bb else {}
        train_model = DistributedDataParallel(
            model, device_ids=[device] if device.type == 'cuda' else None, find_unused_parameters=True, **ddp_kwargs)

    criterion, takes_images = _build_criterion(args, mixup_active(args), model.num_classes, device)

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
    return TrainRun(
        args=args, device=device, model=model, train_model=train_model, model_ema=model_ema, optimizer=optimizer,
        lr_scheduler=lr_scheduler, num_epochs=num_epochs, amp_dtype=amp_dtype, loss_scaler=loss_scaler,
        criterion=criterion, takes_images=takes_images, sampler=sampler, route_ids=route_ids,
        loader_train=loader_train, mixup_fn=mixup_fn, loader_eval=loader_eval, val_ids=val_ids,
        output_dir=output_dir, start_epoch=start_epoch, num_updates=state.get('num_updates', 0),
        best=(state.get('best_metric'), state.get('best_epoch')),
        history=[tuple(h) for h in state.get('checkpoint_files', [])])
