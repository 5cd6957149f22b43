"""Stock timm scripts with the plugin: ``python -m timm_stitch.run_script SCRIPT ARGS`` and the ``stitch_id``
creation kwarg they reach through ``--model-kwargs``."""
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from image_folders import ANCHORS
from safetensors.torch import save_file

import timm_stitch
from timm_stitch.errors import RouteIdError
from timm_stitch.run_script import main

# a stand-in for timm's validate.py/benchmark.py: timm's argument style (--model-kwargs parsed by ParseKwargs),
# no import of timm_stitch (the launcher must provide it), an exit status of its own
STAND_IN = textwrap.dedent('''
    import argparse
    import sys

    import timm
    import torch
    from timm.data import resolve_data_config
    from timm.utils import ParseKwargs

    parser = argparse.ArgumentParser()
    parser.add_argument('--model', '-m')
    parser.add_argument('--pretrained', action='store_true')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--exit', type=int, default=0)
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=args.pretrained, **args.model_kwargs).eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, *resolve_data_config(model=model)['input_size']))
    print(f'{__name__} {sys.argv[0]} active route {model.stitch_id} of {model.num_routes} logits {logits.shape[-1]}')
    sys.exit(args.exit)
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'validate.py'
    path.write_text(STAND_IN)
    return path


def test_stitch_id_kwarg_makes_the_route_active():
    model = timm.create_model('snnet', anchors=ANCHORS, stitch_id=4)  # 2 anchors, 4 stitched routes
    assert model.stitch_id == 4
    assert timm.create_model('snnet', anchors=ANCHORS).stitch_id == 1  # default: the largest anchor
    assert timm_stitch.stitch(ANCHORS, stitch_id=0).stitch_id == 0
    for bad in (6, -1):
        with pytest.raises(RouteIdError, match=f'stitch_id {bad} is out of range: valid ids are 0..5'):
            timm.create_model('snnet', anchors=ANCHORS, stitch_id=bad)
    with pytest.raises(TypeError, match="stitch_id must be an int, got str '1'"):
        timm.create_model('snnet', anchors=ANCHORS, stitch_id='1')


def test_stitch_id_survives_pretrained_and_checkpoint_loading(tmp_path):
    model = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, stitch_id=7).eval()
    reference = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.stitch_id == 7 and torch.equal(model(x), reference(x, stitch_id=7))
    with pytest.raises(RouteIdError, match='stitch_id 35 is out of range: valid ids are 0..34'):
        timm.create_model('snnet_vit_fmnist_tsb', pretrained=True, stitch_id=35)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / 'w.safetensors')
    loaded = timm.create_model('snnet_vit_fmnist_tsb', checkpoint_path=str(tmp_path / 'w.safetensors'), stitch_id=3)
    assert loaded.stitch_id == 3


def test_launcher_runs_a_stock_style_script_with_the_plugin(script, capsys):
    assert main([str(script), '--model', 'snnet_vit_fmnist_tsb', '--pretrained', '--model-kwargs',
                 'stitch_id=3']) == 0
    assert f'__main__ {script} active route 3 of 35 logits 10' in capsys.readouterr().out
    assert main([str(script), '--model', 'snnet_vit_fmnist_tsb', '--model-kwargs', 'stitch_id=0', '--exit', '3']) == 3
    assert 'active route 0 of 35' in capsys.readouterr().out


@pytest.mark.integration
def test_launcher_as_a_module_propagates_the_exit_status(script):
    result = subprocess.run([sys.executable, '-m', 'timm_stitch.run_script', str(script), '--model',
                             'snnet_vit_fmnist_tsb', '--pretrained', '--model-kwargs', 'stitch_id=34', '--exit', '4'],
                            capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=240)
    assert result.returncode == 4, result.stderr[-3000:]
    assert 'active route 34 of 35' in result.stdout


def test_launcher_errors(script, tmp_path, capsys):
    with pytest.raises(RouteIdError, match='stitch_id 99 is out of range: valid ids are 0..34'):
        main([str(script), '--model', 'snnet_vit_fmnist_tsb', '--model-kwargs', 'stitch_id=99'])
    assert sys.argv[0] != str(script)  # restored after the script
    missing = tmp_path / 'no_such_script.py'
    assert main([str(missing), '--model', 'x']) == 2
    assert f"error: script '{missing}' does not exist" in capsys.readouterr().err
    assert main([]) == 2 and 'usage: python -m timm_stitch.run_script [--stitch-id K] SCRIPT' in capsys.readouterr().err
