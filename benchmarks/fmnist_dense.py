"""The shipped Fashion-MNIST SN-Net as the frozen backbone of a small segmentation head, one head per route.

Per-pixel target from the real images: pixels brighter than ``--threshold`` get the image's garment class (1-10),
the rest background (0). Each route's backbone output is its ``forward_features`` tokens without the class token,
reshaped to the 7x7 patch grid; a 1x1 conv head (trained on cached features, backbone frozen) predicts 11 classes,
upsampled bilinearly to 28x28. Prints the mIoU of every route on the test images as a Markdown table.

    PYTHONPATH=. .venv/bin/python benchmarks/fmnist_dense.py [--train 6000 --test 2000 --steps 300]
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from tqdm import tqdm

from timm_stitch.data import load_fashion_mnist

NUM_CLASSES = 11  # background + 10 garments


def pixel_targets(images: torch.Tensor, labels: torch.Tensor, threshold: int) -> torch.Tensor:
    """(N, 28, 28) int64: the image's class + 1 where the pixel is brighter than ``threshold``, else 0."""
    return torch.where(images > threshold, labels[:, None, None] + 1, torch.zeros_like(labels)[:, None, None])


@torch.no_grad()
def grid_features(model, images: torch.Tensor, stitch_id: int, batch: int = 500) -> torch.Tensor:
    """(N, C, H/4, W/4): the route's output tokens (class token dropped) on the patch grid."""
    cfg = resolve_data_config(model=model)
    mean, std = torch.tensor(cfg['mean']).view(1, -1, 1, 1), torch.tensor(cfg['std']).view(1, -1, 1, 1)
    prefix = model.anchors[model.route(stitch_id).anchors[-1]].num_prefix_tokens
    out = []
    for i in range(0, len(images), batch):
        x = (images[i:i + batch, None].float() / 255 - mean) / std
        tokens = model.forward_features(x, stitch_id=stitch_id)[:, prefix:]
        side = int(tokens.shape[1] ** 0.5)
        out.append(tokens.transpose(1, 2).reshape(len(x), -1, side, side))
    return torch.cat(out)


def train_head(features: torch.Tensor, targets: torch.Tensor, steps: int, seed: int = 0) -> torch.nn.Conv2d:
    """A 1x1 conv head on cached features, trained with cross-entropy at full resolution."""
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(features.shape[1], NUM_CLASSES, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(len(features), (256,))
        logits = F.interpolate(head(features[idx]), size=targets.shape[-2:], mode='bilinear', align_corners=False)
        loss = F.cross_entropy(logits, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def miou(head: torch.nn.Conv2d, features: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes present of intersection over union, in percent."""
    pred = F.interpolate(head(features), size=targets.shape[-2:], mode='bilinear', align_corners=False).argmax(1)
    ious = []
    for c in range(NUM_CLASSES):
        union = ((pred == c) | (targets == c)).sum()
        if union:
            ious.append(float(((pred == c) & (targets == c)).sum()) / float(union))
    return 100.0 * sum(ious) / len(ious)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train', type=int, default=6000, help='training images (first of the train split)')
    parser.add_argument('--test', type=int, default=2000, help='test images (first of the test split)')
    parser.add_argument('--steps', type=int, default=300, help='head training steps (batch 256)')
    parser.add_argument('--threshold', type=int, default=25, help='foreground: pixel value above this (0-255)')
    parser.add_argument('--routes', default='', help='comma-separated route ids (default: the Pareto front)')
    args = parser.parse_args()

    model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    ids = [int(k) for k in args.routes.split(',')] if args.routes else [r.id for r in model.pareto()]
    macs = {r.id: r.macs for r in model.counted_routes()}
    data = {}
    for split, n in (('train', args.train), ('test', args.test)):
        images, labels = (torch.from_numpy(a[:n]) for a in load_fashion_mnist(split))
        data[split] = images, pixel_targets(images.long(), labels, args.threshold)
    print('| route | anchors | MACs (M) | feature channels | mIoU (%) |')
    print('|---|---|---|---|---|')
    for k in tqdm(ids, desc='routes'):
        route = model.route(k)
        train_x = grid_features(model, data['train'][0], k)
        head = train_head(train_x, data['train'][1], args.steps)
        test_x = grid_features(model, data['test'][0], k)
        anchors = '->'.join(str(a) for a in route.anchors)
        tqdm.write(f'| {k} | {anchors} | {macs[k] / 1e6:.2f} | {train_x.shape[1]} | '
                   f'{miou(head, test_x, data["test"][1]):.2f} |')


if __name__ == '__main__':
    main()
