"""The model and data options are defined once (timm_stitch.arguments) and read and check the same in
``timm-stitch train``, ``timm-stitch validate`` and the other subcommands."""
import argparse

import pytest

from timm_stitch import train_args, validate
from timm_stitch.arguments import DATA_OPTIONS, MODEL_OPTIONS, RUNTIME_OPTIONS
from timm_stitch.cli import build_parser

SHARED = (*MODEL_OPTIONS, *DATA_OPTIONS, *RUNTIME_OPTIONS, 'checkpoint')
# the model options are every subcommand's; the other subcommands' --batch-size is another option
CLI_SHARED = (*MODEL_OPTIONS, 'checkpoint', 'device')


def _parsers() -> dict[str, argparse.ArgumentParser]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {'train': train_args.build_parser(), 'validate': validate.build_parser(),
            **{f'cli {name}': subcommands[name] for name in ('routes', 'profile', 'card', 'export')}}


def _definition(action: argparse.Action) -> tuple:
    return (tuple(sorted(action.option_strings)), action.help.split(' (default')[0], action.type, action.choices,
            action.nargs, type(action))


def test_every_shared_option_has_one_definition():
    parsers = _parsers()
    for name in SHARED:
        found = {where: _definition(a) for where, p in parsers.items() for a in p._actions
                 if a.dest == name and a.option_strings and (name in CLI_SHARED or not where.startswith('cli'))}
        assert len(set(found.values())) == 1, (name, found)
    assert all(len([a for p in parsers.values() for a in p._actions if a.dest == name]) >= 2 for name in SHARED)
    for where in ('train', 'validate'):
        dests = {a.dest for a in parsers[where]._actions}
        assert set(SHARED) - {'checkpoint'} <= dests, where


@pytest.mark.parametrize('bad, message', [
    (['-b', '0'], "argument -b/--batch-size: expected an integer >= 1, got '0'"),
    (['--crop-pct', '1.5'], "argument --crop-pct: expected a number in [0.01, 1], got '1.5'"),
    (['--num-classes', 'x'], "argument --num-classes: expected an integer >= 1, got 'x'"),
    (['-j', '-1'], "argument -j/--workers: expected an integer >= 0, got '-1'"),
])
def test_a_bad_value_is_refused_alike_everywhere(bad, message, capsys):
    for parse in (train_args.parse_args, validate.build_parser().parse_args):
        with pytest.raises(SystemExit):
            parse(['--model', 'snnet_deit_tsb', *bad])
        assert message in capsys.readouterr().err
