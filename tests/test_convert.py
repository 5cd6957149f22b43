"""Official checkpoint converters, on synthetic checkpoints with the official key layout (official_layouts.py).

The converted models are checked against an independent forward of the raw official tensors written here in plain
torch (SPEC §2.3: stitched DeiT routes end last block -> cls token -> head, with no final norm).
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from official_layouts import (
    DIMS,
    HEADS,
    PATCH,
    official_deit_state,
    official_levit_state,
    official_state,
    to_official_swin,
)
from tiny_models import SMALL_ARCHS

from timm_stitch.cli import main
from timm_stitch.convert import convert_official, read_checkpoint
from timm_stitch.errors import ReleaseFormatError
from timm_stitch.hub import CARD_NAME


def official_routes(depth: int) -> list[tuple]:
    """(anchors, (front, end), layer) per official route id: SPEC §2.1's closed form."""
    positions = [((0, 0), 0), ((0, 1), 0), ((1, 0), 0), ((1, 1), 0)]
    for p in range(4, 4 + 3 * (depth - 2)):
        w, r = (p - 4) // 3 + 1, (p - 4) % 3
        positions.append(([(w, w + 1), (w + 1, w), (w + 1, w + 1)][r], w))
    return [((a,), None, None) for a in range(3)] + [((c, c + 1), pos, layer) for c in range(2)
                                                     for pos, layer in positions]


def _block(x, sd, p, heads):
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], eps=1e-6)
    qkv = F.linear(h, sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias'])
    q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(x.shape), sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
    h = F.layer_norm(x, (d,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], eps=1e-6)
    h = F.gelu(F.linear(h, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias']))
    return x + F.linear(h, sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])


def reference_forward(sd, x, anchors, position, layer, depth):
    """The official route forward on the raw official tensors."""
    a = anchors[0]
    p = f'anchors.{a}.'
    x = F.conv2d(x, sd[p + 'patch_embed.proj.weight'], sd[p + 'patch_embed.proj.bias'], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + 'cls_token'].expand(x.shape[0], -1, -1), x], 1) + sd[p + 'pos_embed']
    if position is None:
        for b in range(depth):
            x = _block(x, sd, f'{p}blocks.{b}.', HEADS[a])
        x = F.layer_norm(x, (DIMS[a],), sd[p + 'norm.weight'], sd[p + 'norm.bias'], eps=1e-6)
    else:
        front, end = position
        for b in range(front + 1):
            x = _block(x, sd, f'{p}blocks.{b}.', HEADS[a])
        s = f'stitch_layers.{a}.{layer}.transform.'
        x = F.linear(x, sd[s + 'weight'], sd[s + 'bias'])
        a = anchors[1]
        p = f'anchors.{a}.'
        for b in range(end, depth):
            x = _block(x, sd, f'{p}blocks.{b}.', HEADS[a])  # ...and no final norm (SPEC §2.4)
    return F.linear(x[:, 0], sd[p + 'head.weight'], sd[p + 'head.bias'])


TINY = dict(depth=3, img_size=32, num_classes=10)


@pytest.fixture(scope='module')
def official():
    return official_deit_state(**TINY)


@torch.no_grad()
def test_deit_matches_independent_forward(official):
    model = convert_official(official, 'snnet_deit_tsb', **TINY)
    assert model.final_norm_on_stitched_routes is False
    routes = official_routes(TINY['depth'])
    assert model.num_routes == len(routes) == 17
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for k, (anchors, position, layer) in enumerate(routes):
        route = model.routes()[k]
        assert route.anchors == anchors and (position is None or route.cuts == (position,))
        expected = reference_forward(official, x, anchors, position, layer, TINY['depth'])
        assert (model(x, stitch_id=k) - expected).abs().max().item() < 1e-4, k
    # the compat flag matters: with the final norm, stitched routes differ from the official forward
    model.final_norm_on_stitched_routes = True
    assert (model(x, stitch_id=5) - reference_forward(official, x, (0, 1), (1, 0), 0, 3)).abs().max() > 1e-2


class Evil:
    def __reduce__(self):
        return os.system, ('touch pwned-by-pickle',)


@pytest.mark.parametrize('wrapper', ['model', 'state_dict', 'raw'])
def test_reads_wrappers_without_running_pickled_code(official, wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {f'module.{k}': v for k, v in official.items()} if wrapper == 'state_dict' else official
    ckpt = state if wrapper == 'raw' else {
        wrapper: state, 'epoch': 299, 'args': argparse.Namespace(lr=5e-4, model='snnet'), 'hook': Evil()}
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    read = read_checkpoint(tmp_path / 'ckpt.pth')
    assert not (tmp_path / 'pwned-by-pickle').exists()
    assert read.keys() == official.keys() and all(torch.equal(read[k], official[k]) for k in official)


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('anchors.1.blocks.2.mlp.fc1.bias'), '1 missing: anchors.1.blocks.2.mlp.fc1.bias'),
    (lambda sd: sd.update({'anchors.0.extra.weight': torch.zeros(1)}), '1 unmatched: anchors.0.extra.weight'),
    (lambda sd: sd.update({'stitch_layers.0.5.transform.weight': torch.zeros(1)}), 'unmatched: stitch_layers.0.5'),
    (lambda sd: sd.update({'stitch_layers.0.0.transform.weight': torch.zeros(384, 190)}),
     r'mis-shaped: stitch_layers.0.0.0.transform.weight \(384, 190\) \(expected \(384, 192\)\)'),
])
def test_bad_keys_fail_loudly(official, change, message):
    state = dict(official)
    change(state)
    with pytest.raises(ReleaseFormatError, match=message):
        convert_official(state, 'snnet_deit_tsb', **TINY)


def test_checkpoint_of_another_configuration(official):
    with pytest.raises(ReleaseFormatError, match='not a ziplab/SN-Net v1.0 snnet_deit.pth checkpoint.*unmatched'):
        convert_official(official, 'snnet_deit_tsb', **{**TINY, 'depth': 2})
    with pytest.raises(ValueError, match="no official checkpoint format for 'snnet_deit_ts'"):
        convert_official(official, 'snnet_deit_ts')


def test_dropped_buffers(official):
    state = {**official, 'anchors.0.blocks.0.attn.relative_position_index': torch.zeros(3),
             'anchors.1.bn.aux_bn.0.weight': torch.zeros(3)}
    convert_official(state, 'snnet_deit_tsb', **TINY)


def test_cli_convert_to_hub_folder(official, tmp_path, capsys):
    torch.save({'model': official}, tmp_path / 'snnet_deit.pth')
    out = tmp_path / 'out'
    args = ['convert', str(tmp_path / 'snnet_deit.pth'), '--model', 'snnet_deit_tsb', '--out', str(out),
            '--model-kwargs', 'depth=3', 'img_size=32', 'num_classes=10']
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors', 'routes.json']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)  # config.json carries the model args
    assert loaded.final_norm_on_stitched_routes is False and loaded.num_classes == 10
    assert loaded.routes()[7].top1 is None and loaded.card is not None
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x, stitch_id=7), reference_forward(official, x, (0, 1), (1, 2), 1, 3), atol=1e-4)
    assert (out / CARD_NAME).is_file()

    # a failed convert leaves nothing behind
    torch.save({'model': {**official, 'anchors.0.bogus': torch.zeros(1)}}, tmp_path / 'bad.pth')
    capsys.readouterr()
    assert main(['convert', str(tmp_path / 'bad.pth'), '--out', str(tmp_path / 'bad'),
                 '--model-args', '{"depth": 3}']) == 2
    assert 'timm-stitch: error:' in (err := capsys.readouterr().err) and 'unmatched' in err
    assert not (tmp_path / 'bad').exists()


@pytest.mark.slow
@torch.no_grad()
def test_full_size_deit_with_reported_card(tmp_path):
    """The real snnet_deit.pth layout (12 blocks, 224 px, 1000 classes): reported accuracy attached, marked so."""
    state = official_deit_state(depth=12, img_size=224, num_classes=1000)
    torch.save({'model': state}, tmp_path / 'snnet_deit.pth')
    model = convert_official(tmp_path / 'snnet_deit.pth', 'snnet_deit_tsb')
    assert model.num_routes == 71
    routes = model.routes()
    assert routes[39].top1 == pytest.approx(82.042, abs=1e-3) and routes[39].extra['accuracy']['source'] == 'reported'
    assert model.card.provenance[-1]['checkpoint_sha256'] is not None
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    table = official_routes(12)
    for k in (0, 3, 24, 39, 56, 70):
        anchors, position, layer = table[k]
        assert (model(x, stitch_id=k) - reference_forward(state, x, anchors, position, layer, 12)).abs().max() < 1e-3


# ---- ResNet-18 -> ResNet-50 / Swin-Ti (SPEC §4): official `stitch_layers.{stage-1}.0.{l}`, split-BN copies ----------

# (stage, (front, end), official layer) per stitched route, from SPEC §4's tables
RESNET_ROUTES = {
    'snnet_resnet_18_50': [(1, (0, 1), 0), (1, (1, 2), 0), (1, (1, 3), 1),
                           (2, (0, 1), 0), (2, (0, 2), 0), (2, (1, 3), 0), (2, (1, 4), 1), (2, (1, 5), 1)],
    'snnet_resnet18_swin_ti': [(1, (0, 1), 0), (2, (0, 1), 0), (2, (0, 2), 0), (2, (1, 3), 0), (2, (1, 4), 1),
                               (2, (1, 5), 1)],
}
END_ANCHOR = {'snnet_resnet_18_50': 'resnet50', 'snnet_resnet18_swin_ti': 'swin_tiny_patch4_window7_224'}


@pytest.fixture(scope='module', params=list(RESNET_ROUTES))
def official_resnet(request):
    arch = request.param
    torch.manual_seed(0)
    front, end = timm.create_model('resnet18').eval(), timm.create_model(END_ANCHOR[arch]).eval()
    for m in (front, end):  # non-trivial BatchNorm statistics
        for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    end_sd = end.state_dict() if arch == 'snnet_resnet_18_50' else to_official_swin(end.state_dict())
    state = {f'module.anchors.0.{k}': v for k, v in front.state_dict().items()}
    state |= {f'module.anchors.1.{k}': v for k, v in end_sd.items()}
    state['module.anchors.0.bn1.aux_bn.0.weight'] = torch.ones(64)  # --split-bn training copies are dropped
    end_dims = (512, 1024) if arch == 'snnet_resnet_18_50' else (192, 384)
    g = torch.Generator().manual_seed(1)
    for s, (d_in, d_out) in enumerate(zip((128, 256), end_dims)):
        for layer in range(1 if (arch, s) == ('snnet_resnet18_swin_ti', 0) else 2):
            state[f'module.stitch_layers.{s}.0.{layer}.transform.weight'] = torch.randn(d_out, d_in, 1, 1,
                                                                                     generator=g) * d_in ** -0.5
            state[f'module.stitch_layers.{s}.0.{layer}.transform.bias'] = torch.randn(d_out, generator=g) * 0.1
    return arch, state, front, end


def _resnet_route(front, end, state, x, stage, position, layer):
    """Official forward (SPEC §4): ResNet stem, stages and blocks 0..j; 1x1 conv; end blocks k.., later stages, head."""
    j, k = position
    x = front.maxpool(front.act1(front.bn1(front.conv1(x))))
    stages = [front.layer1, front.layer2, front.layer3, front.layer4]
    for s in range(stage):
        x = stages[s](x)
    x = stages[stage][:j + 1](x)
    w = f'module.stitch_layers.{stage - 1}.0.{layer}.transform.'
    x = F.conv2d(x, state[w + 'weight'], state[w + 'bias'])
    if isinstance(end, timm.models.ResNet):
        stages = [end.layer1, end.layer2, end.layer3, end.layer4]
        x = stages[stage][k:](x)
        for s in range(stage + 1, 4):
            x = stages[s](x)
        return end.forward_head(x)
    x = x.permute(0, 2, 3, 1)  # NHWC tokens for Swin
    x = end.layers[stage].blocks[k:](x)
    for s in range(stage + 1, 4):
        x = end.layers[s](x)
    return end.forward_head(end.norm(x))


@pytest.mark.filterwarnings('ignore:route .* BatchNorm')  # stitched routes use the end anchor's BN statistics
@torch.no_grad()
def test_resnet_matches_official_forward_with_unpaired_layer_quirk(official_resnet):
    arch, state, front, end = official_resnet
    model = convert_official(state, arch)
    assert model.plan.routes[0].anchors == (0,) and model.num_routes == 2 + len(RESNET_ROUTES[arch])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    for k, (stage, position, layer) in enumerate(RESNET_ROUTES[arch], start=2):
        assert model.routes()[k].stage == stage and model.routes()[k].cuts == (position,)
        expected = _resnet_route(front, end, state, x, stage, position, layer)
        assert (model(x, stitch_id=k) - expected).abs().max().item() < 1e-3, k
    for k, anchor in enumerate((front, end)):
        assert torch.equal(model(x, stitch_id=k), anchor(x))
    # SPEC §9.2: route 4 ((1, 3) in stage 1, R18-R50) uses official layer 1, but position (1, 3) of stage 2 shares
    # layer 0 where the corrected mapping would give it layer 1
    stage2_13 = next(i for i, r in enumerate(RESNET_ROUTES[arch], start=2) if r[:2] == (2, (1, 3)))
    assert model.routes()[stage2_13].stitches[0].layer == 0
    corrected = timm.create_model(arch)
    assert corrected.routes()[stage2_13].stitches[0].layer == 1


@pytest.mark.slow
@torch.no_grad()
def test_swin_tsb_official_layout():
    """snnet_swin.pth layout (SPEC §3.2): Microsoft Swin anchors, `stitch_layers.{stage}.{pair}.{layer}` with the
    official unpaired layer mapping in stage 2 (Ti->S (1, 3) shares layer 0)."""
    torch.manual_seed(0)
    names = ['swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224']
    anchors = [timm.create_model(n).eval() for n in names]
    state = {f'anchors.{i}.{k}': v for i, a in enumerate(anchors) for k, v in to_official_swin(a.state_dict()).items()}
    dims = [(96, 192, 384), (96, 192, 384), (128, 256, 512)]
    layers = {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1, (2, 0): 6, (2, 1): 17}
    g = torch.Generator().manual_seed(1)
    for (stage, pair), count in layers.items():
        d_in, d_out = dims[pair][stage], dims[pair + 1][stage]
        for layer in range(count):
            key = f'stitch_layers.{stage}.{pair}.{layer}.transform.'
            state[key + 'weight'] = torch.randn(d_out, d_in, generator=g) * 0.05
            state[key + 'bias'] = torch.randn(d_out, generator=g) * 0.05
    model = convert_official(state, 'snnet_swin_tsb')
    assert model.num_routes == 41
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    assert [r.stitches[0].layer for r in model.plan.routes[7:24]] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    # id 9: Ti->S stage 2 (1, 3), official layer 0 (SPEC §3.1); id 28: S->B stage 2 (4, 5), layer 4
    for k, (front, end, stage, (j, i), layer) in {9: (0, 1, 2, (1, 3), 0), 28: (1, 2, 2, (4, 5), 4)}.items():
        route = model.plan.routes[k]
        assert route.cuts == ((j, i),) and route.stitches[0].layer == layer
        f, e = anchors[front], anchors[end]
        y = f.patch_embed(x)
        for s in range(stage):
            y = f.layers[s](y)
        y = f.layers[stage].blocks[:j + 1](f.layers[stage].downsample(y))
        w = f'stitch_layers.{stage}.{front}.{layer}.transform.'
        y = e.layers[stage].blocks[i:](F.linear(y, state[w + 'weight'], state[w + 'bias']))
        for s in range(stage + 1, 4):
            y = e.layers[s](y)
        assert (model(x, stitch_id=k) - e.forward_head(e.norm(y))).abs().max() < 1e-3, k


# ---- LeViT-192 -> LeViT-256 (SPEC §5: Facebook LeViT layout) ----------------------------------------------------

@pytest.fixture(scope='module')
def official_levit():
    return official_levit_state()


def test_levit_every_tensor_lands_once(official_levit):
    model = convert_official(official_levit, 'snnet_levit_192_256')
    ours = model.state_dict()
    kept = {k: v for k, v in official_levit.items() if 'attention_bias_idxs' not in k}
    assert len(kept) == len(ours)
    # values are distinct random draws: every official tensor has exactly one equal counterpart under our keys
    by_value = {}
    for k, v in ours.items():
        if v.ndim:
            by_value.setdefault((tuple(v.shape), round(float(v.flatten()[0]), 6), float(v.sum())), []).append(k)
    for k, v in kept.items():
        if v.ndim:
            assert by_value.get((tuple(v.shape), round(float(v.flatten()[0]), 6), float(v.sum()))), k
    sample = {'anchors.1.patch_embed.6.c.weight': 'anchors.1.stem.conv4.linear.weight',
              'anchors.0.blocks.7.m.2.bn.running_var': 'anchors.0.stages.0.blocks.3.mlp.ln2.bn.running_var',
              'anchors.0.blocks.8.q.1.c.weight': 'anchors.0.stages.1.downsample.attn_downsample.q.ln.linear.weight',
              'anchors.1.blocks.19.m.0.c.weight': 'anchors.1.stages.2.downsample.mlp.ln1.linear.weight',
              'anchors.1.blocks.26.m.attention_biases': 'anchors.1.stages.2.blocks.3.attn.attention_biases',
              'anchors.0.head_dist.l.bias': 'anchors.0.head_dist.linear.bias',
              'stitch_layers.1.0.2.transform.weight': 'stitch_layers.1.0.2.transform.weight'}
    for theirs, mine in sample.items():
        assert torch.equal(official_levit[theirs], ours[mine]), theirs


@pytest.mark.filterwarnings('ignore:route 6 runs')
def test_levit_routes_run_and_anchors_match_timm(official_levit):
    model = convert_official(official_levit, 'snnet_levit_192_256')
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, name in enumerate(('levit_192', 'levit_256')):
            ref = timm.create_model(name).eval()
            ref.load_state_dict({k[len(f'anchors.{a}.'):]: v for k, v in model.state_dict().items()
                                 if k.startswith(f'anchors.{a}.')})
            torch.testing.assert_close(model(x, stitch_id=a), ref(x))
        assert model.num_routes == 8
        assert torch.isfinite(model(x, stitch_id=6)).all()


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.update({'anchors.0.blocks.3.m.extra.weight': torch.zeros(1)}), 'anchors.0.blocks.3.m.extra'),
    (lambda sd: sd.pop('anchors.1.blocks.9.m.2.bn.bias'), 'anchors.1.stages.1.downsample.mlp.ln2.bn.bias'),
    (lambda sd: sd.update({'anchors.0.blocks.0.m.qkv.c.weight': torch.zeros(384, 191)}),
     'anchors.0.stages.0.blocks.0.attn.qkv.linear.weight'),
])
def test_levit_bad_keys_fail_loudly(official_levit, change, message):
    sd = dict(official_levit)
    change(sd)
    with pytest.raises(ReleaseFormatError, match=message.replace('.', r'\.')):
        convert_official(sd, 'snnet_levit_192_256')


def test_levit_cli_convert_to_hub_folder(official_levit, tmp_path):
    ckpt = tmp_path / 'levit_192_256_release.pth'
    torch.save({'model': official_levit, 'epoch': 99}, ckpt)
    out = tmp_path / 'hub'
    assert main(['convert', str(ckpt), '--model', 'snnet_levit_192_256', '--out', str(out)]) == 0
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    ref = convert_official(ckpt, 'snnet_levit_192_256')
    ours = loaded.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize('kind', ['legacy', 'random', 'json', 'truncated'])
def test_legacy_and_unreadable_files(official, kind, tmp_path):
    """Legacy (non-zip) torch.save files with pickled args are read; anything else names the file and what was
    expected instead of failing inside torch."""
    path = tmp_path / 'snnet_deit.pth'
    if kind == 'legacy':
        torch.save({'model': official, 'args': argparse.Namespace(lr=5e-4)}, path, _use_new_zipfile_serialization=False)
        assert main(['convert', str(path), '--out', str(tmp_path / 'out'), '--model-args', json.dumps(TINY)]) == 0
        assert (tmp_path / 'out' / 'model.safetensors').is_file()
        return
    if kind == 'truncated':
        torch.save({'model': official, 'args': argparse.Namespace(lr=5e-4)}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.write_bytes(os.urandom(2048) if kind == 'random' else b'{"model": {"anchors.0.cls_token": [0.1]}}')
    what = 'is not a readable PyTorch checkpoint' if kind == 'truncated' else 'is not a PyTorch checkpoint'
    expected = rf'{path} {what} \(expected the ziplab/SN-Net v1.0 snnet_deit.pth release'
    with pytest.raises(ReleaseFormatError, match=expected):
        convert_official(path, 'snnet_deit_tsb', **TINY)


def test_convert_help(capsys):
    with pytest.raises(SystemExit):
        main(['convert', '--help'])
    text = capsys.readouterr().out
    assert '``' not in text and 'SPEC' not in text
    assert 'snnet_swin_tsb for ziplab/SN-Net v1.0 snnet_swin.pth' in ' '.join(text.split())


def test_converted_swin_folder_records_the_layer_mapping(tmp_path):
    """A converted Swin release rebuilds with the official layer mapping from config.json alone (local-dir:), which
    the load does not override."""
    torch.manual_seed(0)
    kwargs = SMALL_ARCHS['snnet_swin_tsb'][0]
    model = timm.create_model('snnet_swin_tsb', layer_mapping='official', **kwargs)
    torch.save({'model': official_state(model, 'snnet_swin_tsb')}, tmp_path / 'snnet_swin.pth')
    assert main(['convert', str(tmp_path / 'snnet_swin.pth'), '--arch', 'snnet_swin_tsb',
                 '--out', str(tmp_path / 'out'), '--model-args', json.dumps(kwargs)]) == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert loaded.plan == model.plan != timm.create_model('snnet_swin_tsb', **kwargs).plan
    ours = loaded.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())
