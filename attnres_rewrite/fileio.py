"""Atomic file output shared by the adapter and the CLI.

Outputs are staged in a temporary entry beside their destination and renamed into
place, so a crash or a failed check never leaves a half-written file. ``mkstemp`` and
``mkdtemp`` create private entries (0600/0700); a finished output gets the modes the
user's umask would give a normally created file instead. (The ONNX exporter stages in
a ``mkdtemp`` directory too, but moves only the files ``onnx`` created inside it with
the usual modes, so it needs no chmod.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the umask's usual modes."""
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the result onto ``path``; clean up on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_default_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
