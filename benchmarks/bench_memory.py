"""Benchmark 5: memory. Resident size of the stitched model vs its anchors, of an exported route vs its own
parameters, and peak memory of one training step of a stitched route vs the largest anchor alone.

Peak memory is each measurement's own process high-water mark (``ru_maxrss``), minus the same process's
resident size just before the step, so the interpreter and the model weights are not counted twice.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import timm
import torch

import timm_stitch  # noqa: F401


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameter and buffer storages (shared storage counted once)."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _rss_kib() -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))


def _train_step_peak(model_name: str, stitch_id: int | None, batch_size: int) -> dict:
    """Runs in a child process: one forward/backward/AdamW step; peak RSS growth over the pre-step RSS."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    size = timm.data.resolve_data_config(model=model)['input_size']
    x, y = torch.randn(batch_size, *size), torch.randint(0, 1000, (batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = _rss_kib()
    out = model(x) if stitch_id is None else model(x, stitch_id=stitch_id)
    torch.nn.functional.cross_entropy(out, y).backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(step_peak_mib=(peak - before) / 1024)


def train_step_peak(model_name: str, stitch_id: int | None, batch_size: int) -> float:
    code = (f'import sys, json; sys.path.insert(0, {sys.path[0]!r}); import bench_memory; '
            f'print(json.dumps(bench_memory._train_step_peak({model_name!r}, {stitch_id!r}, {batch_size})))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])['step_peak_mib']


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--routes', type=int, nargs='+', default=[24, 56])
    parser.add_argument('--batch-size', type=int, default=8)
    args = parser.parse_args(argv)
    model = timm.create_model(args.model).eval()
    anchors = sum(tensor_bytes(a) for a in model.anchors)
    stitches = tensor_bytes(model.stitch_layers)
    total = tensor_bytes(model)
    print(f'== memory: {args.model} ==')
    print(f'stitched model {total / 2**20:9.2f} MiB = anchors {anchors / 2**20:.2f} MiB + stitch layers '
          f'{stitches / 2**20:.2f} MiB + {(total - anchors - stitches) / 2**20:.2f} MiB other '
          f'(duplicated: {"none" if total == anchors + stitches else "YES"})')
    for k in args.routes:
        exported = model.export_stitch(k)
        route = model.route(k)
        print(f'route {k:>3} exported {tensor_bytes(exported) / 2**20:8.2f} MiB; its own parameters '
              f'{route.params * 4 / 2**20:8.2f} MiB (fp32); whole stitched model {total / 2**20:.2f} MiB')
    largest = len(model.anchors) - 1
    anchor_peak = train_step_peak(args.model, largest, args.batch_size)
    for k in args.routes:
        peak = train_step_peak(args.model, k, args.batch_size)
        print(f'train step peak, bs{args.batch_size}: route {k:>3} {peak:8.1f} MiB vs largest anchor (route {largest}) '
              f'{anchor_peak:8.1f} MiB = {peak / anchor_peak:.3f}')


if __name__ == '__main__':
    main()
