"""Atomic file output shared by the adapter and the CLI.

Outputs are staged in a temporary entry beside their destination and renamed into
place, so a crash or a failed check never leaves a half-written file
(:func:`write_atomic`) or directory (:func:`atomic_directory`, the CLI's adapters).
``mkstemp`` and ``mkdtemp`` create private entries (0600/0700); a finished output gets
the modes the user's umask would give a normally created file instead. (The ONNX exporter stages in
a ``mkdtemp`` directory too, but moves only the files ``onnx`` created inside it with
the usual modes, so it needs no chmod.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(path: Path, executable: bool = False) -> None:
    """Give ``path`` (and, for a directory, everything below it) the umask's usual modes.

    ``executable``: a file gets the modes a linker gives a program or shared library.
    """
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() or executable else 0o666) & ~mask)


def write_atomic(path: Path, write: Callable[[str], None], executable: bool = False) -> None:
    """Call ``write(tmp_path)``, then rename the result onto ``path``; clean up on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_default_permissions(Path(tmp), executable)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target`` by rename.

    A crash or error leaves ``target`` as it was (and no half-written adapter behind).
    """
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        apply_default_permissions(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
