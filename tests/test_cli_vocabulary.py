"""One vocabulary across the ``timm-stitch`` commands: ``--model`` on every command (the positional MODEL as an
alias where it was taken so), ``--routes`` for a route list, ``--out`` for the output and ``--model-kwargs`` for
model arguments, with the older spellings kept as aliases; ``--version``."""
import argparse
import json

import pytest

from timm_stitch.cli import build_parser, main, package_version

FMNIST = 'snnet_vit_fmnist_tsb'

#: per command, what it needs besides the model to parse
REQUIRED = {
    'routes': [], 'profile': [], 'card': ['--out', 'o'], 'export': ['--out', 'o'], 'serve': [], 'explore': [],
    'train': [], 'validate': [], 'convert': ['ckpt.pth', '--out', 'o'],
}
MODEL = {'convert': 'snnet_deit_tsb'}  # convert takes an official release's architecture


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--version'])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f'timm-stitch {package_version()}'


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_every_command_takes_model_option(command):
    name = MODEL.get(command, FMNIST)
    for flag in ('--model', '-m'):
        assert _parse([command, *REQUIRED[command], flag, name]).model == name
    assert set(REQUIRED) == set(build_parser()._subparsers._group_actions[0].choices)


def test_model_option_and_positional_alias(capsys):
    assert main(['routes', '--model', FMNIST, '--json']) == 0
    by_option = json.loads(capsys.readouterr().out)
    assert main(['routes', FMNIST, '--json']) == 0
    assert json.loads(capsys.readouterr().out) == by_option and len(by_option) == 35
    assert main(['routes', FMNIST, '--model', 'snnet_deit_tsb']) == 2
    assert 'two models given' in capsys.readouterr().err
    assert main(['routes']) == 2
    assert 'no model given: pass --model MODEL' in capsys.readouterr().err


def test_model_kwargs_on_every_model_command(capsys):
    params = []
    for extra in ([], ['--model-kwargs', 'num_classes=5'], ['--num-classes', '5']):
        assert main(['routes', '--model', FMNIST, *extra, '--json']) == 0
        params.append(json.loads(capsys.readouterr().out)[0]['params'])
    assert params[0] - params[1] == params[0] - params[2] > 0  # 5 classes fewer than 10: a smaller head
    assert _parse(['export', '-m', FMNIST, '--out', 'o', '--model-kwargs', 'stitch_id=3']).model_kwargs == {
        'stitch_id': 3}


def test_older_spellings_are_aliases():
    validate = ['validate', '--model', FMNIST]
    assert _parse([*validate, '--stitch-ids', '0,3']).routes == _parse([*validate, '--routes', '0,3']).routes
    for command in (validate, ['train']):
        assert _parse([*command, '--output', 'x']).output == _parse([*command, '--out', 'x']).output == 'x'
    convert = ['convert', 'ckpt.pth', '--out', 'o']
    assert _parse([*convert, '--arch', 'snnet_swin_tsb']).model == 'snnet_swin_tsb'
    assert (_parse([*convert, '--model-args', '{"num_classes": 100, "depth": 3}']).model_kwargs
            == _parse([*convert, '--model-kwargs', 'num_classes=100', 'depth=3']).model_kwargs)


def test_one_route_list_syntax(capsys, tmp_path):
    profile = ['profile', '-m', FMNIST]
    assert _parse([*profile, '--routes', '0', '3-5']).routes == ['0', '3-5']
    for bad in ('3..5', 'x'):
        with pytest.raises(SystemExit):
            _parse([*profile, '--routes', bad])
        assert "expected route ids such as 'all', 'anchors' or '0,3,5-9'" in capsys.readouterr().err
    out = tmp_path / 'r.json'
    assert main([*profile, '--routes', 'anchors', '--repeats', '1', '--warmup', '0', '--out', str(out)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:5]] == ['0', '1', '2']


def test_an_unknown_option_is_named_not_its_value_taken_as_model(capsys):
    """An unknown option's value lands in the positional MODEL: the option is what the user must hear about."""
    for argv, named in ((['routes', '-m', FMNIST, '--bogus', '3'], '--bogus'),
                        (['routes', '-m', FMNIST, '--routes', '0,3'], '--routes')):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert f'unrecognized arguments: {named}' in err and 'unknown model' not in err
    assert main(['routes', 'nope']) == 2
    assert "argument MODEL: unknown model 'nope'" in capsys.readouterr().err


def test_a_backwards_route_range_is_named(capsys):
    assert main(['profile', '-m', FMNIST, '--routes', '5-2', '--repeats', '1']) == 2
    assert "route range '5-2' runs backwards: write it low-high, e.g. 2-5" in capsys.readouterr().err
