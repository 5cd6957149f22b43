"""Training a tiny stitched network on a generated ImageFolder: one process and torchrun (gloo, 2 ranks)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from image_folders import ANCHORS, make_image_folder, write_config
from safetensors.torch import load_file

import timm_stitch  # noqa: F401
from timm_stitch.errors import RouteIdError
from timm_stitch.train import main, param_groups, parse_args


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'))


def _train(tmp_path, data, *extra, name='run', **config) -> Path:
    cfg = write_config(tmp_path / f'{name}.yaml', **config)
    assert main(['-c', str(cfg), '--data-dir', str(data), '--out', str(tmp_path), '--experiment', name,
                 *extra]) == 0
    return tmp_path / name


def _summary(run: Path) -> list[dict]:
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


def test_single_process_loss_falls_and_checkpoints_load(tmp_path, data):
    run = _train(tmp_path, data, '--stitch-init-samples', '32', '--val-routes', 'all')
    rows = _summary(run)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss']) - 0.1
    assert float(rows[-1]['eval_top1']) > 40  # 4 classes: chance is 25
    names = {p.name for p in run.iterdir()}
    assert {'last.safetensors', 'last.state.pth', 'model_best.safetensors', 'args.yaml', 'summary.csv'} <= names
    assert not any(n.endswith('.tmp') for n in names)
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    model.load_state_dict(load_file(run / 'last.safetensors'))  # strict: every key, no extras
    state = torch.load(run / 'last.state.pth', weights_only=False)
    assert state['epoch'] == 2 and state['num_updates'] == 3 * 10 and state['sampler']['step'] == 30


def test_resume_continues_with_the_same_state(tmp_path, data):
    extra = ('--model-ema', '--route-sampling', 'flops-grouped', '--route-group-gap', '1e-6', '--mixup', '0.2',
             '--anchor-route-weight', '3')
    full = _train(tmp_path, data, *extra, name='full')
    _train(tmp_path, data, *extra, '--stop-epoch', '2', name='part')
    assert torch.load(tmp_path / 'part' / 'last.state.pth', weights_only=False)['epoch'] == 1
    _train(tmp_path, data, *extra, '--resume', str(tmp_path / 'part' / 'last.state.pth'), name='part')
    for suffix in ('.safetensors', '_ema.safetensors'):
        a, b = load_file(full / f'last{suffix}'), load_file(tmp_path / 'part' / f'last{suffix}')
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), suffix
    sa, sb = (torch.load(r / 'last.state.pth', weights_only=False) for r in (full, tmp_path / 'part'))
    assert sa['sampler'] == sb['sampler'] and sa['num_updates'] == sb['num_updates'] == 30
    weights = sa['sampler']['route_weights']
    assert weights[:len(ANCHORS)] == [3.0] * len(ANCHORS) and set(weights[len(ANCHORS):]) == {1.0}
    assert [r['train_loss'] for r in _summary(full)] == [r['train_loss'] for r in _summary(tmp_path / 'part')]


def test_frozen_anchors_distillation_and_lr_scales(tmp_path, data):
    run = _train(tmp_path, data, '--freeze-anchors', '--kd-model', 'test_vit', '--no-kd-pretrained',
                 '--kd-type', 'soft', '--kd-tau', '2', '--stitch-lr-scale', '2', '--val-routes', 'none', epochs=1)
    torch.manual_seed(42)  # the trainer's seed: same untrained anchors
    start = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    trained = load_file(run / 'last.safetensors')
    for k, v in start.state_dict().items():
        if k.startswith('anchors.'):
            assert torch.equal(v, trained[k]), k
    assert any(not torch.equal(v, trained[k]) for k, v in start.state_dict().items() if k.startswith('stitch_'))



def test_drop_path_one_rate_per_anchor(tmp_path, data):
    """``--drop-path`` takes one rate for every anchor or one per anchor (the SN-Netv2 recipes give each its own)."""
    run = _train(tmp_path, data, '--drop-path', '0', '0.25', '--val-routes', 'none', epochs=1)
    assert yaml.safe_load((run / 'args.yaml').read_text())['drop_path'] == [0.0, 0.25]
    from timm_stitch.train_setup import _create_model
    args = parse_args(['-c', str(tmp_path / 'run.yaml'), '--data-dir', str(data), '--drop-path', '0', '0.25'])
    model = _create_model(args, torch.device('cpu'))
    rates = [[getattr(b.drop_path1, 'drop_prob', 0.0) for b in a.blocks] for a in model.anchors]
    assert rates[0] == [0.0, 0.0] and rates[1][-1] == pytest.approx(0.25)


def test_train_routes_limit_what_is_trained(tmp_path, data):
    """``--train-routes`` limits the sampler to the routes named: here only anchor 0 changes."""
    run = _train(tmp_path, data, '--train-routes', '0', '--val-routes', 'none', '--weight-decay', '0', epochs=1)
    torch.manual_seed(42)  # the trainer's seed: same untrained anchors
    start = timm.create_model('snnet', anchors=ANCHORS, num_classes=4).state_dict()
    trained = load_file(run / 'last.safetensors')
    changed = {k.split('.')[0] + '.' + k.split('.')[1] for k, v in start.items() if not torch.equal(v, trained[k])}
    assert changed == {'anchors.0'}
    from timm_stitch.train_args import check_args
    from timm_stitch.train_setup import _create_sampler

    def sampled(*argv):
        args = parse_args(['-c', str(tmp_path / 'run.yaml'), '--data-dir', str(data), *argv])
        check_args(args)
        args.rank = 0  # set by the trainer's distributed setup
        return _create_sampler(timm.create_model('snnet', anchors=ANCHORS, num_classes=4), args)[1]
    assert sampled('--train-routes', '0-3', '--freeze-anchors') == [2, 3]
    with pytest.raises(ValueError, match='names only anchor routes'):
        sampled('--train-routes', '1', '--freeze-anchors')
    with pytest.raises(RouteIdError, match=r'out of range: valid ids are 0\.\.'):
        sampled('--train-routes', '99')



def test_param_groups_split_stitches_and_anchors_and_skip_decay():
    model = timm.create_model('snnet', anchors=ANCHORS, num_classes=4)
    groups = param_groups(model, weight_decay=0.05, stitch_lr_scale=10, anchor_lr_scale=0.1)
    by_id = {id(p): g for g in groups for p in g['params']}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)
    for name, p in names.items():
        g = by_id[id(p)]
        assert g['lr_scale'] == (10 if name.startswith('stitch_layers.') else 0.1)
        no_decay = p.ndim <= 1 or name in model.no_weight_decay()
        assert g['weight_decay'] == (0.0 if no_decay else 0.05), name
    assert by_id[id(names['anchors.0.pos_embed'])]['weight_decay'] == 0.0  # timm's own no_weight_decay


@pytest.mark.parametrize('argv, error, match', [
    (['--model', 'snnet_deit_tsb', '--data-dir', '/no/such/dir'], FileNotFoundError, 'does not exist'),
    (['--model', 'snnet_nope', '--data-dir', '.'], ValueError, 'unknown model'),
    (['--data-dir', '.'], ValueError, '--model is required'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--resume', 'x', '--initial-checkpoint', 'y'], ValueError,
     'contradict'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--freeze-anchors', '--anchor-lr-scale', '0.1'], ValueError,
     'contradict'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--route-group-k', '2'], ValueError, 'flops-grouped only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--anchor-route-weight', '0'], ValueError, 'must be > 0'),
    # options that act only with another one are errors without it, not silent no-ops
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--amp-dtype', 'bfloat16'], ValueError, 'needs --amp'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--model-ema-decay', '0.9'], ValueError,
     '--model-ema-decay applies with --model-ema only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--model-ema-warmup'], ValueError, 'with --model-ema only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--clip-mode', 'agc'], ValueError, 'with --clip-grad only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--route-group-gap', '2'], ValueError, 'flops-grouped only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--kd-alpha', '0.3'], ValueError, 'with --kd-model only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--no-kd-pretrained'], ValueError, 'with --kd-model only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--kd-model', 'resnet18', '--kd-tau', '2'], ValueError,
     '--kd-tau applies with --kd-type soft only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--no-resume-opt'], ValueError, 'with --resume only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--lr', '0.1', '--lr-base', '0.5'], ValueError,
     '--lr-base applies with no --lr only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--mixup-prob', '0.5'], ValueError, 'with --mixup, --cutmix'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--stitch-init-mode', 'average'], ValueError,
     'with --stitch-init-samples only'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--val-routes', 'none', '-vb', '8'], ValueError,
     "--validation-batch-size applies with --val-routes other than 'none' only"),
    (['--model', 'snnet_vit_fmnist_tsb', '--data-dir', '.', '--input-img-mode', 'RGB'], ValueError,
     'the model takes 1'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--drop-path', '1.5'], ValueError,
     r'--drop-path rates must be in \[0, 1\), got 1.5'),
    (['--model', 'snnet_deit_tsb', '--data-dir', '.', '--drop-path', '0.1', '-0.1'], ValueError, r'in \[0, 1\)'),
    (['--model', 'snnet_deit_ts', '--data-dir', '.', '--anchors', 'vit_fmnist_tiny,vit_fmnist_small'], ValueError,
     'anchors apply to the generic --model snnet only: snnet_deit_ts has its own anchors'),
])
def test_bad_arguments_raise_clear_errors(argv, error, match):
    with pytest.raises(error, match=match):
        main(argv)


def test_config_file_sets_defaults_the_command_line_overrides(tmp_path):
    cfg = write_config(tmp_path / 'c.yaml', lr=0.5)
    args = parse_args(['-c', str(cfg), '--lr', '0.25'])
    assert args.lr == 0.25 and args.opt == 'adamw' and args.model_kwargs['anchors'] == ANCHORS
    (tmp_path / 'bad.yaml').write_text('learning_rate: 1\n')
    with pytest.raises(ValueError, match='unknown options'):
        parse_args(['-c', str(tmp_path / 'bad.yaml')])


@pytest.mark.parametrize('configs', [
    pytest.param(p, id=p.stem) for p in sorted((Path(timm_stitch.__file__).parent / 'configs').glob('*.yaml'))])
def test_recipe_configs_parse(configs):
    args = parse_args(['-c', str(configs)])
    assert args.model and args.epochs >= 1


@pytest.mark.integration
def test_torchrun_two_ranks_agree_and_loss_falls(tmp_path, data):
    cfg = write_config(tmp_path / 'ddp.yaml', epochs=3, batch_size=8)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
           '-m', 'timm_stitch.train', '-c', str(cfg), '--data-dir', str(data), '--out', str(tmp_path),
           '--experiment', 'ddp', '--stitch-init-samples', '32', '--route-sync', 'per-rank']
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'weights identical on 2 ranks' in result.stderr + result.stdout
    rows = _summary(tmp_path / 'ddp')
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    state = torch.load(tmp_path / 'ddp' / 'last.state.pth', weights_only=False)
    assert state['num_updates'] == 3 * 160 // (2 * 8)  # the data is split between the ranks


def test_cli_subcommand_reads_the_config_and_the_command_line_wins(tmp_path, data):
    from timm_stitch.cli import main as cli_main
    cfg = write_config(tmp_path / 'cli.yaml')
    assert cli_main(['train', '-c', str(cfg), '--data-dir', str(data), '--out', str(tmp_path), '--experiment',
                     'cli', '--epochs', '1', '--lr', '0.001', '--val-routes', 'none']) == 0
    saved = yaml.safe_load((tmp_path / 'cli' / 'args.yaml').read_text())
    assert saved['epochs'] == 1 and saved['lr'] == 0.001 and saved['opt'] == 'adamw' and saved['batch_size'] == 16


def test_bad_data_fails_before_the_output_folder_is_made(tmp_path, data):
    with pytest.raises(ValueError, match='the model takes 1'):
        main(['--model', 'snnet_vit_fmnist_tsb', '--data-dir', str(data), '--input-img-mode', 'RGB', '--out',
              str(tmp_path / 'out'), '--experiment', 'run'])
    with pytest.raises(ValueError, match='less than one batch'):
        main(['-c', str(write_config(tmp_path / 'c.yaml', batch_size=1000)), '--data-dir', str(data), '--out',
              str(tmp_path / 'out'), '--experiment', 'run'])
    assert not (tmp_path / 'out').exists()


def test_setup_then_the_loop_is_a_run(tmp_path, data):
    import contextlib

    from timm_stitch.fingerprint import weights_fingerprint
    from timm_stitch.train import setup, train_loop
    args = parse_args(['-c', str(write_config(tmp_path / 'c.yaml', epochs=1)), '--data-dir', str(data),
                       '--out', str(tmp_path), '--experiment', 'run', '--val-routes', 'none'])
    with contextlib.ExitStack() as locks:
        run = setup(args, locks)
        assert (run.start_epoch, run.num_updates, run.loader_eval) == (0, 0, None)
        assert run.route_ids == list(range(run.model.num_routes)) and run.output_dir == str(tmp_path / 'run')
        digest = train_loop(run)
    assert run.num_updates == len(run.loader_train)
    assert digest == weights_fingerprint(load_file(tmp_path / 'run' / 'last.safetensors'), length=64)
