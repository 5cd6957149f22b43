"""Files and folders written so that a failure or a kill at any moment leaves the old version or the new one, never
a part of either: everything is built under a unique hidden temp name in the target's folder (or a given one),
flushed to disk, then renamed into place; the temp is removed when the writing fails."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = [
    'atomic_path', 'atomic_write', 'atomic_dir', 'replace_dir', 'fsync_path', 'file_sha256', 'temp_name',
    'plain_permissions',
]

PathLike = Union[str, os.PathLike]


def temp_name(path: PathLike, folder: Optional[PathLike] = None) -> str:
    """A unique hidden name ``.{name}.{pid}-{random}.tmp`` for a temp copy of ``path``, in ``folder`` (default:
    ``path``'s own, so the rename into place stays on one file system). Unique per process and call, so two
    writers never share one."""
    path = os.path.abspath(os.fspath(path))
    folder = os.fspath(folder) if folder is not None else os.path.dirname(path)
    return os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}-{os.urandom(4).hex()}.tmp')


def fsync_path(path: PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_permissions(path: PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a plain ``open``/``mkdir`` would under the
    process umask: temp files and folders are made owner-only (``mkstemp``, ``mkdtemp``, safetensors' own writer),
    which would otherwise survive the rename and make saved models unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for item in [path, *(path.rglob('*') if path.is_dir() and not path.is_symlink() else ())]:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: PathLike, temp_dir: Optional[PathLike] = None, fsync: bool = True) -> Iterator[str]:
    """Yield a fresh temp path (not yet created) for the body to write ``path``'s new content to (a file, or a
    link); then flush it (with ``fsync``) and rename it over ``path`` in one step. When the body fails the temp is
    removed and ``path`` is left as it was."""
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = temp_name(target, temp_dir)
    try:
        yield tmp
        if os.path.isfile(tmp) and not os.path.islink(tmp):
            plain_permissions(tmp)
            if fsync:
                fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_path(os.path.dirname(target))


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)


def replace_dir(src: PathLike, dst: PathLike) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst`` only once ``src`` is complete
    (a failed swap puts the old ``dst`` back)."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f'.{dst.name}.old-'))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``path`` for the body to fill; then it replaces ``path`` (see
    :func:`replace_dir`). When the body fails the temp folder is removed and ``path`` is left as it was."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f'.{target.name}.', suffix='.tmp'))
    try:
        yield tmp
        plain_permissions(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
