"""Benchmark 3: anchor routes of a stitched network against the timm anchor models themselves (target <= 1.02)."""
from __future__ import annotations

import argparse
from functools import partial

import timm
import torch
from _timing import interleaved, ratio_line, setup_torch

import timm_stitch  # noqa: F401


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args(argv)
    setup_torch()
    model = timm.create_model(args.model).eval()
    size = timm.data.resolve_data_config(model=model)['input_size']
    print(f'== anchor routes vs timm anchors: {args.model} ==')
    with torch.no_grad():
        for i, anchor in enumerate(model.anchors):
            name = model.anchor_names[i]
            reference = timm.create_model(name.split('.')[0], num_classes=model.num_classes).eval()
            reference.load_state_dict(anchor.state_dict())
            for bs in args.batch_sizes:
                x = torch.randn(bs, *size)
                repeats = args.repeats if bs == 1 else max(4, args.repeats // 5)
                stats = interleaved({'route': partial(model, x, stitch_id=i), 'timm': partial(reference, x)}, repeats)
                print(ratio_line(f'route {i} ({name}) bs{bs} / timm', stats['route'], stats['timm'], 1.02))


if __name__ == '__main__':
    main()
