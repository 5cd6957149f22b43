"""Atomic writes (one helper module, used by every writer in the package) and the one module that may import timm's
private functions."""
import ast
import os
from pathlib import Path

import pytest
import timm

import timm_stitch
from timm_stitch._io import atomic_dir, atomic_path, atomic_write, temp_name
from timm_stitch.hub import save_pretrained

PACKAGE = Path(timm_stitch.__file__).parent


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / 'f.txt'
    atomic_write(path, 'old')
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        Path(tmp).write_text('half')
        raise RuntimeError('killed')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['f.txt']
    atomic_write(path, b'new')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['f.txt']


def test_temp_names_are_unique_hidden_and_beside_the_target(tmp_path):
    names = {temp_name(tmp_path / 'f.txt') for _ in range(100)}
    assert len(names) == 100
    assert all(os.path.dirname(n) == str(tmp_path) and os.path.basename(n).startswith('.f.txt.') for n in names)
    assert os.path.dirname(temp_name(tmp_path / 'f.txt', tmp_path / 'store')) == str(tmp_path / 'store')


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / 'out'
    with atomic_dir(target, ['a', 'b']) as tmp:
        (tmp / 'a').write_text('1')
    with pytest.raises(RuntimeError), atomic_dir(target, ['a', 'b']) as tmp:
        (tmp / 'b').write_text('2')
        raise RuntimeError('failed half-way')
    assert os.listdir(target) == ['a'] and os.listdir(tmp_path) == ['out']
    with atomic_dir(target, ['a', 'b']) as tmp:  # its own files: 'b' written, 'a' (not written again) removed
        (tmp / 'b').write_text('2')
    assert os.listdir(target) == ['b'] and os.listdir(tmp_path) == ['out']


def _private_timm_imports(path: Path) -> list[str]:
    """``timm.<...>._private`` modules imported or used by attribute in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                names = ['.'.join([value.id, *reversed(parts)])]
        found += [n for n in names if n.split('.')[0] == 'timm' and any(p.startswith('_') for p in n.split('.'))]
    return found


def test_saved_folders_and_files_get_plain_permissions(tmp_path, monkeypatch):
    """Temp files and folders are owner-only (mkdtemp, and safetensors' own writer); what is renamed into place has
    the permissions of a plain write under the umask, so a saved model can be shared."""
    old = os.umask(0o022)
    try:
        saved = save_pretrained(timm.create_model('snnet_vit_fmnist_tsb'), tmp_path / 'saved')
        with atomic_path(tmp_path / 'file.bin') as tmp:
            Path(tmp).write_bytes(b'x')
            os.chmod(tmp, 0o600)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [saved, *saved.iterdir(), tmp_path / 'file.bin']}
    assert modes.pop('saved') == 0o755 and set(modes.values()) == {0o644}, modes


def test_only_the_compat_module_imports_timm_private_functions():
    offenders = {str(p.relative_to(PACKAGE)): _private_timm_imports(p) for p in sorted(PACKAGE.rglob('*.py'))
                 if p.name != '_timm_compat.py'}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _private_timm_imports(PACKAGE / '_timm_compat.py')  # the check sees them where they are
