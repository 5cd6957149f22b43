"""Files and folders written so that a failure or a kill at any moment leaves the old version or the new one, never
a part of either: everything is built under a unique hidden temp name in the target's folder (or a given one),
flushed to disk, then renamed into place; the temp is removed when the writing fails."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from .errors import DiskFullError, ForeignFilesError

__all__ = [
    'atomic_path', 'atomic_write', 'atomic_dir', 'fsync_path', 'file_sha256', 'temp_name', 'plain_permissions',
    'ForeignFilesError', 'is_temp_name', 'clean_stale_temps', 'listing', 'DiskFullError', 'disk_full',
    'full_disk_named',
]

PathLike = Union[str, os.PathLike]

STALE_AFTER_S = 60  # a temp untouched this long, whose process is gone, is a killed writer's leftover
_TEMP_RE = re.compile(r'\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp')


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
def full_disk_named(path: PathLike) -> Iterator[None]:
    """Raise what fails in the body for want of space while writing ``path`` as a :class:`DiskFullError`."""
    try:
        yield
    except BaseException as e:
        full = disk_full(e, path)
        if full is None:
            raise
        raise full from e


def make_folder(folder: PathLike) -> None:
    """``os.makedirs(folder, exist_ok=True)``; a file standing where the folder (or one above it) should be is a
    ``NotADirectoryError`` naming it (a usage error: the user gave a file where a folder is written)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [Path(folder), *Path(folder).parents] if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(f'{blocker} is a file, and a folder is written there: nothing was written. Choose '
                                 f'another output path (the file is left as it is)') from None


@contextmanager
def atomic_path(path: PathLike, temp_dir: Optional[PathLike] = None, fsync: bool = True) -> Iterator[str]:
    """Yield a fresh temp path (not yet created) for the body to write ``path``'s new content to (a file, or a
    link); then flush it (with ``fsync``) and rename it over ``path`` in one step. When the body fails the temp is
    removed and ``path`` is left as it was."""
    target = os.path.abspath(os.fspath(path))
    make_folder(os.path.dirname(target))
    clean_stale_temps(temp_dir or os.path.dirname(target), os.path.basename(target))
    tmp = temp_name(target, temp_dir)
    try:
        with full_disk_named(target):
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


def listing(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names`` (sorted), and how many more."""
    names = sorted(names)
    return ', '.join(names[:shown]) + (f' and {len(names) - shown} more' if len(names) > shown else '')


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(error: BaseException, path: PathLike) -> Optional[DiskFullError]:
    """``error`` (raised while writing ``path``) as a :class:`DiskFullError` when it comes from a full disk, else
    None. torch's zip writer (``unexpected pos``) and safetensors (``os error 28``) hide the ``OSError``."""
    text = str(error)
    code = error.errno if isinstance(error, OSError) else None
    found = re.search(r'os error (\d+)', text)
    if code is None and found:
        code = int(found.group(1))
    if code not in _FULL and 'unexpected pos' not in text:
        return None
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        free = f'{shutil.disk_usage(folder).free / 2**20:.1f} MiB free'
    except OSError:
        free = 'its free space unknown'
    return DiskFullError(errno.ENOSPC, f'cannot write {path}: no space left on the disk holding {folder} ({free}; '
                         f'or a disk quota or file size limit, `ulimit -f`, was reached). Nothing was written there '
                         f'and the previous version is kept: free some space, or write elsewhere')


def is_temp_name(name: str, of: Optional[str] = None) -> bool:
    """Whether ``name`` is one of :func:`temp_name`'s names (of a temp copy of ``of``, when given)."""
    match = _TEMP_RE.fullmatch(name)
    return match is not None and (of is None or match.group('name') == of)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def clean_stale_temps(folder: PathLike, of: Optional[str] = None) -> list[str]:
    """Remove the temp files and folders (of ``of``, when given) that a killed writer left in ``folder``: only names
    :func:`temp_name` makes, and only those no writer is using: untouched for a minute with their process gone,
    or untouched for a day (a writer on another host). Returns the paths removed."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_name(entry, of):
            continue
        path = os.path.join(folder, entry)
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        if age < STALE_AFTER_S or (_pid_running(int(_TEMP_RE.fullmatch(entry).group('pid'))) and age < 86400):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
        removed.append(path)
    return removed


@contextmanager
def atomic_dir(path: PathLike, owned: Sequence[str] = (), is_ours: Optional[Callable[[Path], bool]] = None,
               what: str = 'timm-stitch') -> Iterator[Path]:
    """Yield a fresh temp folder for the body to fill with files; then they take their place in ``path``.

    A new ``path`` is the temp folder renamed into place (all or nothing). An existing folder is never swapped out
    or removed: when it is empty, or ``is_ours`` (default: it holds one of the ``owned`` file names), each file is
    renamed over its old version (only ``owned`` names are replaced), and the ``owned`` names the body did not write
    are removed; other files stay.
    Any other folder, or a file, raises :class:`ForeignFilesError` before anything is written. When the body fails
    the temp folder is removed and ``path`` is left as it was."""
    target = Path(os.path.abspath(os.fspath(path)))
    if os.path.lexists(target) and not target.is_dir():
        raise ForeignFilesError(f'{what} writes a folder, and {target} is a file: nothing was written. Choose a '
                                'new or empty folder (it is created when missing)')
    exists = target.is_dir()
    if exists:
        theirs = [e for e in os.listdir(target) if not is_temp_name(e)]
        if theirs and not (is_ours or (lambda p: any((p / n).exists() for n in owned)))(target):
            raise ForeignFilesError(
                f'{what} writes only into a new or empty folder or over what it wrote there, and {target} holds '
                f'other files ({listing(theirs)}): nothing was written or removed. Choose a new or empty folder (it '
                'is created when missing)')
    home = target if exists else target.parent
    make_folder(home)
    clean_stale_temps(home, target.name)
    tmp = Path(temp_name(target, home))
    os.mkdir(tmp)
    try:
        with full_disk_named(target):
            yield tmp
        plain_permissions(tmp)
        if not exists:
            os.rename(tmp, target)
            return
        names = sorted(os.listdir(tmp))
        for name in names:
            if os.path.lexists(target / name) and name not in owned:
                raise ForeignFilesError(f'{target / name} is not a file {what} wrote: nothing was written. Move it '
                                        'away, or choose a new or empty folder')
            fsync_path(tmp / name)
        for name in names:
            os.replace(tmp / name, target / name)
        for name in set(owned) - set(names):
            if (target / name).is_file():
                os.unlink(target / name)
        os.rmdir(tmp)
        fsync_path(target)
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
