"""Per-route validation: every route in one pass, sharded under torchrun, resumable, card and CSV written."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from image_folders import ANCHORS, make_image_folder
from safetensors.torch import load_file, save_file

from timm_stitch.cards import RouteCard
from timm_stitch.cli import main as cli_main
from timm_stitch.errors import RouteIdError
from timm_stitch.evaluation import NoImagesError, data_config_for, evaluate_routes, parse_ids
from timm_stitch.validate import main

MODEL_ARGS = ['--model', 'snnet', '--model-kwargs', f'anchors={ANCHORS!r}', '--num-classes', '4', '--img-size', '32',
              '--crop-pct', '1.0', '-b', '8', '-j', '0', '--no-progress']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A 4-class ImageFolder (10 validation images per class) and an untrained checkpoint."""
    root = tmp_path_factory.mktemp('val')
    data = make_image_folder(root / 'data', per_class=(1, 10))
    torch.manual_seed(0)
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / 'w.safetensors')
    return data, root / 'w.safetensors', model.eval()


def _records(out: Path) -> dict:
    return {r['stitch_id']: r for r in map(json.loads, (out / 'routes.jsonl').read_text().splitlines())}


def test_parse_ids():
    assert parse_ids('all', 4) == [0, 1, 2, 3]
    assert parse_ids('3, 0-1,1', 5) == [0, 1, 3]
    for bad in ('5', '1-9', 'x', ''):
        with pytest.raises(ValueError):
            parse_ids(bad, 5)


def test_every_route_matches_a_plain_forward_and_card_is_written(tmp_path, setup):
    data, weights, model = setup
    out = tmp_path / 'out'
    assert cli_main(['validate', *MODEL_ARGS, '--data-dir', str(data), '--checkpoint', str(weights),
                     '--out', str(out)]) == 0
    records = _records(out)
    assert sorted(records) == list(range(model.num_routes))
    # reference: a plain loop over routes with timm's own eval transform and accuracy
    from timm.data import create_dataset, create_transform, resolve_data_config
    from timm.utils import accuracy
    cfg = resolve_data_config({'crop_pct': 1.0, 'img_size': 32}, model=model)
    ds = create_dataset('', root=str(data), split='validation', transform=create_transform(**cfg))
    images, target = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in ds]))
    for k in range(model.num_routes):
        with torch.no_grad():
            top1, top5 = accuracy(model(images, stitch_id=k), target, topk=(1, 4))
        assert records[k]['top1'] == pytest.approx(top1.item(), abs=1e-3)
        assert records[k]['count'] == 40
    card = RouteCard.load(out / 'routes.json')
    assert [r.id for r in card.routes] == list(range(model.num_routes))
    assert all(r.top1 == records[r.id]['top1'] and r.accuracy['source'] == 'measured' for r in card.routes)
    assert all(r.macs and r.params for r in card.routes)
    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['stitch_id']) for r in rows] == list(range(model.num_routes))
    assert {'model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size'} <= set(rows[0])


def test_rerun_skips_recorded_routes(tmp_path, setup):
    data, weights, _ = setup
    out = tmp_path / 'out'
    args = [*MODEL_ARGS, '--data-dir', str(data), '--checkpoint', str(weights), '--out', str(out)]
    assert main([*args, '--routes', '0-2', '--routes-per-pass', '2']) == 0
    first = _records(out)
    assert sorted(first) == [0, 1, 2]
    marked = dict(first[1], top1=12.345)  # as if written by an earlier, interrupted run
    (out / 'routes.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (first[0], marked)))
    assert main([*args, '--routes', 'all']) == 0
    records = _records(out)
    assert records[1]['top1'] == 12.345  # kept, not recomputed
    assert records[2] == first[2]  # recomputed, same result
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]


def test_errors(tmp_path, setup):
    data, _, _ = setup
    with pytest.raises(FileNotFoundError, match='does not exist'):
        main([*MODEL_ARGS, '--data-dir', str(tmp_path / 'none')])
    with pytest.raises(ValueError, match='unknown model'):
        main(['--model', 'resnet_nope', '--data-dir', str(data)])
    with pytest.raises(ValueError, match='not a stitched network'):
        main(['--model', 'resnet18', '--data-dir', str(data)])
    with pytest.raises(RouteIdError, match='out of range'):
        main([*MODEL_ARGS, '--data-dir', str(data), '--routes', '99', '--out', str(tmp_path / 'o')])


@pytest.mark.integration
def test_torchrun_shards_give_the_single_process_result(tmp_path, setup):
    data, weights, model = setup
    args = [*MODEL_ARGS, '--data-dir', str(data), '--checkpoint', str(weights)]
    assert main([*args, '--out', str(tmp_path / 'one')]) == 0
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
           '-m', 'timm_stitch.validate', *args, '--out', str(tmp_path / 'two')]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _records(tmp_path / 'one'), _records(tmp_path / 'two')
    for k in one:
        assert two[k]['count'] == 40
        assert two[k]['top1'] == pytest.approx(one[k]['top1']) and two[k]['top5'] == pytest.approx(one[k]['top5'])
        assert two[k]['loss'] == pytest.approx(one[k]['loss'], rel=1e-5)


def test_evaluate_routes_counts_top5_hits():
    class Fixed(torch.nn.Module):
        def forward(self, x, stitch_id=0):
            return torch.tensor([[0.0, 1, 2, 3, 4, 5]] * 2)
    loader = [(torch.zeros(2, 3, 4, 4), torch.tensor([5, 0]))]
    r = evaluate_routes(Fixed(), loader, [0], torch.device('cpu'), progress=False)[0]
    assert r['top1'] == 50 and r['top5'] == 50 and r['count'] == 2  # class 0 ranks sixth


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory, setup):
    """A tiny model trained two steps with a fast EMA: ``last.safetensors`` and ``last_ema.safetensors`` differ."""
    from timm_stitch.train import main as train_main
    data, _, _ = setup
    root = tmp_path_factory.mktemp('ema')
    assert train_main([*MODEL_ARGS, '-b', '4', '--data-dir', str(data), '--epochs', '2', '--warmup-epochs', '0',
                       '--opt', 'adamw', '--lr', '1e-2', '--model-ema', '--model-ema-decay', '0.5',
                       '--val-routes', 'none', '--out', str(root), '--experiment', 'run']) == 0
    return root / 'run'


def _own_losses(weights: Path, data: Path) -> dict[int, float]:
    """Every route's loss with ``weights`` loaded directly, through the evaluation loop alone."""
    from safetensors.torch import load_file
    from timm.data import create_dataset, resolve_data_config

    from timm_stitch.evaluation import eval_loader
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    model.load_state_dict(load_file(weights))
    config = resolve_data_config({'crop_pct': 1.0, 'img_size': 32}, model=model)
    loader = eval_loader(create_dataset('', root=str(data), split='validation'), config, 8)
    results = evaluate_routes(model, loader, range(model.num_routes), torch.device('cpu'), progress=False)
    return {k: r['loss'] for k, r in results.items()}


def test_use_ema_loads_the_ema_weights(tmp_path, setup, ema_run):
    data, _, _ = setup
    args = [*MODEL_ARGS, '--data-dir', str(data), '--checkpoint', str(ema_run / 'last.safetensors')]
    assert main([*args, '--out', str(tmp_path / 'plain')]) == 0
    assert main([*args, '--use-ema', '--out', str(tmp_path / 'ema')]) == 0
    plain, ema = _records(tmp_path / 'plain'), _records(tmp_path / 'ema')
    own_plain, own_ema = _own_losses(ema_run / 'last.safetensors', data), _own_losses(
        ema_run / 'last_ema.safetensors', data)
    for k in plain:
        assert abs(plain[k]['loss'] - ema[k]['loss']) > 1e-4
        assert plain[k]['loss'] == pytest.approx(own_plain[k], abs=1e-6)
        assert ema[k]['loss'] == pytest.approx(own_ema[k], abs=1e-6)


def test_use_ema_of_a_pth_and_without_ema_weights(tmp_path, setup, ema_run):
    from safetensors.torch import load_file
    data, weights, _ = setup
    args = [*MODEL_ARGS, '--data-dir', str(data), '--out', str(tmp_path / 'o')]
    with pytest.raises(FileNotFoundError, match=r'no EMA weights beside it \(expected .*w_ema.safetensors'):
        main([*args, '--checkpoint', str(weights), '--use-ema'])
    plain = load_file(ema_run / 'last.safetensors')
    torch.save({'state_dict': plain}, tmp_path / 'plain.pth')
    with pytest.raises(ValueError, match='holds no EMA weights'):
        main([*args, '--checkpoint', str(tmp_path / 'plain.pth'), '--use-ema'])
    with pytest.raises(ValueError, match='--use-ema needs --checkpoint'):
        main([*args, '--use-ema'])
    torch.save({'state_dict': plain, 'state_dict_ema': load_file(ema_run / 'last_ema.safetensors')},
               tmp_path / 'both.pth')
    assert main([*args, '--checkpoint', str(tmp_path / 'both.pth'), '--use-ema', '--routes', '0']) == 0
    assert _records(tmp_path / 'o')[0]['loss'] == pytest.approx(_own_losses(ema_run / 'last_ema.safetensors',
                                                                             data)[0], abs=1e-6)


@pytest.mark.parametrize('extra, match', [
    (['--amp-dtype', 'bfloat16'], '--amp-dtype bfloat16 needs --amp'),
    (['--routes-per-pass', '-1'], '--routes-per-pass must be >= 0'),
])
def test_ineffective_options_are_errors(tmp_path, setup, extra, match):
    data, weights, _ = setup
    with pytest.raises(ValueError, match=match):
        main([*MODEL_ARGS, '--data-dir', str(data), '--checkpoint', str(weights), *extra])


def _biased_copy(weights: Path, path: Path) -> Path:
    """``weights`` with every head biased to class 0: other weights, other accuracy and loss."""
    state = load_file(weights)
    for key in [k for k in state if k.endswith('head.bias')]:
        state[key] = torch.tensor([20.0, 0.0, 0.0, 0.0])
    save_file(state, path)
    return path


def test_a_rerun_with_other_weights_or_arguments_measures_again(tmp_path, setup, caplog):
    """Validating checkpoint B into the folder of checkpoint A reported A's accuracy beside B's hash."""
    data, weights_a, model = setup
    weights_b = _biased_copy(weights_a, tmp_path / 'b.safetensors')
    args = [*MODEL_ARGS, '--data-dir', str(data)]
    out, fresh = tmp_path / 'out', tmp_path / 'fresh'
    assert main([*args, '--checkpoint', str(weights_b), '--out', str(fresh)]) == 0
    assert main([*args, '--checkpoint', str(weights_a), '--out', str(out)]) == 0
    first = _records(out)
    caplog.clear()
    with caplog.at_level('INFO', logger='timm_stitch.validate'):
        assert main([*args, '--checkpoint', str(weights_b), '--out', str(out)]) == 0
    card, own_card = RouteCard.load(out / 'routes.json'), RouteCard.load(fresh / 'routes.json')
    assert [r.top1 for r in card.routes] == [r.top1 for r in own_card.routes] == [25.0] * model.num_routes
    records, own = _records(out), _records(fresh)
    assert all(abs(records[k]['loss'] - first[k]['loss']) > 1e-3 for k in records)
    assert {k: r['loss'] for k, r in records.items()} == {k: r['loss'] for k, r in own.items()}
    assert f'0 of {model.num_routes} routes reused' in caplog.text
    assert f'{model.num_routes} measured other weights' in caplog.text
    caplog.clear()
    with caplog.at_level('INFO', logger='timm_stitch.validate'):  # another crop: every route measured again
        assert main([*args, '--checkpoint', str(weights_b), '--out', str(out), '--crop-pct', '0.5',
                     '--routes', '0-1']) == 0
    assert '0 of 2 routes reused' in caplog.text and "2 measured with other settings (crop_pct)" in caplog.text
    caplog.clear()
    with caplog.at_level('INFO', logger='timm_stitch.validate'):  # a copy of the same tensors: reused
        copy = _biased_copy(weights_a, tmp_path / 'copy.safetensors')
        assert main([*args, '--checkpoint', str(copy), '--out', str(out), '--crop-pct', '0.5',
                     '--routes', '0-1']) == 0
    assert '2 of 2 routes reused' in caplog.text


@pytest.mark.parametrize('command', ['validate', 'train'])
def test_an_empty_image_folder_is_an_input_error(tmp_path, capsys, command):
    """Exit status 2 like every other bad input (it was 1, timm's RuntimeError), naming the folder."""
    (tmp_path / 'validation').mkdir()
    (tmp_path / 'train').mkdir()
    extra = ['--epochs', '1', '--out', str(tmp_path / 'out')] if command == 'train' else []
    assert cli_main([command, *MODEL_ARGS, '--data-dir', str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert f"timm-stitch: error: no images in '{tmp_path}'" in err and 'Found 0 images' in err
    with pytest.raises(NoImagesError, match='no images in') as info:
        main([*MODEL_ARGS, '--data-dir', str(tmp_path)])
    assert isinstance(info.value, RuntimeError)  # what timm raised, for callers catching that


def test_data_config_takes_the_models_input_channels():
    """``--img-size 32`` on a 1-channel model: (1, 32, 32), not timm's default (3, 32, 32)."""
    import argparse
    model = timm.create_model('snnet_vit_fmnist_tsb')
    assert data_config_for(argparse.Namespace(img_size=32), model)['input_size'] == (1, 32, 32)
    assert data_config_for(argparse.Namespace(img_size=None), model)['input_size'] == (1, 28, 28)
    assert data_config_for(argparse.Namespace(img_size=32, in_chans=3), model)['input_size'] == (3, 32, 32)


def test_default_workers_fit_the_cpus(monkeypatch):
    from timm_stitch.arguments import default_workers
    from timm_stitch.validate import build_parser
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2
    assert build_parser().parse_args(['--model', 'x']).workers == 2
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)), raising=False)
    assert default_workers() == 4
