"""The ``timm-stitch`` command line on a tiny registered architecture."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from timm.models import register_model
from tiny_models import TINY_WIDTHS, tiny_vit_args

from timm_stitch.cards import RouteCard
from timm_stitch.cli import SUBCOMMANDS, main, parse_count
from timm_stitch.models._factory import create_snnet, snnet_cfg

TINY = 'snnet_test_tiny_cli'

if TINY not in timm.list_models(TINY):
    @register_model
    def snnet_test_tiny_cli(pretrained: bool = False, **kwargs):
        kwargs.pop('pretrained_cfg', None)
        return create_snnet(TINY, [tiny_vit_args(d, h) for d, h in TINY_WIDTHS], pretrained, num_classes=10,
                            pretrained_cfg=snnet_cfg(3, input_size=(3, 32, 32), num_classes=10), **kwargs)


def test_subcommands_are_modules_with_add_parser():
    assert SUBCOMMANDS[:3] == ['timm_stitch.cli_routes', 'timm_stitch.cli_profile', 'timm_stitch.cli_card']
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


def test_console_script_help():
    script = Path(sys.executable).with_name('timm-stitch')
    if not script.exists():
        pytest.skip('console script not installed')
    out = subprocess.run([str(script), '--help'], capture_output=True, text=True, check=True).stdout
    assert all(cmd in out for cmd in ('routes', 'profile', 'card'))
