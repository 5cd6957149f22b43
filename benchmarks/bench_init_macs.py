"""Benchmark 6: least-squares init of every stitching layer from 100 images, and MACs counting for all routes."""
from __future__ import annotations

import argparse
import time

import timm
import torch

import timm_stitch  # noqa: F401
from timm_stitch.macs import count_route_macs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--images', type=int, default=100)
    parser.add_argument('--batch-size', type=int, default=25)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    size = timm.data.resolve_data_config(model=model)['input_size']
    images = torch.randn(args.images, *size)
    layers = sum(len(layers) for stage in model.stitch_layers.values() for layers in stage)
    print(f'== LS init and MACs counting: {args.model} ==')
    start = time.perf_counter()
    model.init_stitches(images, batch_size=args.batch_size, progress=False)
    print(f'LS init: {layers} stitching layers from {args.images} images in {time.perf_counter() - start:.1f} s')

    start = time.perf_counter()
    macs = count_route_macs(model)
    standalone = time.perf_counter() - start
    start = time.perf_counter()
    routes = model.routes()
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.routes()
    cached = time.perf_counter() - start
    assert [r.macs for r in routes] == macs
    print(f'MACs of {len(macs)} routes: count_route_macs {standalone:.2f} s; model.routes() first call (counts) '
          f'{first:.2f} s, then cached {cached * 1e6:.0f} us')


if __name__ == '__main__':
    main()
