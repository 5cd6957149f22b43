"""The ``timm-stitch`` command line on a tiny registered architecture (3 tiny anchors, 23 routes), and its errors: one
``timm-stitch: error: ...`` line naming the bad value, exit status 2 for bad input and 1 for other failures, no
traceback unless ``--debug``."""
import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model
from tiny_models import TINY_WIDTHS, tiny_vit_args

from timm_stitch.arguments import parse_count
from timm_stitch.cards import RouteCard
from timm_stitch.cli import SUBCOMMANDS, main
from timm_stitch.models._factory import create_snnet, snnet_cfg

TINY = 'snnet_test_tiny_cli'
ROOT = Path(__file__).resolve().parents[1]

if TINY not in timm.list_models(TINY):
    @register_model
    def snnet_test_tiny_cli(pretrained: bool = False, **kwargs):
        kwargs.pop('pretrained_cfg', None)
        return create_snnet(TINY, [tiny_vit_args(d, h) for d, h in TINY_WIDTHS], pretrained, num_classes=10,
                            pretrained_cfg=snnet_cfg(3, input_size=(3, 32, 32), num_classes=10), **kwargs)


def test_subcommands_are_modules_with_add_parser():
    assert SUBCOMMANDS[:3] == ['timm_stitch.cli.routes', 'timm_stitch.cli.profile', 'timm_stitch.cli.card']
    assert all(callable(importlib.import_module(path).add_parser) for path in SUBCOMMANDS)


def test_parse_count():
    assert (parse_count('5G'), parse_count('22.5M'), parse_count('3e9'), parse_count('7k')) == (5e9, 22.5e6, 3e9, 7e3)
    for bad in ('five', '-3G'):
        with pytest.raises(Exception, match=f'expected a non-negative number .*{bad}'):
            parse_count(bad)


def test_routes_table_sorted_and_filtered(capsys):
    assert main(['routes', TINY, '--sort', 'macs']) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    macs = [float(line.split()[-3]) for line in rows]
    assert len(rows) == 23 and macs == sorted(macs)
    main(['routes', TINY, '--json', '--max-macs', '0.5M'])
    routes = json.loads(capsys.readouterr().out)
    assert routes and all(r['macs'] <= 0.5e6 for r in routes)
    main(['routes', TINY, '--json', '--select', '--max-params', '20k'])
    assert [r['id'] for r in json.loads(capsys.readouterr().out)] == [0]
    assert main(['routes', TINY, '--select', '--max-params', '10']) == 2
    assert 'timm-stitch: error: no route meets the bounds: max_params=10 is below the smallest available params' \
        in capsys.readouterr().err


def test_routes_with_the_shipped_fmnist_card(capsys):
    card = ROOT / 'model_cards' / 'snnet_vit_fmnist_tsb' / 'routes.json'
    top1 = {r.id: r.top1 for r in RouteCard.load(card).routes}
    # the card's accuracies are those of the shipped weights: not of a freshly initialised model
    assert main(['routes', 'snnet_vit_fmnist_tsb', '--card', str(card), '--pareto', '--json']) == 2
    assert 'the route card is stale: the card was measured on other weights' in capsys.readouterr().err
    assert main(['routes', 'snnet_vit_fmnist_tsb', '--pretrained', '--card', str(card), '--pareto', '--min-top1', '89',
                 '--json']) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and all(r['top1'] == top1[r['id']] >= 89 and r['dominated'] is False for r in front)
    assert main(['routes', 'snnet_vit_fmnist_tsb', '--pretrained', '--sort', 'top1', '--json']) == 0
    assert [r['top1'] for r in json.loads(capsys.readouterr().out)] == sorted(top1.values(), reverse=True)


def test_profile_then_card(tmp_path, capsys):
    out = tmp_path / 'routes.json'
    assert main(['profile', TINY, '--repeats', '1', '--warmup', '0', '--out', str(out), '--routes', '0', '2']) == 0
    assert f'wrote {out}' in capsys.readouterr().out
    card = RouteCard.load(out)
    assert card.model == TINY and [r.id for r in card.routes if r.latency] == [0, 2]
    main(['routes', TINY, '--card', str(out), '--max-latency-ms', '1e6', '--json'])
    assert [r['id'] for r in json.loads(capsys.readouterr().out)] == [0, 2]
    plot = [] if importlib.util.find_spec('matplotlib') else ['--no-plot']
    assert main(['card', TINY, '--card', str(out), '--out', str(tmp_path / 'card'), *plot]) == 0
    written = RouteCard.load(tmp_path / 'card' / 'routes.json')
    assert written.routes[2].latency == card.routes[2].latency and written.routes[1].macs is not None
    assert '| 2 | ' in (tmp_path / 'card' / 'README.md').read_text().replace('2* | ', '2 | ')


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``timm-stitch ARGV``, whether argparse exits or ``main`` returns."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.startswith('timm-stitch: error: ')]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_values_are_usage_errors(capsys, tmp_path, monkeypatch):
    cases = {
        ('routes', 'snnet_nope'): ["unknown model 'snnet_nope'", 'snnet_deit_tsb'],
        ('profile', TINY, '--routes', '0', '99', '--out', str(tmp_path / 'r.json')): ['route ids [99]', '0..22'],
        ('profile', TINY, '--batch-size', '0'): ['--batch-size', "'0'", '>= 1'],
        ('profile', TINY, '--repeats', 'many'): ['--repeats', "'many'", '>= 1'],
        ('routes', TINY, '--checkpoint', str(tmp_path / 'missing.pth')): ['--checkpoint', 'missing.pth'],
        ('convert', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'o')): [
            f"no such file or directory: '{tmp_path / 'missing.pth'}'"],
        ('card', TINY, '--out', str(tmp_path / 'c'), '--accuracy', str(tmp_path)): ['--accuracy', 'is a folder'],
        ('routes', TINY, '--min-top1', '188'): ['--min-top1', "'188'", '[0, 100]'],
        ('routes', TINY, '--max-macs=-5G'): ['--max-macs', "'-5G'", 'non-negative'],
        ('profile', TINY, '--device', 'gpu7'): ['--device', "'gpu7'", 'cpu, cuda'],
        ('convert', str(tmp_path / 'snnet_deit.pth'), '--out', str(tmp_path / 'conv')): ['snnet_deit.pth'],
    }
    for argv, expected in cases.items():
        code, err = _run(capsys, list(argv))
        line = _error_line(err)
        assert code == 2 and all(text in line for text in expected), (argv, err)
    assert not (tmp_path / 'r.json').exists() and not (tmp_path / 'conv').exists()

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code, err = _run(capsys, ['profile', TINY, '--device', 'cuda'])
    assert code == 2 and "device 'cuda': CUDA is not available" in _error_line(err)


def test_filters_without_values_say_so(capsys):
    """With no card loaded no route has an accuracy or a latency: an option needing them is refused, instead of
    printing an empty (or silently unsorted) table."""
    for argv, expected in {
        ('--min-top1', '88'): 'no route has a known top1',
        ('--pareto',): '--pareto needs route top1 values',
        ('--max-latency-ms', '5'): 'no route has a known latency_ms',
        ('--sort', 'top5'): '--sort top5 needs route top5 values',
        ('--max-macs', '10'): 'max_macs=10 is below the smallest available macs',
    }.items():
        code, err = _run(capsys, ['routes', TINY, *argv])
        assert code == 2 and expected in _error_line(err), (argv, err)
        assert capsys.readouterr().out == ''


def test_unreadable_checkpoint_names_the_file_and_the_formats(capsys, tmp_path):
    corrupt = tmp_path / 'corrupt.pth'
    for seed in range(12):  # random bytes fail in torch.load in many ways (unpickling, decoding, zip errors...)
        corrupt.write_bytes(random.Random(seed).randbytes(256))
        for command in (['routes', TINY], ['validate', '--model', TINY, '--data-dir', str(tmp_path)]):
            code, err = _run(capsys, [*command, '--checkpoint', str(corrupt)])
            line = _error_line(err)
            assert code == 2 and f'cannot load the weights file {corrupt}' in line and '.safetensors' in line, err
            assert 'weights_only=False' not in line  # torch's advice about an argument the CLI does not have


def test_runtime_failure_exits_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(model):
        raise RuntimeError('counter broke')
    monkeypatch.setattr('timm_stitch.model.count_route_macs', broken)
    code, err = _run(capsys, ['routes', TINY])
    assert code == 1 and 'counter broke' in _error_line(err)
    code, err = _run(capsys, ['routes', TINY, '--debug'])
    assert code == 1 and 'Traceback' in err and err.rstrip().splitlines()[-1].startswith('timm-stitch: error: ')


@pytest.mark.integration
def test_entry_point(tmp_path):
    """The installed ``timm-stitch`` script and ``python -m timm_stitch.cli`` in subprocesses: a usage error at
    parse time and one raised by the library."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    script = Path(sys.executable).with_name('timm-stitch')
    bad_batch = subprocess.run([str(script), 'profile', 'snnet_vit_fmnist_tsb', '--batch-size', '0'],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad_batch.returncode == 2 and 'Traceback' not in bad_batch.stderr
    assert "timm-stitch: error: argument --batch-size: expected an integer >= 1, got '0'" in bad_batch.stderr
    no_card = [sys.executable, '-m', 'timm_stitch.cli', 'routes', 'snnet_vit_fmnist_tsb', '--select', '--min-top1',
               '88', '--debug']
    debug = subprocess.run(no_card, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode == 2 and 'Traceback' in debug.stderr
    assert 'timm-stitch: error: no route meets the bounds: no route has a known top1' in debug.stderr


@pytest.mark.parametrize('command', ['routes', 'profile', 'card', 'export', 'convert', 'train', 'validate'])
def test_help_is_plain_text_and_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, '--help'])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and '--debug' in text
    assert '``' not in text and 'SPEC' not in text


def test_routes_select_with_a_floor_prints_the_cheapest_route_reaching_it(capsys):
    """The shipped model: --min-top1 88 --select is the cheapest route at 88 % or more, not the most accurate."""
    card = RouteCard.load(ROOT / 'model_cards' / 'snnet_vit_fmnist_tsb' / 'routes.json')
    macs = {r.id: r.macs for r in card.routes}
    reaching = [r for r in card.routes if r.top1 is not None and r.top1 >= 88]
    cheapest = min(reaching, key=lambda r: (r.macs, r.params, r.id))
    assert main(['routes', 'snnet_vit_fmnist_tsb', '--pretrained', '--min-top1', '88', '--select', '--json']) == 0
    (chosen,) = json.loads(capsys.readouterr().out)
    assert chosen['id'] == cheapest.id and chosen['macs'] == min(macs[r.id] for r in reaching)
    assert chosen['top1'] < max(r.top1 for r in reaching)
    assert main(['routes', 'snnet_vit_fmnist_tsb', '--pretrained', '--min-top1', '0.88', '--select']) == 2
    assert 'min_top1=0.88 looks like a fraction' in capsys.readouterr().err


def test_profile_on_a_busy_machine_warns_and_leaves_the_unstable_route_out(tmp_path, monkeypatch):
    profile_module = importlib.import_module('timm_stitch.profiling')
    busy = iter([2.0, 466.0] * 1000)  # route 2's calls alternate quiet and loaded
    monkeypatch.setattr(profile_module, '_timed_call', lambda model, k, images: next(busy) if k == 2 else 2.0)
    out = tmp_path / 'routes.json'
    with pytest.warns(profile_module.UnstableTimingWarning, match=r'routes \[2\] timed unstably'):
        assert main(['profile', TINY, '--warmup', '0', '--out', str(out), '--routes', '0', '2']) == 0
    card = RouteCard.load(out)
    assert [r.id for r in card.routes if r.latency] == [0]
