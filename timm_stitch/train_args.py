"""The arguments of ``timm_stitch.train``: timm ``train.py`` names and defaults where they apply, then SN-Net's; a
``-c/--config`` YAML file of defaults; and the checks that reject missing, contradicting or ineffective options."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional, Sequence

from .arguments import MODEL_OPTIONS, RUNTIME_OPTIONS, add_shared_args, route_token
from .evaluation import check_data_dir, resolve_amp_dtype
from .sampling import SAMPLING_MODES, SYNC_MODES

__all__ = ['build_parser', 'parse_args', 'check_args', 'mixup_active']

def mixup_active(args: argparse.Namespace) -> bool:
    """Whether mixup or cutmix is on."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


#: options that act only together with another one: (option, what it needs, whether the arguments have it), and
#: the value each takes when not given. They default to None, so that giving one without what it needs is an error
#: instead of a silent no-op.
_DEPENDENT: tuple[tuple[str, str, Callable[[argparse.Namespace], bool]], ...] = (
    ('model_ema_decay', '--model-ema', lambda a: a.model_ema),
    ('model_ema_warmup', '--model-ema', lambda a: a.model_ema),
    ('model_ema_force_cpu', '--model-ema', lambda a: a.model_ema),
    ('clip_mode', '--clip-grad', lambda a: a.clip_grad is not None),
    ('route_group_gap', '--route-sampling flops-grouped', lambda a: a.route_sampling == 'flops-grouped'),
    ('route_group_k', '--route-sampling flops-grouped', lambda a: a.route_sampling == 'flops-grouped'),
    ('kd_checkpoint', '--kd-model', lambda a: bool(a.kd_model)),
    ('kd_pretrained', '--kd-model', lambda a: bool(a.kd_model)),
    ('kd_type', '--kd-model', lambda a: bool(a.kd_model)),
    ('kd_alpha', '--kd-model', lambda a: bool(a.kd_model)),
    ('kd_tau', '--kd-type soft', lambda a: a.kd_type == 'soft'),
    ('no_resume_opt', '--resume', lambda a: bool(a.resume)),
    ('lr_base', 'no --lr', lambda a: a.lr is None),
    ('lr_base_size', 'no --lr', lambda a: a.lr is None),
    ('lr_base_scale', 'no --lr', lambda a: a.lr is None),
    *((name, '--mixup, --cutmix or --cutmix-minmax', mixup_active)
      for name in ('mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch')),
    ('stitch_init_mode', '--stitch-init-samples', lambda a: a.stitch_init_samples > 0),
    ('stitch_lora_alpha', '--stitch-lora-rank', lambda a: a.stitch_lora_rank > 0),
    ('validation_batch_size', "--val-routes other than 'none'", lambda a: a.val_routes != 'none'),
)
_UNSET_DEFAULTS: dict[str, Any] = dict(
    model_ema_decay=0.9998, model_ema_warmup=False, model_ema_force_cpu=False, clip_mode='norm', route_group_gap=1.0,
    kd_checkpoint='', kd_pretrained=True, kd_type='hard', kd_alpha=0.5, kd_tau=1.0, no_resume_opt=False, lr_base=0.1,
    lr_base_size=256, lr_base_scale='', mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch', mixup_off_epoch=0,
    stitch_init_mode='joint', stitch_lora_alpha=1.0)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training arguments (timm ``train.py`` names and defaults, then the stitching ones)."""
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(prog='timm-stitch train', description=__doc__.split('\n')[0], add_help=add_help)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of argument defaults')
    g = p.add_argument_group('dataset')
    add_shared_args(g, ('data_dir', 'dataset'))
    g.add_argument('--train-split', default='train', help='training split (default: train)')
    g.add_argument('--val-split', default='validation', help='validation split (default: validation)')
    add_shared_args(g, ('dataset_download', 'class_map', 'input_img_mode', 'crop_pct', 'mean', 'std', 'interpolation',
                        'batch_size', 'workers', 'pin_mem'), batch_size={'default': 128})
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None,
                   help='validation batch size (default: --batch-size)')
    g = p.add_argument_group('model')
    add_shared_args(g, MODEL_OPTIONS)
    g.add_argument('--pretrained-anchors', action='store_true', help="start from each anchor's timm weights")
    g.add_argument('--initial-checkpoint', default='', help='weights to start from (.safetensors or .pth)')
    g.add_argument('--resume', default='', help='resume from a .state.pth (or its .safetensors, or the output dir)')
    g.add_argument('--no-resume-opt', action='store_true', default=None,
                   help='do not restore the optimizer when resuming')
    g.add_argument('--grad-checkpointing', action='store_true', help='gradient checkpointing through the blocks')
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='sgd', help='optimizer (default: sgd)')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas')
    g.add_argument('--momentum', type=float, default=0.9, help='optimizer momentum (default: 0.9)')
    g.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (default: none)')
    g.add_argument('--clip-mode', default=None, help="with --clip-grad: 'norm', 'value' or 'agc' (default: norm)")
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra optimizer kwargs')
    g = p.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='cosine', help='scheduler (default: cosine)')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule per update, not per epoch')
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: --lr-base scaled by batch)')
    g.add_argument('--lr-base', type=float, default=None,
                   help='without --lr: base lr for --lr-base-size (default: 0.1)')
    g.add_argument('--lr-base-size', type=int, default=None,
                   help='without --lr: batch size of --lr-base (default: 256)')
    g.add_argument('--lr-base-scale', default=None, help="without --lr: 'linear' or 'sqrt' (default: by optimizer)")
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
    g.add_argument('--mixup-prob', type=float, default=None,
                   help='probability of mixup or cutmix per batch (default: 1)')
    g.add_argument('--mixup-switch-prob', type=float, default=None,
                   help='probability of cutmix instead of mixup (default: 0.5)')
    g.add_argument('--mixup-mode', default=None, help="'batch', 'pair' or 'elem' (default: batch)")
    g.add_argument('--mixup-off-epoch', type=int, default=None, help='turn mixup off from this epoch (default: never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    g.add_argument('--train-interpolation', default='random', help="training interpolation (default: 'random')")
    g.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    g.add_argument('--drop-path', type=float, nargs='+', default=None, metavar='RATE',
                   help='drop path rate of every anchor, or one rate per anchor (in the order the anchors are given)')
    g = p.add_argument_group('EMA and precision')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=None, help='keep the EMA on the CPU')
    g.add_argument('--model-ema-decay', type=float, default=None, help='EMA decay (default: 0.9998)')
    g.add_argument('--model-ema-warmup', action='store_true', default=None, help='EMA decay warmup')
    add_shared_args(g, RUNTIME_OPTIONS)
    g = p.add_argument_group('misc')
    g.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    g.add_argument('--log-interval', type=int, default=50, help='batches between log lines (default: 50)')
    g.add_argument('--checkpoint-hist', type=int, default=10, help='epoch checkpoints kept (default: 10)')
    g.add_argument('--no-prefetcher', action='store_true', help="disable timm's CUDA prefetcher")
    g.add_argument('--out', '--output', dest='output', default='', metavar='DIR',
                   help='output root (default: ./output/train); --output: the older spelling, timm\'s')
    g.add_argument('--experiment', default='', help='run folder name under --out')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'), help='checkpoint metric')
    g.add_argument('--dist-backend', default=None, help='torch.distributed backend (default: by device)')
    g.add_argument('--dist-url', default='env://', help='torch.distributed init url')
    g.add_argument('--dist-bn', default='reduce', choices=('broadcast', 'reduce', ''),
                   help='sync BatchNorm statistics across ranks after each epoch')
    g.add_argument('--no-ddp-bb', action='store_true', help='DDP without broadcast_buffers')
    g = p.add_argument_group('stitching')
    g.add_argument('--stitch-init-samples', type=int, default=0,
                   help='least-squares init of the stitching layers from this many clean training images (0: off)')
    g.add_argument('--stitch-init-mode', default=None, choices=('joint', 'average'),
                   help="LS init: one solve per shared layer ('joint', the default) or averaged per-position solves "
                   '(official)')
    g.add_argument('--stitch-lora-rank', type=int, default=0,
                   help='train a rank-R low-rank update of each stitching layer on its frozen (LS-initialised) '
                   'weight, as SN-Netv2 does with 64 (0: train the whole layers)')
    g.add_argument('--stitch-lora-alpha', type=float, default=None,
                   help='scale of the low-rank update: alpha / rank (default: 1, as SN-Netv2)')
    g.add_argument('--stitch-lr-scale', type=float, default=1.0, help='lr multiplier of the stitching layers')
    g.add_argument('--anchor-lr-scale', type=float, default=1.0, help='lr multiplier of the anchors')
    g.add_argument('--freeze-anchors', action='store_true', help='train the stitching layers only')
    g.add_argument('--route-sampling', default='uniform', choices=SAMPLING_MODES, help='route of each step')
    g.add_argument('--route-group-gap', type=float, default=None,
                   help='flops-grouped: group width in GMACs (default: 1)')
    g.add_argument('--route-group-k', type=float, default=None, help='flops-grouped: group weights i/k + 1/G')
    g.add_argument('--anchor-route-weight', type=float, default=1.0,
                   help='how much more often an anchor route is drawn than a stitched one (default: 1, uniform)')
    g.add_argument('--route-sync', default='synced', choices=SYNC_MODES,
                   help="'synced': one route per step on every rank; 'per-rank': each its own (official)")
    g.add_argument('--train-routes', default='all', type=route_token, metavar='IDS',
                   help="routes the sampler draws from, in the --routes syntax: 'all', 'anchors' or ids like "
                        "'0-18' (e.g. to refine one segment)")
    g.add_argument('--val-routes', default='anchors', type=route_token, metavar='IDS',
                   help="routes validated each epoch, in the --routes syntax: 'anchors', 'all', ids like "
                        "'0,3,5-9', or 'none'")
    g.add_argument('--kd-model', default='', help='timm teacher model for distillation (e.g. regnety_160)')
    g.add_argument('--kd-checkpoint', default=None, help='teacher weights file')
    g.add_argument('--kd-pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help="load the teacher's timm pretrained weights (default: yes)")
    g.add_argument('--kd-type', default=None, choices=('hard', 'soft'), help='distillation type (default: hard)')
    g.add_argument('--kd-alpha', type=float, default=None, help='weight of the distillation term (default: 0.5)')
    g.add_argument('--kd-tau', type=float, default=None, help='soft distillation temperature (default: 1)')
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
    """Raise ``ValueError`` for missing, contradicting or ineffective arguments, then give the options of
    ``_DEPENDENT`` that were not set their defaults."""
    if not args.model:
        raise ValueError('--model is required (an snnet_* architecture, or snnet with --anchors)')
    check_data_dir(args)
    if args.pretrained and args.pretrained_anchors:
        raise ValueError('--pretrained (stitched weights) and --pretrained-anchors (anchor weights) contradict')
    if args.resume and args.initial_checkpoint:
        raise ValueError('--resume and --initial-checkpoint contradict: resume restores the weights')
    if args.freeze_anchors and args.anchor_lr_scale != 1.0:
        raise ValueError('--freeze-anchors and --anchor-lr-scale contradict: frozen anchors have no lr')
    if args.drop_path is not None and not all(0 <= r < 1 for r in args.drop_path):
        raise ValueError(f'--drop-path rates must be in [0, 1), got {" ".join(map(str, args.drop_path))}')
    if args.stitch_init_samples < 0:
        raise ValueError(f'--stitch-init-samples must be >= 0, got {args.stitch_init_samples}')
    if args.stitch_lora_rank < 0:
        raise ValueError(f'--stitch-lora-rank must be >= 0, got {args.stitch_lora_rank}')
    if args.anchor_route_weight <= 0:
        raise ValueError(f'--anchor-route-weight must be > 0, got {args.anchor_route_weight}')
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError(f'--epochs and --batch-size must be >= 1, got {args.epochs} and {args.batch_size}')
    resolve_amp_dtype(args)
    for name, needs, has in _DEPENDENT:
        value = getattr(args, name)
        if value is not None and not has(args):
            raise ValueError(f"--{name.replace('_', '-')} applies with {needs} only, which is not set")
    for name, default in _UNSET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
