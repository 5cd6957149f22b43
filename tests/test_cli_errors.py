"""Errors on the ``timm-stitch`` command line: one ``timm-stitch: error: ...`` line naming the bad value, exit status
2 for bad input and 1 for other failures, no traceback unless ``--debug``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import register_model
from tiny_models import TINY_WIDTHS, tiny_vit_args

from timm_stitch.cli import main
from timm_stitch.models._factory import create_snnet, snnet_cfg

TINY = 'snnet_test_tiny_cli_errors'  # 3 tiny anchors, 23 routes
ROOT = Path(__file__).resolve().parents[1]

if TINY not in timm.list_models(TINY):
    @register_model
    def snnet_test_tiny_cli_errors(pretrained: bool = False, **kwargs):
        kwargs.pop('pretrained_cfg', None)
        return create_snnet(TINY, [tiny_vit_args(d, h) for d, h in TINY_WIDTHS], pretrained, num_classes=10,
                            pretrained_cfg=snnet_cfg(3, input_size=(3, 32, 32), num_classes=10), **kwargs)


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
        ('profile', TINY, '--routes', '0', '99', '--out', str(tmp_path / 'r.json')): ['stitch_id 99', '0..22'],
        ('profile', TINY, '--batch-size', '0'): ['--batch-size', "'0'", '>= 1'],
        ('profile', TINY, '--repeats', 'many'): ['--repeats', "'many'", '>= 1'],
        ('routes', TINY, '--checkpoint', str(tmp_path / 'missing.pth')): ['--checkpoint', 'missing.pth'],
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


def test_runtime_failure_exits_1_and_debug_shows_the_traceback(capsys, tmp_path):
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(os.urandom(256))
    code, err = _run(capsys, ['routes', TINY, '--checkpoint', str(corrupt)])
    assert code == 1 and _error_line(err)
    code, err = _run(capsys, ['routes', TINY, '--checkpoint', str(corrupt), '--debug'])
    assert code == 1 and 'Traceback' in err and err.rstrip().splitlines()[-1].startswith('timm-stitch: error: ')


def test_entry_point(tmp_path):
    """The real command line in a subprocess: a usage error at parse time and one raised by the library."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    command = [sys.executable, '-m', 'timm_stitch.cli']
    bad_batch = subprocess.run([*command, 'profile', 'snnet_vit_fmnist_tsb', '--batch-size', '0'],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad_batch.returncode == 2 and 'Traceback' not in bad_batch.stderr
    assert "timm-stitch: error: argument --batch-size: expected an integer >= 1, got '0'" in bad_batch.stderr
    no_card = [*command, 'routes', 'snnet_vit_fmnist_tsb', '--select', '--min-top1', '88', '--debug']
    debug = subprocess.run(no_card, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode == 2 and 'Traceback' in debug.stderr
    assert 'timm-stitch: error: no route meets the bounds: no route has a known top1' in debug.stderr


@pytest.mark.parametrize('command', ['routes', 'profile', 'card', 'convert', 'train', 'validate'])
def test_help_is_plain_text_and_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, '--help'])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and '--debug' in text
    assert '``' not in text and 'SPEC' not in text
