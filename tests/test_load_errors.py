"""Weights of another architecture, said in one short line at every entry point that loads a checkpoint into a
model: the CLI's --checkpoint, validate's and the trainer's weights loader, resuming, and timm's pretrained path
(issue 24, item 12)."""
import pytest
import safetensors.torch
import timm
from tiny_models import tiny_snnet

import timm_stitch
from timm_stitch.checkpoint import load_state, save_checkpoint
from timm_stitch.cli import main as cli_main
from timm_stitch.evaluation import load_weights

FMNIST = 'snnet_vit_fmnist_tsb'
MISMATCH = (r'holds the weights of another architecture \(or of other model arguments\) than snnet_vit_fmnist_tsb: '
            r'\d+ mis-shaped \(e\.g\. anchors\.0\.\S+ \([\d, ]+\) in the file, \([\d, ]+\) in the model, .*, \.\.\.\)')


@pytest.fixture(scope='module')
def other(tmp_path_factory):
    """The weights of a tiny stitched ViT (not the Fashion-MNIST model's)."""
    path = tmp_path_factory.mktemp('other') / 'other.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_snnet().state_dict().items()}, str(path))
    return path


def test_the_cli_names_another_architecture_in_one_short_line(other, capsys):
    assert cli_main(['routes', FMNIST, '--checkpoint', str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and len(err.splitlines()) == 1, err
    assert 'expected a .safetensors' not in err
    assert __import__('re').search(MISMATCH, err), err


def test_every_loader_raises_the_typed_error(other, tmp_path):
    with pytest.raises(timm_stitch.WeightsMismatchError, match=MISMATCH):
        load_weights(timm.create_model(FMNIST), str(other))
    with pytest.raises(timm_stitch.WeightsMismatchError, match=r'the weights of another architecture .* than '
                                                                 rf'{FMNIST}: \d+ mis-shaped'):
        timm.create_model(FMNIST, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))
    save_checkpoint(str(tmp_path / 'last'), tiny_snnet(), {'epoch': 0, 'arch': 'snnet'})
    with pytest.raises(timm_stitch.WeightsMismatchError, match=r"another architecture .* than this run's snnet: "
                                                                r'\d+ mis-shaped'):
        load_state(str(tmp_path / 'last.state.pth'), timm.create_model(FMNIST))
