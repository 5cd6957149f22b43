"""Top-1/top-5 of every route of a stitched network: ``python -m timm_stitch.validate`` or ``timm-stitch validate``.

Each pass over the data computes a chunk of routes (``--routes-per-pass``, default all) on every batch; the data is
sharded across ranks under ``torchrun`` (each sample counted once, no padding) and the counts summed. Every finished
route is appended to ``routes.jsonl`` in ``--output`` (the file is rewritten through a temp file, so an interruption
leaves whole records only); a rerun skips the routes already there. At the end ``routes.json`` (a route card with the
measured accuracy) and ``results.csv`` (timm-style rows, one per route) are written.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

__all__ = ['evaluate_routes', 'eval_loader', 'parse_ids', 'image_mode', 'create_image_dataset', 'load_weights', 'main',
           'add_parser']

_logger = logging.getLogger('timm_stitch.validate')

#: the Pillow mode images are read in for a model's number of input channels
_IMAGE_MODES = {1: 'L', 3: 'RGB'}


def parse_ids(text: str, num_routes: int) -> list[int]:
    """Route ids from ``'all'``, ``'anchors'`` handled by the caller, or ``'0,3,5-9'``; raises ``ValueError`` on ids
    outside ``0..num_routes-1``."""
    if text == 'all':
        return list(range(num_routes))
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(','))):
        try:
            lo, _, hi = part.partition('-')
            ids.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"route ids must look like 'all' or '0,3,5-9', got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_routes]
    if bad or not ids:
        raise ValueError(f'route ids {bad or text!r} are out of range: valid ids are 0..{num_routes - 1}')
    return sorted(set(ids))


def eval_loader(
        dataset: torch.utils.data.Dataset,
        data_config: dict[str, Any],
        batch_size: int,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        indices: Optional[Sequence[int]] = None,
        pin_memory: bool = False,
) -> DataLoader:
    """A loader of eval-transformed (resize, center crop, normalise) images: this rank's share of ``indices``
    (default: all samples), every ``world_size``-th sample, in order and without the padding of timm's samplers."""
    from timm.data import create_transform
    dataset.transform = create_transform(**data_config, is_training=False)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    return DataLoader(Subset(dataset, indices[rank::world_size]), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory)


def image_mode(in_chans: int, override: Optional[str] = None) -> str:
    """The Pillow mode to read images in for a model with ``in_chans`` input channels ('L' for 1, 'RGB' for 3), or
    ``override`` (timm's ``--input-img-mode``) when it has that many bands; raises ``ValueError`` otherwise."""
    from PIL import Image
    if not override:
        if in_chans not in _IMAGE_MODES:
            raise ValueError(f'no default image mode for a model with {in_chans} input channels (1 reads L, 3 reads '
                             'RGB): pass --input-img-mode')
        return _IMAGE_MODES[in_chans]
    try:
        bands = len(Image.new(override, (1, 1)).getbands())
    except ValueError:
        raise ValueError(f'--input-img-mode {override!r} is not a Pillow image mode (e.g. L, RGB, RGBA)') from None
    if bands != in_chans:
        raise ValueError(f'--input-img-mode {override!r} gives {bands}-channel images, the model takes {in_chans}')
    return override


class _ConvertedDataset(torch.utils.data.Dataset):
    """A torchvision dataset (timm's ``torch/`` names ignore ``input_img_mode``) whose images are converted to
    ``mode`` before ``transform``, which the loaders set on this wrapper."""

    def __init__(self, dataset: torch.utils.data.Dataset, mode: str):
        self.dataset, self.mode, self.transform = dataset, mode, getattr(dataset, 'transform', None)
        dataset.transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        image = image.convert(self.mode)
        return (self.transform(image) if self.transform is not None else image), target


def create_image_dataset(args: argparse.Namespace, split: str, in_chans: int, **kwargs: Any
                         ) -> torch.utils.data.Dataset:
    """timm's ``create_dataset`` for ``args`` (``--dataset``, ``--data-dir``...) with the images read in the mode the
    model takes (:func:`image_mode`), whatever mode the files are in."""
    from timm.data import create_dataset
    mode = image_mode(in_chans, args.input_img_mode)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=split, download=args.dataset_download,
                             class_map=args.class_map, input_img_mode=mode, **kwargs)
    return _ConvertedDataset(dataset, mode) if args.dataset.startswith('torch/') else dataset


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> str:
    """Load the weights file ``path`` into ``model`` and return the file read. With ``use_ema``, the EMA weights:
    ``{stem}_ema.safetensors`` beside the trainer's ``{stem}.safetensors``, or the ``state_dict_ema``/``model_ema``
    entry of a ``.pth``; raises ``FileNotFoundError``/``ValueError`` when there are none, rather than loading the
    plain weights."""
    import timm
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if not use_ema or path.endswith('_ema.safetensors'):
        timm.models.load_checkpoint(model, path, use_ema=False)
        return path
    if path.endswith('.safetensors'):
        ema = path.removesuffix('.safetensors') + '_ema.safetensors'
        if not os.path.isfile(ema):
            raise FileNotFoundError(f'--use-ema: {path} has no EMA weights beside it (expected {ema}, which the '
                                    'trainer writes with --model-ema)')
        timm.models.load_checkpoint(model, ema, use_ema=False)
        return ema
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    key = next((k for k in ('state_dict_ema', 'model_ema') if isinstance(checkpoint, dict)
                and checkpoint.get(k) is not None), None)
    if key is None:
        raise ValueError(f'--use-ema: {path} holds no EMA weights (no state_dict_ema or model_ema entry)')
    model.load_state_dict(timm.models.clean_state_dict(checkpoint[key]))
    return path


@torch.no_grad()
def evaluate_routes(
        model: nn.Module,
        loader: Any,
        route_ids: Sequence[int],
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Loss, top-1 and top-5 (percent) of each route in ``route_ids`` over ``loader``; every batch runs every
    route. Under ``torch.distributed`` the counts of all ranks are summed, so each rank returns the same values."""
    model.eval()
    sums = torch.zeros(len(route_ids), 3, dtype=torch.float64, device=device)  # loss sum, top1, top5 counts
    count = torch.zeros((), dtype=torch.float64, device=device)
    for images, target in tqdm(loader, desc=f'eval {len(route_ids)} routes', disable=not progress, leave=False):
        images, target = images.to(device), target.to(device)
        for i, k in enumerate(route_ids):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images, stitch_id=k)
            output = output.float()
            top5 = output.topk(min(5, output.shape[-1]), dim=-1).indices
            hits = top5.eq(target[:, None])
            sums[i, 0] += nn.functional.cross_entropy(output, target, reduction='sum')
            sums[i, 1] += hits[:, 0].sum()
            sums[i, 2] += hits.any(dim=-1).sum()
        count += target.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(count)
    n = max(count.item(), 1.0)
    return {k: {'loss': sums[i, 0].item() / n, 'top1': 100 * sums[i, 1].item() / n,
                'top5': 100 * sums[i, 2].item() / n, 'count': int(count.item())}
            for i, k in enumerate(route_ids)}


# ---- records and outputs ------------------------------------------------------------------------------------------

def _read_records(path: str) -> dict[int, dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r['stitch_id']: r for r in map(json.loads, filter(str.strip, f))}


def _write_records(path: str, records: dict[int, dict[str, Any]]) -> None:
    from .cards import atomic_write
    atomic_write(path, ''.join(json.dumps(records[k]) + '\n' for k in sorted(records)))


def _results_csv(records: dict[int, dict[str, Any]]) -> str:
    fields = ['model', 'stitch_id', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'gmacs', 'img_size',
              'crop_pct', 'interpolation']
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for k in sorted(records):
        writer.writerow(records[k])
    return out.getvalue()


# ---- command line -------------------------------------------------------------------------------------------------

def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs
    p = parser or argparse.ArgumentParser(prog='timm-stitch validate', description=__doc__.split('\n')[0])
    p.add_argument('--data-dir', default=None, help='dataset root (an ImageFolder, or what --dataset expects)')
    p.add_argument('--dataset', default='', help='timm dataset type/name (default: folder)')
    p.add_argument('--split', default='validation', help='dataset split (default: validation)')
    p.add_argument('--dataset-download', action='store_true', help='allow download of the dataset (torch/ types)')
    p.add_argument('--class-map', default='', help='path to a class to index mapping file')
    p.add_argument('--input-img-mode', default=None,
                   help="Pillow mode to read images in (default: the model's, L for 1 channel, RGB for 3)")
    p.add_argument('--model', '-m', required=True, help='snnet_* architecture, or snnet with --anchors')
    p.add_argument('--anchors', default=None, help='comma-separated timm anchor names for --model snnet')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs')
    p.add_argument('--pretrained', action='store_true', help='load the pretrained weights of --model')
    p.add_argument('--checkpoint', default='', help='weights to load (.safetensors or .pth)')
    p.add_argument('--use-ema', action='store_true',
                   help='load the EMA weights of --checkpoint (the _ema.safetensors beside it, or a .pth\'s EMA entry)')
    p.add_argument('--num-classes', type=int, default=None, help='number of classes (default: the model\'s)')
    p.add_argument('--img-size', type=int, default=None, help='input image size')
    p.add_argument('--crop-pct', type=float, default=None, help='center crop fraction')
    p.add_argument('--mean', type=float, nargs='+', default=None, help='pixel mean')
    p.add_argument('--std', type=float, nargs='+', default=None, help='pixel std')
    p.add_argument('--interpolation', default='', help='resize interpolation')
    p.add_argument('-b', '--batch-size', type=int, default=256, help='batch size per rank (default: 256)')
    p.add_argument('-j', '--workers', type=int, default=4, help='data loading workers per rank (default: 4)')
    p.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader')
    p.add_argument('--amp', action='store_true', help='mixed precision autocast')
    p.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                   help='autocast dtype with --amp (default: float16)')
    p.add_argument('--device', default=None, help='device (default: cuda if available, else cpu)')
    p.add_argument('--stitch-ids', default='all', help="routes to evaluate: 'all' or e.g. '0,3,5-9'")
    p.add_argument('--routes-per-pass', type=int, default=0,
                   help='routes computed per pass over the data; each finished pass is recorded (0: all at once)')
    p.add_argument('--output', default='', help='output folder (default: ./validate-MODEL)')
    p.add_argument('--results-file', default='', help='timm-style CSV (default: OUTPUT/results.csv)')
    p.add_argument('--no-progress', action='store_true', help='hide progress bars')
    return p


def create_stitched_model(args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """``timm.create_model(args.model, ...)`` with a clear error for an unknown name or a non-stitched model."""
    import timm

    from . import models  # noqa: F401  (registers the architectures)
    from .model import StitchedNet
    if not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}: expected a registered snnet_* architecture '
                         f"(see timm.list_models('snnet*')) or 'snnet' with --anchors")
    model_kwargs = dict(args.model_kwargs or {})
    if args.anchors:
        if 'anchors' in model_kwargs:
            raise ValueError('give the anchors either with --anchors or in --model-kwargs, not both')
        model_kwargs['anchors'] = [a.strip() for a in args.anchors.split(',') if a.strip()]
    if args.num_classes is not None:
        model_kwargs['num_classes'] = args.num_classes
    if args.img_size is not None:
        model_kwargs['img_size'] = args.img_size
    model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs, **kwargs)
    if not isinstance(model, StitchedNet):
        raise ValueError(f'{args.model} is not a stitched network (expected an snnet_* architecture)')
    return model


def check_data_dir(args: argparse.Namespace) -> None:
    """Raise for a folder dataset without ``--data-dir`` or a ``--data-dir`` that does not exist."""
    if not args.dataset and not args.data_dir:
        raise ValueError('--data-dir is required for a folder dataset')
    if args.data_dir and not os.path.exists(args.data_dir):
        raise FileNotFoundError(f'dataset path {args.data_dir!r} does not exist')


def resolve_amp_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp``/``--amp-dtype`` (None without ``--amp``); ``--amp-dtype`` alone is an
    error, not a silent no-op."""
    if args.amp_dtype and not args.amp:
        raise ValueError(f'--amp-dtype {args.amp_dtype} needs --amp')
    return getattr(torch, args.amp_dtype or 'float16') if args.amp else None


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` for missing, contradicting or ineffective arguments."""
    check_data_dir(args)
    if args.use_ema and not args.checkpoint:
        raise ValueError('--use-ema needs --checkpoint (the EMA weights of which file?)')
    if args.routes_per_pass < 0:
        raise ValueError(f'--routes-per-pass must be >= 0, got {args.routes_per_pass}')
    resolve_amp_dtype(args)


def resolve_device(name: Optional[str]) -> str:
    return name or ('cuda' if torch.cuda.is_available() else 'cpu')


def run(args: argparse.Namespace) -> int:
    from timm.data import resolve_data_config
    from timm.utils import init_distributed_device, setup_default_logging

    from .cards import RouteCard, atomic_write
    if not logging.root.handlers:
        setup_default_logging()
    check_args(args)
    args.device = resolve_device(args.device)
    device = init_distributed_device(args)
    model = create_stitched_model(args)
    if args.checkpoint:
        loaded = load_weights(model, args.checkpoint, args.use_ema)
        if args.rank == 0:
            _logger.info(f'loaded {loaded}')
    model.to(device).eval()
    route_ids = parse_ids(args.stitch_ids, model.num_routes)
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    dataset = create_image_dataset(args, args.split, model.in_chans)
    loader = eval_loader(dataset, data_config, args.batch_size, args.workers, args.rank, args.world_size,
                         pin_memory=args.pin_mem)
    dtype = resolve_amp_dtype(args)

    output = args.output or f'validate-{args.model}'
    records_path = os.path.join(output, 'routes.jsonl')
    os.makedirs(output, exist_ok=True)
    records = _read_records(records_path)
    todo = [k for k in route_ids if k not in records]
    if records and args.rank == 0:
        _logger.info(f'{len(route_ids) - len(todo)} of {len(route_ids)} routes already in {records_path}')
    routes = model.routes()
    chunk = args.routes_per_pass or len(todo) or 1
    for start in range(0, len(todo), chunk):
        ids = todo[start:start + chunk]
        results = evaluate_routes(model, loader, ids, device, dtype, progress=not args.no_progress
                                  and args.rank == 0)
        if args.rank == 0:
            for k, r in results.items():
                records[k] = {
                    'model': args.model, 'stitch_id': k, 'top1': round(r['top1'], 4),
                    'top1_err': round(100 - r['top1'], 4), 'top5': round(r['top5'], 4),
                    'top5_err': round(100 - r['top5'], 4), 'loss': round(r['loss'], 6), 'count': r['count'],
                    'param_count': round(routes[k].params / 1e6, 3), 'gmacs': round(routes[k].macs / 1e9, 4),
                    'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
                    'interpolation': data_config['interpolation']}
                _logger.info(f"route {k}: top1 {r['top1']:.3f} top5 {r['top5']:.3f} ({r['count']} images)")
            _write_records(records_path, records)
        if args.distributed:
            dist.barrier()
    if args.rank == 0:
        done = {k: records[k] for k in route_ids}
        card = RouteCard.from_model(model, checkpoint=args.checkpoint or None).with_accuracy(
            {k: (r['top1'], r['top5']) for k, r in done.items()},
            dataset=f"{args.dataset or 'folder'}/{args.split}", source='measured', who='timm-stitch validate',
            images=next(iter(done.values()))['count'])
        card.save(os.path.join(output, 'routes.json'))
        atomic_write(args.results_file or os.path.join(output, 'results.csv'), _results_csv(done))
        _logger.info(f'wrote {output}/routes.json and the results CSV')
    if args.distributed:
        dist.destroy_process_group()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``timm-stitch validate``."""
    p = subparsers.add_parser('validate', help='top-1/top-5 of every route on a dataset (torchrun-ready)',
                              description=__doc__.split('\n')[0])
    build_parser(p)
    p.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == '__main__':
    raise SystemExit(main())
