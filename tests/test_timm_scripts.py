"""The commands docs/training.md gives for timm's own scripts, run through ``python -m timm_stitch.run_script`` on
stand-ins that build the model and its inputs the way timm's scripts do (timm's scripts are not in its wheel).

Two generations of timm's scripts: ``old`` ones (``validate.py``, ``benchmark.py``, ``inference.py`` before model-aware
input resolution; ``onnx_export.py`` still) build the model with ``in_chans=3`` unless told otherwise and size the
inputs with ``resolve_data_config``; ``new`` ones (timm 1.0.31's) use ``resolve_model_input_args`` and
``resolve_input_data_config``. Each stand-in prints the route it ran, its input channels and its logits' width."""
import textwrap

import pytest
import torch
from image_folders import ANCHORS, make_image_folder

from timm_stitch.run_script import main

STAND_IN = textwrap.dedent('''
    import argparse
    import sys

    import timm
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.utils import ParseKwargs

    STYLE, SCRIPT = sys.argv.pop(1), sys.argv.pop(1)  # which stand-in: not one of the script's own arguments
    parser = argparse.ArgumentParser()
    if SCRIPT == 'onnx_export':
        parser.add_argument('output')
    parser.add_argument('--model', '-m')
    parser.add_argument('--pretrained', action='store_true')
    parser.add_argument('--num-classes', type=int, default=1000 if SCRIPT == 'onnx_export' else None)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--checkpoint', default='')
    if SCRIPT != 'onnx_export':  # timm's onnx_export.py takes neither
        parser.add_argument('--in-chans', type=int, default=None)
        parser.add_argument('--input-size', type=int, nargs=3, default=None)
        parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
        parser.add_argument('--data-dir', default=None)
    args = parser.parse_args()
    kwargs = dict(pretrained=args.pretrained, num_classes=args.num_classes, **getattr(args, 'model_kwargs', {}))
    if SCRIPT == 'onnx_export':
        model = timm.create_model(args.model, in_chans=3, exportable=True, **kwargs)
        data_config = {'input_size': (3, args.img_size, args.img_size)}
    elif STYLE == 'old':
        chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
        model = timm.create_model(args.model, in_chans=chans, **kwargs)
        data_config = resolve_data_config(vars(args), model=model)
    else:
        from timm.data.model_config import resolve_input_data_config
        from timm.models import resolve_model_input_args
        model = timm.create_model(**resolve_model_input_args(args.model, vars(args), **kwargs))
        data_config = resolve_input_data_config(model, vars(args))
    if SCRIPT == 'train':
        model.train()
        images = torch.randn(8, *data_config['input_size'], generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(images), torch.arange(8) % 4).backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.save(model.state_dict(), args.checkpoint)
    elif SCRIPT in ('validate', 'inference'):
        mode = 'RGB' if SCRIPT == 'inference' or data_config['input_size'][0] == 3 else 'L'
        if STYLE == 'new':
            mode = 'RGB' if data_config['input_size'][0] == 3 else 'L'
        dataset = create_dataset('', root=args.data_dir, split='validation', input_img_mode=mode)
        loader = create_loader(dataset, batch_size=4, use_prefetcher=False, **{
            k: data_config[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')})
        with torch.no_grad():
            images, _ = next(iter(loader))
            logits = model.eval()(images)
    else:  # benchmark.py, onnx_export.py: random inputs of the resolved size
        with torch.no_grad():
            images = torch.randn(2, *data_config['input_size'])
            logits = model.eval()(images)
    if SCRIPT != 'train':
        print(f'ran route {model.stitch_id} in_chans {images.shape[1]} logits {logits.shape[-1]}')
''')

FMNIST = ['--model', 'snnet_vit_fmnist_tsb', '--pretrained']
RGB = ['--model', 'snnet', '--num-classes', '4', '--model-kwargs', f'anchors={ANCHORS!r}']


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('scripts')
    (root / 'stand_in.py').write_text(STAND_IN)
    return root / 'stand_in.py', make_image_folder(root / 'grey', (0, 2), 28, mode='L'), make_image_folder(
        root / 'rgb', (0, 2), 32)


# (style, script, the documented arguments for the shipped 1-channel model, expected output)
FMNIST_COMMANDS = [
    ('old', 'validate', [*FMNIST, '--model-kwargs', 'stitch_id=3', '--data-dir', 'GREY'], 'route 3 in_chans 3'),
    ('old', 'validate', [*FMNIST, '--in-chans', '1', '--model-kwargs', 'stitch_id=3', '--data-dir', 'GREY'],
     'route 3 in_chans 1'),
    ('new', 'validate', [*FMNIST, '--model-kwargs', 'stitch_id=3', '--data-dir', 'GREY'], 'route 3 in_chans 1'),
    ('old', 'benchmark', ['--model', 'snnet_vit_fmnist_tsb', '--model-kwargs', 'stitch_id=17'], 'route 17 in_chans 3'),
    ('new', 'benchmark', ['--model', 'snnet_vit_fmnist_tsb', '--model-kwargs', 'stitch_id=17'], 'route 17 in_chans 1'),
    ('old', 'inference', [*FMNIST, '--model-kwargs', 'stitch_id=3', '--data-dir', 'GREY'], 'route 3 in_chans 3'),
    ('new', 'inference', [*FMNIST, '--model-kwargs', 'stitch_id=3', '--data-dir', 'GREY'], 'route 3 in_chans 1'),
]


@pytest.mark.parametrize('style, script, args, expected', FMNIST_COMMANDS,
                         ids=[f'{s}-{c}-{i}' for i, (s, c, _, _) in enumerate(FMNIST_COMMANDS)])
def test_documented_commands_on_the_shipped_model(folders, capsys, style, script, args, expected):
    stand_in, grey, _ = folders
    args = [str(grey) if a == 'GREY' else a for a in args]
    assert main([str(stand_in), style, script, *args]) == 0
    assert f'ran {expected} logits 10' in capsys.readouterr().out


@pytest.mark.parametrize('style', ['old', 'new'])
@pytest.mark.parametrize('script', ['validate', 'benchmark', 'inference'])
def test_documented_commands_on_a_three_channel_model(folders, capsys, style, script):
    stand_in, _, rgb = folders
    args = [*RGB, 'stitch_id=4', '--img-size', '32', '--data-dir', str(rgb)]
    assert main([str(stand_in), style, script, *args]) == 0
    assert 'ran route 4 in_chans 3 logits 4' in capsys.readouterr().out


def test_onnx_export_picks_a_route_with_the_launchers_stitch_id(folders, capsys, tmp_path):
    """timm's onnx_export.py takes no --model-kwargs (and defaults to 1000 classes): --stitch-id before SCRIPT."""
    stand_in = folders[0]
    args = ['onnx_export', str(tmp_path / 'm.onnx'), *FMNIST, '--num-classes', '10', '--img-size', '28']
    assert main(['--stitch-id', '17', str(stand_in), 'old', *args]) == 0
    assert 'ran route 17 in_chans 3 logits 10' in capsys.readouterr().out
    assert main([str(stand_in), 'old', *args]) == 0  # the launcher's default ends with its run
    assert 'ran route 2 in_chans 3 logits 10' in capsys.readouterr().out
    assert main(['--stitch-id', 'x', str(stand_in)]) == 2
    assert "--stitch-id expects a route id (an integer >= 0), got 'x'" in capsys.readouterr().err


def test_stock_train_on_one_route_drags_the_routes_that_share_its_weights(folders, tmp_path):
    """What docs/training.md says of timm's train.py --model-kwargs stitch_id=K: only route K is trained, and the
    other routes running any of its blocks, stitching layer or head change with it; routes sharing none stay."""
    import timm
    stand_in = folders[0]
    ckpt = tmp_path / 'trained.pth'
    assert main([str(stand_in), 'old', 'train', *FMNIST, '--in-chans', '1', '--model-kwargs', 'stitch_id=17',
                 '--checkpoint', str(ckpt)]) == 0
    before = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    after = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    after.load_state_dict(torch.load(ckpt))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    route = after.plan.routes[17]
    with torch.no_grad():
        changed = {k for k in range(after.num_routes) if not torch.equal(before(x, stitch_id=k), after(x, stitch_id=k))}
    assert 17 in changed and 0 in changed  # route 0 (Ti alone) shares route 17's front blocks, never selected
    untouched = [k for k, r in enumerate(after.plan.routes) if not set(r.anchors) & set(route.anchors)]
    assert not changed & set(untouched)
