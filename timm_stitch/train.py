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
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
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

from .cards import atomic_write
from .checkpoint import keep_history, load_state, output_lock, plain_args, publish, save_checkpoint, trim_summary
from .sampling import SAMPLING_MODES, SYNC_MODES, RouteSampler
from .validate import check_data_dir, create_stitched_model, eval_loader, evaluate_routes, parse_ids, resolve_device

__all__ = ['build_parser', 'parse_args', 'main', 'add_parser', 'param_groups', 'save_checkpoint', 'load_state']

_logger = logging.getLogger('timm_stitch.train')


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training arguments (timm ``train.py`` names and defaults, then the stitching ones)."""
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(prog='timm-stitch train', description=__doc__.split('\n')[0], add_help=add_help)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of argument defaults')
    g = p.add_argument_group('dataset')
    g.add_argument('--data-dir', default=None, help='dataset root (an ImageFolder, or what --dataset expects)')
    g.add_argument('--dataset', default='', help='timm dataset type/name (default: folder)')
    g.add_argument('--train-split', default='train', help='training split (default: train)')
    g.add_argument('--val-split', default='validation', help='validation split (default: validation)')
    g.add_argument('--dataset-download', action='store_true', help='allow download of the dataset (torch/ types)')
    g.add_argument('--class-map', default='', help='path to a class to index mapping file')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, help='snnet_* architecture, or snnet with --anchors')
    g.add_argument('--anchors', default=None, help='comma-separated timm anchor names for --model snnet')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs')
    g.add_argument('--pretrained', action='store_true', help="start from --model's pretrained stitched weights")
    g.add_argument('--pretrained-anchors', action='store_true', help="start from each anchor's timm weights")
    g.add_argument('--initial-checkpoint', default='', help='weights to start from (.safetensors or .pth)')
    g.add_argument('--resume', default='', help='resume from a .state.pth (or its .safetensors, or the output dir)')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer when resuming')
    g.add_argument('--num-classes', type=int, default=None, help='number of classes')
    g.add_argument('--img-size', type=int, default=None, help='input image size')
    g.add_argument('--crop-pct', type=float, default=None, help='validation center crop fraction')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='pixel mean')
    g.add_argument('--std', type=float, nargs='+', default=None, help='pixel std')
    g.add_argument('--interpolation', default='', help='validation resize interpolation')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='batch size per rank (default: 128)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, help='validation batch size')
    g.add_argument('--grad-checkpointing', action='store_true', help='gradient checkpointing through the blocks')
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd', help='optimizer (default: sgd)')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='optimizer momentum (default: 0.9)')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (default: none)')
    g.add_argument('--clip-mode', default='norm', help="'norm', 'value' or 'agc'")
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra optimizer kwargs')
    g = p.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='cosine', help='scheduler (default: cosine)')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule per update, not per epoch')
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: --lr-base scaled by batch)')
    g.add_argument('--lr-base', type=float, default=0.1, help='base lr for --lr-base-size (default: 0.1)')
    g.add_argument('--lr-base-size', type=int, default=256, help='batch size of --lr-base (default: 256)')
    g.add_argument('--lr-base-scale', default='', help="'linear' or 'sqrt' (default: by optimizer)")
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='warmup learning rate (default: 1e-5)')
    g.add_argument('--min-lr', type=float, default=0, help='lower lr bound (default: 0)')
    g.add_argument('--epochs', type=int, default=300, help='epochs (default: 300)')
    g.add_argument('--start-epoch', type=int, default=None, help='epoch to start from (default: 0 or resumed)')
    g.add_argument('--stop-epoch', type=int, default=None,
                   help='stop before this epoch, schedule unchanged (time-limited jobs; --resume continues)')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], help='multistep milestones')
    g.add_argument('--decay-epochs', type=float, default=90, help='epochs between lr decays (step)')
    g.add_argument('--warmup-epochs', type=int, default=5, help='warmup epochs (default: 5)')
    g.add_argument('--warmup-prefix', action='store_true', help='warmup outside the decay schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at min lr after the schedule')
    g.add_argument('--patience-epochs', type=int, default=10, help='plateau patience')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, help='lr decay rate')
    g = p.add_argument_group('augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], help='random resized crop scale')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], help='random resized crop ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='color jitter factor (default: 0.4)')
    g.add_argument('--aa', default=None, help="AutoAugment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    g.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation count (distributed)')
    g.add_argument('--reprob', type=float, default=0., help='random erase probability')
    g.add_argument('--remode', default='pixel', help="random erase mode (default: 'pixel')")
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (enabled if > 0)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (enabled if > 0)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', help="'batch', 'pair' or 'elem'")
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup off from this epoch (0: never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    g.add_argument('--train-interpolation', default='random', help="training interpolation (default: 'random')")
    g.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, help='drop path rate of every anchor')
    g = p.add_argument_group('EMA and precision')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights')
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    g.add_argument('--model-ema-warmup', action='store_true', help='EMA decay warmup')
    g.add_argument('--amp', action='store_true', help='mixed precision training')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='autocast dtype')
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    g.add_argument('--log-interval', type=int, default=50, help='batches between log lines (default: 50)')
    g.add_argument('--checkpoint-hist', type=int, default=10, help='epoch checkpoints kept (default: 10)')
    g.add_argument('-j', '--workers', type=int, default=4, help='data loading workers per rank (default: 4)')
    g.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loaders')
    g.add_argument('--no-prefetcher', action='store_true', help="disable timm's CUDA prefetcher")
    g.add_argument('--output', default='', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', help='run folder name under --output')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'), help='checkpoint metric')
    g.add_argument('--device', default=None, help='device (default: cuda if available, else cpu)')
    g.add_argument('--dist-backend', default=None, help='torch.distributed backend (default: by device)')
    g.add_argument('--dist-url', default='env://', help='torch.distributed init url')
    g.add_argument('--dist-bn', default='reduce', choices=('broadcast', 'reduce', ''),
                   help='sync BatchNorm statistics across ranks after each epoch')
    g.add_argument('--no-ddp-bb', action='store_true', help='DDP without broadcast_buffers')
    g.add_argument('--no-progress', action='store_true', help='hide progress bars')
    g = p.add_argument_group('stitching')
    g.add_argument('--stitch-init-samples', type=int, default=0,
                   help='least-squares init of the stitching layers from this many clean training images (0: off)')
    g.add_argument('--stitch-init-mode', default='joint', choices=('joint', 'average'),
                   help="LS init: one solve per shared layer ('joint') or averaged per-position solves (official)")
    g.add_argument('--stitch-lr-scale', type=float, default=1.0, help='lr multiplier of the stitching layers')
    g.add_argument('--anchor-lr-scale', type=float, default=1.0, help='lr multiplier of the anchors')
    g.add_argument('--freeze-anchors', action='store_true', help='train the stitching layers only')
    g.add_argument('--route-sampling', default='uniform', choices=SAMPLING_MODES, help='route of each step')
    g.add_argument('--route-group-gap', type=float, default=1.0, help='flops-grouped: group width in GMACs')
    g.add_argument('--route-group-k', type=float, default=None, help='flops-grouped: group weights i/k + 1/G')
    g.add_argument('--anchor-route-weight', type=float, default=1.0,
                   help='how much more often an anchor route is drawn than a stitched one (default: 1, uniform)')
    g.add_argument('--route-sync', default='synced', choices=SYNC_MODES,
                   help="'synced': one route per step on every rank; 'per-rank': each its own (official)")
    g.add_argument('--val-routes', default='anchors',
                   help="routes validated each epoch: 'anchors', 'all', 'none' or ids like '0,3,5-9'")
    g.add_argument('--kd-model', default='', help='timm teacher model for distillation (e.g. regnety_160)')
    g.add_argument('--kd-checkpoint', default='', help='teacher weights file')
    g.add_argument('--kd-pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help="load the teacher's timm pretrained weights (default: yes)")
    g.add_argument('--kd-type', default='hard', choices=('hard', 'soft'), help='distillation type')
    g.add_argument('--kd-alpha', type=float, default=0.5, help='weight of the distillation term (default: 0.5)')
    g.add_argument('--kd-tau', type=float, default=1.0, help='soft distillation temperature (default: 1)')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; a ``-c/--config`` YAML file supplies defaults that the command line overrides."""
    import yaml
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    config, _ = pre.parse_known_args(argv)
    if config.config:
        if not os.path.isfile(config.config):
            raise FileNotFoundError(f'config file {config.config!r} does not exist')
        with open(config.config) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'{config.config}: unknown options {unknown}')
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for missing or contradicting arguments."""
    if not args.model:
        raise ValueError('--model is required (an snnet_* architecture, or snnet with --anchors)')
    check_data_dir(args)
    if args.pretrained and args.pretrained_anchors:
        raise ValueError('--pretrained (stitched weights) and --pretrained-anchors (anchor weights) contradict')
    if args.resume and args.initial_checkpoint:
        raise ValueError('--resume and --initial-checkpoint contradict: resume restores the weights')
    if args.freeze_anchors and args.anchor_lr_scale != 1.0:
        raise ValueError('--freeze-anchors and --anchor-lr-scale contradict: frozen anchors have no lr')
    if args.stitch_init_samples < 0:
        raise ValueError(f'--stitch-init-samples must be >= 0, got {args.stitch_init_samples}')
    if args.anchor_route_weight <= 0:
        raise ValueError(f'--anchor-route-weight must be > 0, got {args.anchor_route_weight}')
    if args.route_group_k is not None and args.route_sampling != 'flops-grouped':
        raise ValueError('--route-group-k applies to --route-sampling flops-grouped only')
    if args.kd_checkpoint and not args.kd_model:
        raise ValueError('--kd-checkpoint needs --kd-model')
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError(f'--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}')


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
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split,
                                 download=args.dataset_download, class_map=args.class_map)
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        loader = eval_loader(dataset, data_config, min(64, args.stitch_init_samples), args.workers,
                             indices=indices[:args.stitch_init_samples].tolist())
        model.init_stitches(loader, mode=args.stitch_init_mode, progress=not args.no_progress)
        _logger.info(f'least-squares init of the stitching layers from {min(len(dataset), args.stitch_init_samples)} '
                     'images')
    if args.distributed:
        for param in model.stitch_layers.parameters():
            dist.broadcast(param.data, 0)


def _build_criterion(args: argparse.Namespace, mixup_active: bool, num_classes: int, device: torch.device
                     ) -> tuple[nn.Module, bool]:
    """Training loss (timm's), wrapped for distillation; returns it and whether it takes the images."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
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
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
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

    dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                   download=args.dataset_download, class_map=args.class_map,
                                   batch_size=args.batch_size, seed=args.seed)
    val_ids = _val_route_ids(args.val_routes, model)
    loader_eval = None
    if val_ids:
        dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split,
                                      download=args.dataset_download, class_map=args.class_map)
        loader_eval = eval_loader(dataset_eval, data_config, args.validation_batch_size or args.batch_size,
                                  args.workers, args.rank, args.world_size, pin_memory=args.pin_mem)
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    use_prefetcher = device.type == 'cuda' and not args.no_prefetcher
    collate_fn = mixup_fn = None
    if mixup_active:
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
    criterion, takes_images = _build_criterion(args, mixup_active, model.num_classes, device)

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
        if mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
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
