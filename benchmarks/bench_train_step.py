"""Benchmark: training step time of a stitched network against its largest anchor alone (same batch).

One step is zero_grad, forward, backward and an AdamW step (the trainer's parameter groups), interleaved
round-robin: the stitched network on a uniformly sampled route (as ``timm_stitch.train`` trains it), the stitched
network on its largest-anchor route (the bookkeeping overhead alone), and the plain timm anchor.
"""
from __future__ import annotations

import argparse

import timm
import torch
from _timing import interleaved, setup_torch

import timm_stitch  # noqa: F401
from timm_stitch.sampling import RouteSampler
from timm_stitch.train import param_groups


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, route=None):
    optimizer = timm.optim.create_optimizer_v2(param_groups(model, 0.05), opt='adamw', lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        kwargs = {} if route is None else {'stitch_id': route()}
        loss_fn(model(x, **kwargs), y).backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='snnet_deit_tsb')
    parser.add_argument('--anchor', default='deit_base_patch16_224')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    setup_torch(args.threads)
    torch.manual_seed(0)
    stitched = timm.create_model(args.model, img_size=args.img_size).train()
    anchor = timm.create_model(args.anchor, img_size=args.img_size).train()
    largest = len(stitched.anchors) - 1  # anchor routes come first: ids 0..A-1
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    sampler = RouteSampler(stitched.num_routes, seed=0)
    stats = interleaved({
        'stitched, random route': step_fn(stitched, x, y, sampler),
        'stitched, largest route': step_fn(stitched, x, y, lambda: largest),
        f'{args.anchor} alone': step_fn(anchor, x, y),
    }, repeats=args.repeats, warmup=2)
    base = stats[f'{args.anchor} alone'].median
    print(f'{args.model} vs {args.anchor}: batch {args.batch_size} at {args.img_size}, '
          f'{torch.get_num_threads()} threads, forward+backward+AdamW')
    for name, s in stats.items():
        print(f'  {name:28s} {s}  ratio {s.median / base:.3f}')


if __name__ == '__main__':
    main()
