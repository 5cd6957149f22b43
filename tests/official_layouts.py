"""Synthetic checkpoints in the official SN-Net release layouts (ziplab/SN-Net v1.0-v1.2), shared by the converter
and release tests: random tensors under the official keys, and the files' top-level wrappers."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

DIMS, HEADS, PATCH = (192, 384, 768), (3, 6, 12), 16  # DeiT-Ti/S/B


def official_deit_state(depth: int, img_size: int, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official snnet_deit.pth keys: ``anchors.{i}.*`` and ``stitch_layers.{c}.{l}.*``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    tokens = (img_size // PATCH) ** 2 + 1
    sd = {}
    for i, d in enumerate(DIMS):
        sd.update(_official_vit(rnd, f'anchors.{i}.', d, depth, tokens, PATCH, num_classes))
    for c, (d_in, d_out) in enumerate(zip(DIMS, DIMS[1:])):
        for layer in range(depth - 1):  # window 2, stride 1: one layer per window that adds positions
            sd[f'stitch_layers.{c}.{layer}.transform.weight'] = rnd(d_out, d_in)
            sd[f'stitch_layers.{c}.{layer}.transform.bias'] = rnd(d_out)
    return sd


def _official_vit(rnd, p: str, d: int, depth: int, tokens: int, patch: int, num_classes: int,
                  layer_scale: bool = False) -> dict[str, torch.Tensor]:
    """One FB DeiT / DeiT-3 anchor's keys under prefix ``p`` (``layer_scale``: DeiT-3's ``gamma_1``/``gamma_2``)."""
    sd = {p + 'cls_token': rnd(1, 1, d), p + 'pos_embed': rnd(1, tokens, d),
          p + 'patch_embed.proj.weight': rnd(d, 3, patch, patch), p + 'patch_embed.proj.bias': rnd(d)}
    for b in range(depth):
        q = f'{p}blocks.{b}.'
        for norm in ('norm1', 'norm2'):
            sd[q + norm + '.weight'], sd[q + norm + '.bias'] = rnd(d, offset=1.0), rnd(d)
        for name, out_dim, in_dim in (('attn.qkv', 3 * d, d), ('attn.proj', d, d), ('mlp.fc1', 4 * d, d),
                                      ('mlp.fc2', d, 4 * d)):
            sd[q + name + '.weight'], sd[q + name + '.bias'] = rnd(out_dim, in_dim), rnd(out_dim)
        if layer_scale:
            sd[q + 'gamma_1'], sd[q + 'gamma_2'] = rnd(d, offset=0.1), rnd(d, offset=0.1)
    sd[p + 'norm.weight'], sd[p + 'norm.bias'] = rnd(d, offset=1.0), rnd(d)
    sd[p + 'head.weight'], sd[p + 'head.bias'] = rnd(num_classes, d), rnd(num_classes)
    return sd


def to_official_swin(sd: dict) -> dict:
    """timm Swin keys -> the Microsoft/old-timm layout (downsample at the end of a stage, plain head, mask buffers)."""
    out = {}
    for k, v in sd.items():
        parts = k.split('.')
        if parts[0] == 'layers' and parts[2] == 'downsample':
            parts[1] = str(int(parts[1]) - 1)
        out['.'.join(parts).replace('head.fc.', 'head.')] = v
    out['layers.0.blocks.1.attn_mask'] = torch.zeros(64, 49, 49)
    return out



LEVIT = ((192, 288, 384), (3, 5, 6)), ((256, 384, 512), (4, 6, 8))  # (C, heads) per stage; key dim 32, depth 4/4/4


def official_levit_state(seed: int = 0, num_classes: int = 1000, img_size: int = 224) -> dict[str, torch.Tensor]:
    """Random tensors under the FB LeViT keys of levit_192_256_release.pth, built from the architecture description
    (Conv2d_BN/Linear_BN = ``c`` + ``bn``, BN_Linear heads = ``bn`` + ``l``, attention ratio 2, MLP ratio 2,
    subsample: key dim 32, heads C/32, attention ratio 4, MLP ratio 2, stride 2)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def bn(p, n):
        sd.update({p + 'weight': torch.randn(n, generator=g) * 0.1 + 1, p + 'bias': torch.randn(n, generator=g) * .1,
                   p + 'running_mean': torch.randn(n, generator=g) * .1,
                   p + 'running_var': torch.rand(n, generator=g) + 0.5, p + 'num_batches_tracked': torch.tensor(7)})

    def cbn(p, *shape):
        sd[p + 'c.weight'] = torch.randn(*shape, generator=g) * 0.05
        bn(p + 'bn.', shape[0])

    for i, (dims, heads) in enumerate(LEVIT):
        a = f'anchors.{i}.'
        chans = (3, dims[0] // 8, dims[0] // 4, dims[0] // 2, dims[0])
        for j in range(4):
            cbn(f'{a}patch_embed.{2 * j}.', chans[j + 1], chans[j], 3, 3)
        n, res = 0, img_size // 16
        for s, (d, h) in enumerate(zip(dims, heads)):
            for _ in range(4):
                p = f'{a}blocks.{n}.m.'
                cbn(p + 'qkv.', h * (32 + 32 + 64), d)
                cbn(p + 'proj.1.', d, h * 64)
                sd[p + 'attention_biases'] = torch.randn(h, res * res, generator=g)
                sd[p + 'attention_bias_idxs'] = torch.zeros(res * res, res * res, dtype=torch.long)
                cbn(f'{a}blocks.{n + 1}.m.0.', 2 * d, d)
                cbn(f'{a}blocks.{n + 1}.m.2.', d, 2 * d)
                n += 2
            if s < 2:
                p, hs, out = f'{a}blocks.{n}.', d // 32, dims[s + 1]
                cbn(p + 'kv.', hs * (32 + 128), d)
                cbn(p + 'q.1.', hs * 32, d)
                cbn(p + 'proj.1.', out, hs * 128)
                sd[p + 'attention_biases'] = torch.randn(hs, res * res, generator=g)
                sd[p + 'attention_bias_idxs'] = torch.zeros((res // 2 + res % 2) ** 2, res * res, dtype=torch.long)
                cbn(f'{a}blocks.{n + 1}.m.0.', 2 * out, out)
                cbn(f'{a}blocks.{n + 1}.m.2.', out, 2 * out)
                n, res = n + 2, (res - 1) // 2 + 1
        for head in ('head', 'head_dist'):
            bn(f'{a}{head}.bn.', dims[-1])
            sd[f'{a}{head}.l.weight'] = torch.randn(num_classes, dims[-1], generator=g) * 0.05
            sd[f'{a}{head}.l.bias'] = torch.randn(num_classes, generator=g) * 0.05
    for s in range(2):
        for layer in range(3):
            sd[f'stitch_layers.{s}.0.{layer}.transform.weight'] = torch.randn(
                LEVIT[1][0][s], LEVIT[0][0][s], generator=g) * 0.05
            sd[f'stitch_layers.{s}.0.{layer}.transform.bias'] = torch.randn(LEVIT[1][0][s], generator=g) * 0.05
    return sd



def official_snnetv2_state(dims: tuple[int, int], depths: tuple[int, int], num_classes: int = 1000, img_size: int = 224,
                           patch: int = 16, lora_rank: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys of the SN-Netv2 releases (``snnetv2_deit3_*.pth``), built from the
    architecture description: ``anchors.{0,1}.*`` (small, large) in the DeiT-3 ``vit_models`` layout (LayerScale
    ``gamma_1``/``gamma_2`` per block, ``pos_embed`` without a class-token slot, qkv bias) and
    ``stitch_layers.{0,1}.{layer}.transform.{weight,bias,lora_A,lora_B}``: one small->large layer per small block,
    one large->small layer per large->small position (every large block but the last with equal depths, every odd
    one but the last with twice the depth). The Identity ending each list has no tensors."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {}
    for i, (d, depth) in enumerate(zip(dims, depths)):
        sd.update(_official_vit(rnd, f'anchors.{i}.', d, depth, (img_size // patch) ** 2, patch, num_classes,
                                layer_scale=True))
    small, large = depths
    num_ls = sum(1 for i in range(large - 1) if large == small or i % 2 == 1)
    for c, (d_in, d_out, n) in enumerate(((dims[0], dims[1], small), (dims[1], dims[0], num_ls))):
        for layer in range(n):
            t = f'stitch_layers.{c}.{layer}.transform.'
            sd.update({t + 'weight': rnd(d_out, d_in), t + 'bias': rnd(d_out), t + 'lora_A': rnd(lora_rank, d_in),
                       t + 'lora_B': rnd(d_out, lora_rank)})
    return sd


def snnetv2_to_timm_stitch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SN-Netv2 release keys as timm-stitch names them: LayerScale ``gamma_N`` -> ``lsN.gamma``, official
    stitching list ``c`` -> pair ``c`` of token stage 0."""
    out = {}
    for key, value in state.items():
        key = re.sub(r'\.gamma_(\d)$', r'.ls\1.gamma', key)
        out[re.sub(r'^stitch_layers\.(\d+)\.', r'stitch_layers.0.\1.', key)] = value
    return out



# ---- any architecture: our keys back to the release's, and the files' wrappers ------------------------------------

#: anchors in the Microsoft / old-timm Swin layout, and the official index of our first stitched stage
_SWIN_ANCHORS = {'snnet_swin_tsb': (0, 1, 2), 'snnet_resnet18_swin_ti': (1,)}
_STAGE_OFFSET = {'snnet_resnet_18_50': 1, 'snnet_resnet18_swin_ti': 1}


def official_state(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the official release keys of ``arch`` (not LeViT: see official_levit_state)."""
    anchors: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in model.state_dict().items():
        if m := re.fullmatch(r'anchors\.(\d+)\.(.+)', key):
            anchors.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            stage, pair, layer, rest = re.fullmatch(r'stitch_layers\.(\d+)\.(\d+)\.(\d+)\.(.+)', key).groups()
            index = f'{pair}.{layer}' if arch == 'snnet_deit_tsb' else \
                f'{int(stage) - _STAGE_OFFSET.get(arch, 0)}.{pair}.{layer}'
            out[f'stitch_layers.{index}.{rest}'] = value
    for i, sub in anchors.items():
        sub = to_official_swin(sub) if i in _SWIN_ANCHORS.get(arch, ()) else sub
        out.update({f'anchors.{i}.{k}': v for k, v in sub.items()})
    return out


class CfgNode(dict):
    """Stands in for yacs's CfgNode, which the Swin release pickles as ``config``."""


def save_release(state: dict[str, torch.Tensor], arch: str, path: Path, legacy: bool = False) -> Path:
    """Write ``state`` as ``arch``'s release file does: DeiT/LeViT ``{'model', 'optimizer', 'lr_scheduler', 'epoch',
    'scaler', 'args'}``, Swin ``{'model', ..., 'max_accuracy', 'config'}``, ResNet (timm's saver) ``{'state_dict'
    with 'module.' keys, 'arch', 'args', 'version', 'metric', ...}``; ``legacy`` writes the pre-1.6 torch format."""
    args = argparse.Namespace(model=arch, lr=5e-4, epochs=300, data_path='/data/imagenet')
    optimizer = {'state': {}, 'param_groups': [{'lr': 1e-6, 'params': [0, 1]}]}
    if arch in ('snnet_deit_tsb', 'snnet_levit_192_256'):
        ckpt = {'model': state, 'optimizer': optimizer, 'lr_scheduler': {'last_epoch': 299}, 'epoch': 299,
                'scaler': {'scale': 65536.0}, 'args': args}
    elif arch == 'snnet_swin_tsb':
        ckpt = {'model': state, 'optimizer': optimizer, 'lr_scheduler': {'last_epoch': 29}, 'max_accuracy': 84.2,
                'epoch': 29, 'scaler': {'scale': 65536.0}, 'config': CfgNode(MODEL=CfgNode(TYPE='snnet'))}
    else:
        ckpt = {'epoch': 99, 'arch': 'snnet', 'state_dict': {f'module.{k}': v for k, v in state.items()},
                'optimizer': optimizer, 'version': 2, 'args': args, 'metric': 77.0}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path
