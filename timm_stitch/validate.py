"""Top-1/top-5 of every route of a stitched network: ``python -m timm_stitch.validate`` or ``timm-stitch validate``.

Each pass over the data computes a chunk of routes (``--routes-per-pass``, default all) on every batch; the data is
sharded across ranks under ``torchrun`` (each sample counted once, no padding) and the counts summed. Every finished
route is recorded in ``routes.jsonl`` in ``--out`` (rewritten atomically, so an interruption leaves whole records
only), keyed by the weights' fingerprint and the model and data settings: a rerun into the same folder reuses the
records of the same weights and settings and measures the other routes again, saying which and why. At the end
``routes.json`` (a route card with the measured accuracy) and ``results.csv`` (timm-style rows, one per route) are
written.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections import Counter
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._io import atomic_write, make_folder
from .arguments import MODEL_OPTIONS, RUNTIME_OPTIONS, add_routes_arg, add_shared_args, route_text
from .evaluation import (
    check_data_dir,
    create_image_dataset,
    create_stitched_model,
    data_config_for,
    eval_loader,
    evaluate_routes,
    load_weights,
    model_route_ids,
    resolve_amp_dtype,
    resolve_device,
)
from .fingerprint import weights_fingerprint
from .quantization import SCHEMES, quantize

__all__ = ['load_weights', 'record_key', 'build_parser', 'run', 'main']

_logger = logging.getLogger('timm_stitch.validate')


# ---- records and outputs ------------------------------------------------------------------------------------------

def _read_records(path: str) -> dict[int, dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r['stitch_id']: r for r in map(json.loads, filter(str.strip, f))}


def record_key(args: argparse.Namespace, model: nn.Module, data_config: dict[str, Any],
               amp_dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """What a validation record was measured with: the fingerprint of the weights (whichever file or release they
    came from) and the settings that change a route's accuracy (model arguments, data, transform, precision), as
    plain JSON values."""
    settings = {
        'model': args.model, 'anchors': args.anchors, 'route_space': args.route_space,
        'model_kwargs': dict(args.model_kwargs or {}),
        'num_classes': model.num_classes, 'dataset': args.dataset or 'folder',
        'data_dir': os.path.abspath(args.data_dir) if args.data_dir else None, 'split': args.split,
        'class_map': args.class_map, 'input_img_mode': args.input_img_mode,
        **{k: data_config.get(k) for k in ('input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std')},
        'amp_dtype': str(amp_dtype) if amp_dtype is not None else None,
        'quantize': getattr(args, 'quantize', None)}
    return json.loads(json.dumps({'weights': weights_fingerprint(model), 'settings': settings}, default=str))


def _stale_reason(record: dict[str, Any], key: dict[str, Any]) -> Optional[str]:
    """Why ``record`` was not measured with ``key``, or None when it was."""
    own = record.get('key')
    if not isinstance(own, dict):
        return 'measured by an earlier version (no key)'
    if own.get('weights') != key['weights']:
        return 'measured other weights'
    changed = sorted(k for k in set(own.get('settings', {})) | set(key['settings'])
                     if own.get('settings', {}).get(k) != key['settings'].get(k))
    return f"measured with other settings ({', '.join(changed)})" if changed else None


def _reusable(records: dict[int, dict[str, Any]], key: dict[str, Any], route_ids: Sequence[int], path: str,
              log: bool = True) -> dict[int, dict[str, Any]]:
    """The records measured with ``key``; logs how many of ``route_ids`` are reused and why the others are not."""
    reasons = {k: _stale_reason(r, key) for k, r in records.items()}
    kept = {k: r for k, r in records.items() if reasons[k] is None}
    if records and log:
        why = Counter(reasons[k] for k in route_ids if k in records and reasons[k] is not None)
        text = f'{sum(k in kept for k in route_ids)} of {len(route_ids)} routes reused from {path}'
        if why:
            text += f'; measuring {sum(why.values())} again: ' + ', '.join(f'{n} {reason}' for reason, n in why.items())
        dropped = len(records) - len(kept) - sum(why.values())
        if dropped:
            text += f'; {dropped} records of other weights or settings dropped'
        _logger.info(text)
    return kept


def _write_records(path: str, records: dict[int, dict[str, Any]]) -> None:
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
    """The validation arguments (timm ``validate.py`` names where they apply)."""
    p = parser or argparse.ArgumentParser(prog='timm-stitch validate', description=__doc__.split('\n')[0])
    add_shared_args(p, ('data_dir', 'dataset'))
    p.add_argument('--split', default='validation', help='dataset split (default: validation)')
    add_shared_args(p, ('dataset_download', 'class_map', 'input_img_mode'))
    add_shared_args(p, (*MODEL_OPTIONS, 'checkpoint'), model={'required': True})
    p.add_argument('--use-ema', action='store_true',
                   help='load the EMA weights of --checkpoint (the _ema.safetensors beside it, or a .pth\'s EMA entry)')
    add_shared_args(p, ('crop_pct', 'mean', 'std', 'interpolation', 'batch_size', 'workers', 'pin_mem'),
                    batch_size={'default': 256})
    add_shared_args(p, RUNTIME_OPTIONS)
    add_routes_arg(p, 'all', 'routes to evaluate', '--stitch-ids')
    p.add_argument('--quantize', default=None, choices=tuple(SCHEMES),
                   help='measure the routes of the network quantized once with this scheme (after loading the '
                        'weights; see timm_stitch.quantize): the card records that precision')
    p.add_argument('--routes-per-pass', type=int, default=0,
                   help='routes computed per pass over the data; each finished pass is recorded (0: all at once)')
    p.add_argument('--out', '--output', dest='output', default='', metavar='DIR',
                   help='output folder (default: ./validate-MODEL; --output: the older spelling)')
    p.add_argument('--results-file', default='', help='timm-style CSV (default: DIR/results.csv)')
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` for missing, contradicting or ineffective arguments."""
    check_data_dir(args)
    if args.use_ema and not args.checkpoint:
        raise ValueError('--use-ema needs --checkpoint (the EMA weights of which file?)')
    if args.routes_per_pass < 0:
        raise ValueError(f'--routes-per-pass must be >= 0, got {args.routes_per_pass}')
    resolve_amp_dtype(args)

def run(args: argparse.Namespace) -> int:
    from timm.utils import init_distributed_device, setup_default_logging

    from .cards import RouteCard
    from .catalogue import precision as card_precision
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
    if args.quantize:
        if device.type != 'cpu' and args.quantize == 'int8-dyn':
            raise ValueError(f'--quantize int8-dyn runs on CPU only, got --device {device}: add --device cpu')
        quantize(model, args.quantize, inplace=True)
    model.to(device).eval()
    route_ids = model_route_ids(route_text(args.routes), model)
    data_config = data_config_for(args, model, verbose=args.rank == 0)
    dataset = create_image_dataset(args, args.split, model.in_chans)
    loader = eval_loader(dataset, data_config, args.batch_size, args.workers, args.rank, args.world_size,
                         pin_memory=args.pin_mem)
    dtype = resolve_amp_dtype(args)

    output = args.output or f'validate-{args.model}'
    records_path = os.path.join(output, 'routes.jsonl')
    make_folder(output)
    key = record_key(args, model, data_config, dtype)
    records = _reusable(_read_records(records_path), key, route_ids, records_path, log=args.rank == 0)
    todo = [k for k in route_ids if k not in records]
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
                    'interpolation': data_config['interpolation'], 'key': key}
                _logger.info(f"route {k}: top1 {r['top1']:.3f} top5 {r['top5']:.3f} ({r['count']} images)")
            _write_records(records_path, records)
        if args.distributed:
            dist.barrier()
    if args.rank == 0:
        done = {k: records[k] for k in route_ids}
        card = RouteCard.from_model(model, checkpoint=args.checkpoint or None).with_accuracy(
            {k: (r['top1'], r['top5']) for k, r in done.items()},
            dataset=f"{args.dataset or 'folder'}/{args.split}", source='measured', who='timm-stitch validate',
            images=next(iter(done.values()))['count'], precision=card_precision(model))
        card.save(os.path.join(output, 'routes.json'))
        atomic_write(args.results_file or os.path.join(output, 'results.csv'), _results_csv(done))
        _logger.info(f'wrote {output}/routes.json and the results CSV')
    if args.distributed:
        dist.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == '__main__':
    raise SystemExit(main())
