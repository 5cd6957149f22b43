"""No writer of the package removes, empties or replaces a user's files: every writer is tried on a folder holding a
user's files (issue 24, item 1), and the temp files a killed writer left are cleaned only when they are the
package's own and unused (item 14)."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import timm
from image_folders import ANCHORS, make_image_folder, write_config
from test_data import write_idx

import timm_stitch
from timm_stitch._io import ForeignFilesError, atomic_dir, atomic_write, clean_stale_temps, temp_name
from timm_stitch.card_readme import write_card_dir
from timm_stitch.cards import RouteCard
from timm_stitch.checkpoint import output_lock
from timm_stitch.cli import main as cli_main
from timm_stitch.data import prepare_fashion_mnist
from timm_stitch.validate import main as validate_main

USER_FILES = {'src/mycode.py': 'print(1)\n', 'notes.txt': 'mine\n'}


def _user_folder(folder: Path) -> Path:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _intact(folder: Path, extra: set = frozenset()) -> None:
    """The user's files are there, unchanged, and nothing else is but ``extra``."""
    assert {n: (folder / n).read_text() for n in USER_FILES} == USER_FILES
    assert set(os.listdir(folder)) == {'src', 'notes.txt'} | set(extra)


@pytest.fixture(scope='module')
def model():
    return timm.create_model('snnet_vit_fmnist_tsb')


def test_save_pretrained_refuses_a_folder_of_user_files(tmp_path, model, monkeypatch):
    folder = _user_folder(tmp_path / 'project')
    with pytest.raises(ForeignFilesError, match=r'holds other files \(notes.txt, src\): nothing was written or '
                                                r'removed. Choose a new or empty folder'):
        timm_stitch.save_pretrained(model, folder)
    _intact(folder)
    monkeypatch.chdir(folder)
    with pytest.raises(FileExistsError, match='nothing was written'):  # the typed error is a FileExistsError
        timm_stitch.save_pretrained(model, '.')
    _intact(folder)
    assert os.listdir(tmp_path) == ['project']


def test_save_pretrained_refuses_a_file_and_the_root(tmp_path, model):
    target = tmp_path / 'weights.bin'
    target.write_bytes(b'mine')
    with pytest.raises(ForeignFilesError, match=r'writes a folder, and .*weights.bin is a file: nothing was written'):
        timm_stitch.save_pretrained(model, target)
    assert target.read_bytes() == b'mine' and os.listdir(tmp_path) == ['weights.bin']
    before = set(os.listdir('/'))
    with pytest.raises(ForeignFilesError, match='nothing was written'):
        timm_stitch.save_pretrained(model, '/')
    assert set(os.listdir('/')) == before


def test_save_pretrained_replaces_a_saved_model_and_keeps_other_files(tmp_path, model):
    folder = timm_stitch.save_pretrained(model, tmp_path / 'saved')
    (folder / 'notes.txt').write_text('mine\n')
    timm_stitch.save_pretrained(model, folder)
    (folder / 'README.md').write_text('# my own notes on this model\n')  # not rendered by timm-stitch: kept
    with pytest.raises(ForeignFilesError, match=r'README.md is not a file save_pretrained wrote: nothing was '
                                                'written. Move it away'):
        timm_stitch.save_pretrained(model, folder)
    assert (folder / 'README.md').read_text() == '# my own notes on this model\n'
    assert (folder / 'notes.txt').read_text() == 'mine\n'
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors', 'notes.txt', 'routes.json']
    os.unlink(folder / 'README.md')
    timm_stitch.save_pretrained(model, folder)
    assert 'timm-stitch' in (folder / 'README.md').read_text() and os.listdir(tmp_path) == ['saved']
    # an empty folder (the working directory, say) is written into, never swapped out
    empty = tmp_path / 'empty'
    empty.mkdir()
    inode = empty.stat().st_ino
    timm_stitch.save_pretrained(model, empty)
    assert empty.stat().st_ino == inode and (empty / 'model.safetensors').is_file()


def test_a_failed_save_into_a_saved_model_leaves_it_and_no_temp(tmp_path, model, monkeypatch):
    folder = timm_stitch.save_pretrained(model, tmp_path / 'saved')
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    monkeypatch.setattr(timm_stitch.hub, 'render_readme', lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        timm_stitch.save_pretrained(model, folder)
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before


def test_card_writers_keep_user_files(tmp_path, model):
    card = RouteCard.from_model(model)
    folder = _user_folder(tmp_path / 'cards')
    write_card_dir(card, folder, plot=False)
    _intact(folder, {'routes.json', 'README.md'})
    write_card_dir(card, folder, plot=False)  # its own card is replaced
    (folder / 'README.md').write_text('# my project\n')
    with pytest.raises(ForeignFilesError, match=r'README.md is not a model card timm-stitch wrote: nothing was '
                                                r'written'):
        write_card_dir(card, folder, plot=False)
    assert (folder / 'README.md').read_text() == '# my project\n'
    assert cli_main(['card', 'snnet_vit_fmnist_tsb', '--out', str(folder), '--no-plot']) == 2
    assert (folder / 'README.md').read_text() == '# my project\n'


def test_card_files_replace_only_route_cards(tmp_path, model):
    """A card written to a file name (RouteCard.save, profile --out, whose default is ./routes.json) replaces a
    route card there but never a user's file of that name, and profile refuses before it times anything."""
    card = RouteCard.from_model(model)
    mine = tmp_path / 'routes.json'
    mine.write_text('{"mine": 1}\n')
    with pytest.raises(ForeignFilesError, match=r'routes.json is not a route card timm-stitch wrote: nothing was '
                                                r'written'):
        card.save(mine)
    with pytest.raises(ForeignFilesError, match='is not a route card'):
        timm_stitch.profile(model, routes=[0], repeats=1, warmup=0, progress=False, out=mine)
    assert cli_main(['profile', 'snnet_vit_fmnist_tsb', '--routes', '0', '--repeats', '1', '--out', str(mine)]) == 2
    assert mine.read_text() == '{"mine": 1}\n'
    with pytest.raises(IsADirectoryError, match=r'is a folder: give the card a file name'):
        card.save(tmp_path)
    ours = tmp_path / 'card.json'
    card.save(ours)
    card.save(ours)  # its own card is replaced
    assert RouteCard.load(ours).to_dict() == card.to_dict()


def test_the_trainer_refuses_an_output_folder_of_user_files(tmp_path):
    folder = _user_folder(tmp_path / 'out' / 'run')
    data = make_image_folder(tmp_path / 'images', per_class=(2, 1))
    cfg = write_config(tmp_path / 'c.yaml', epochs=1, batch_size=4)
    with pytest.raises(ForeignFilesError, match=r"holds files that are not a training run's \(notes.txt, src\): "
                                                'nothing was written'):
        timm_stitch.train.main(['-c', str(cfg), '--data-dir', str(data), '--out', str(tmp_path / 'out'),
                                '--experiment', 'run'])
    _intact(folder)
    with output_lock(str(tmp_path / 'new')):  # a new folder (and later the run's own) is fine
        pass
    with output_lock(str(tmp_path / 'new')):
        pass


def test_validate_and_fashion_mnist_keep_user_files(tmp_path):
    data = make_image_folder(tmp_path / 'images', per_class=(1, 2))
    out = _user_folder(tmp_path / 'val')
    assert validate_main(['--model', 'snnet', '--model-kwargs', f'anchors={ANCHORS!r}', '--num-classes', '4',
                          '--img-size', '32', '-b', '8', '-j', '0', '--no-progress', '--data-dir', str(data),
                          '--routes', '0', '--out', str(out)]) == 0
    _intact(out, {'routes.json', 'routes.jsonl', 'results.csv'})
    source = tmp_path / 'idx'
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (('train', 3), ('t10k', 2)):
        write_idx(source / f'{prefix}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(source / f'{prefix}-labels-idx1-ubyte', rng.integers(0, 10, n))
    raw = _user_folder(tmp_path / 'fm' / 'FashionMNIST' / 'raw')
    with pytest.raises(ForeignFilesError, match='nothing was written or removed'):
        prepare_fashion_mnist(tmp_path / 'fm', source)
    _intact(raw)
    os.unlink(raw / 'notes.txt')
    (raw / 'train-images-idx3-ubyte').write_bytes(b'half')  # a folder of its own files (one bad) is completed
    prepare_fashion_mnist(tmp_path / 'fm', source)
    assert len(os.listdir(raw)) == 5 and (raw / 'src' / 'mycode.py').is_file()


def test_stale_temps_of_killed_writers_are_cleaned_and_nothing_else(tmp_path):
    target = tmp_path / 'cache.safetensors'
    dead = temp_name(target).replace(f'.{os.getpid()}-', '.999999999-')  # a killed writer's full-size temp
    Path(dead).write_bytes(b'x' * 1000)
    alive = temp_name(target)  # this process's: in use
    Path(alive).write_bytes(b'x')
    fresh = temp_name(target).replace(f'.{os.getpid()}-', '.999999998-')  # just written: may be another host's
    Path(fresh).write_bytes(b'x')
    mine = [tmp_path / '.cache.safetensors.tmp', tmp_path / '.notes.1-00000000.tmp.bak', tmp_path / 'x.tmp']
    for path in mine:
        path.write_bytes(b'user')
    old = time.time() - 3600
    for path in (dead, alive, *mine):
        os.utime(path, (old, old))
    atomic_write(target, b'new')  # the next write of that file cleans its stale temps
    assert sorted(os.listdir(tmp_path)) == sorted(
        [target.name, os.path.basename(alive), os.path.basename(fresh), *(p.name for p in mine)])
    assert clean_stale_temps(tmp_path) == []
    with atomic_dir(tmp_path / 'folder', ['a']) as tmp:
        (tmp / 'a').write_text('1')
    assert not [e for e in os.listdir(tmp_path / 'folder') if e != 'a']


def test_a_file_where_a_folder_is_written_is_named_and_kept(tmp_path, capsys):
    """Every writer of a folder given a user's file (card, export in each format, validate, the trainer's lock):
    a usage error naming the file (exit 2), the file unchanged."""
    mine = tmp_path / 'mine.txt'
    mine.write_text('mine\n')
    data = make_image_folder(tmp_path / 'images', per_class=(1, 1))
    runs = [['card', '-m', 'snnet_vit_fmnist_tsb', '--out', str(mine)],
            ['export', '-m', 'snnet_vit_fmnist_tsb', '--format', 'torch-export', '--out', str(mine)],
            ['export', '-m', 'snnet_vit_fmnist_tsb', '--out', str(mine / 'sub')],
            ['validate', '--model', 'snnet', '--model-kwargs', f'anchors={ANCHORS!r}', '--num-classes', '4',
             '--img-size', '32', '-b', '8', '-j', '0', '--no-progress', '--data-dir', str(data), '--routes', '0',
             '--out', str(mine)]]
    for argv in runs:
        assert cli_main(argv) == 2, argv
        assert f'{mine} is a file' in capsys.readouterr().err, argv
        assert mine.read_text() == 'mine\n'
    with pytest.raises(NotADirectoryError, match=f'{mine} is a file'):
        with output_lock(str(mine / 'run')):
            pass
    assert mine.read_text() == 'mine\n'
