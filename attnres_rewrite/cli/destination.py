"""Where a command may write, decided before any slow step, and what ``--force`` may replace.

``convert -o DIR`` replaces DIR by renaming a finished temporary directory onto it, so
anything already in DIR is deleted. ``--force`` therefore only ever replaces what this
tool wrote before, recognised by its known file set (an adapter directory holds
``attnres_config.json``, ``attnres.safetensors`` and ``report.json``, plus the files
that report lists as written with ``--whole-model``, nothing else) or an empty directory; ``export -o FILE --force`` only replaces an ONNX model or an empty
file. Some locations are never an output, with or without ``--force``: ``/``, the home
directory, the current directory and their parents, and the input model directory
and its parents (replacing a parent deletes the child).

Every check runs before MODEL loads, so a bad ``-o`` costs milliseconds, and each
failure is an :class:`~attnres_rewrite.errors.OutputError` (exit code 2) that says
what is in the way and what to do. Errors that can only happen while writing (a full
disk, a file system turned read-only) go through :func:`writing`, which turns them
into the same kind of error.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..adapter import CONFIG_NAME, WEIGHTS_NAME
from ..errors import OutputError

REPORT_NAME = "report.json"
#: Every file ``attnres convert`` writes into an adapter directory.
ADAPTER_DIR_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME})
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def protected_locations(model_spec: str | None) -> dict[Path, str]:
    """Directories an output must never be or contain (a replaced parent deletes the child), described.

    ``/``, the home directory, the current directory and, when MODEL is a directory,
    that directory; each resolved, so a symlink or ``..`` cannot sneak past.
    """
    places: dict[Path, str] = {Path("/").resolve(): "the root directory"}
    for where, description in ((Path.home, "your home directory"), (Path.cwd, "the current directory")):
        try:
            places.setdefault(where().resolve(), description)
        except (OSError, RuntimeError):  # no HOME, or the current directory was deleted: nothing to protect there
            pass
    if model_spec and Path(model_spec).expanduser().is_dir():
        places.setdefault(Path(model_spec).expanduser().resolve(), "the input model directory")
    return places


def _refuse_protected(target: Path, protected: dict[Path, str]) -> None:
    resolved = target.resolve()
    for place, description in protected.items():
        if resolved == place or resolved in place.parents:
            relation = "is" if resolved == place else "contains"
            raise OutputError(
                f"-o {str(target)!r} {relation} {description}; replacing it would delete what is there. "
                "Pass a new directory, e.g. -o attnres-out."
            )


def check_directory(path: Path, *, force: bool, model_spec: str | None = None) -> None:
    """Refuse ``-o DIR`` unless DIR can be written and replacing it destroys nothing of the user's."""
    _refuse_protected(path, protected_locations(model_spec))
    if path.is_symlink():
        raise OutputError(f"output {str(path)!r} is a symbolic link; pass the directory itself or a new path.")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"output {str(path)!r} is a file; pass a directory path.")
        entries = sorted(p.name for p in path.iterdir())
        if entries and not force:
            raise OutputError(f"output directory {str(path)!r} exists and is not empty; pass --force to replace it.")
        known = _known_files(path) if entries else set()
        if entries and not _is_adapter_directory(path, entries, known):
            foreign = [name for name in entries if name not in (known or ADAPTER_DIR_FILES)] or entries
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(
                f"--force replaces only a directory written by `attnres convert` or an empty one, and "
                f"{str(path)!r} holds {shown}; choose another -o, or move those files away yourself."
            )
    _check_writable(path.absolute().parent, path)


def _known_files(path: Path) -> set[str]:
    """What ``attnres convert`` wrote into ``path``, if it looks like one of its directories (else nothing).

    The adapter's three files plus those its ``report.json`` lists as written
    (``convert --whole-model`` adds the whole model's, whose names depend on the
    model: ``config.json``, weight shards); only when the adapter config parses as one.
    """
    config, report = _json_object(path / CONFIG_NAME), _json_object(path / REPORT_NAME)
    if config is None or "plan" not in config or "format" not in config:
        return set()
    listed = report.get("files") if report else None
    known = set(ADAPTER_DIR_FILES)
    if isinstance(listed, list):
        known |= {name for name in listed if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name}
    return known


def _is_adapter_directory(path: Path, entries: list[str], known: set[str]) -> bool:
    """Our known file set, as plain files (no links), holding an adapter config."""
    if CONFIG_NAME not in entries or not set(entries) <= known:
        return False
    return not any((path / name).is_symlink() or not (path / name).is_file() for name in entries)


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_file(path: Path, *, force: bool) -> None:
    """Refuse ``-o FILE`` unless FILE can be written and replacing it destroys nothing of the user's."""
    if path.is_dir():
        raise OutputError(
            f"output {str(path)!r} is a directory; pass a file path such as {str(path / 'model.onnx')!r}."
        )
    if path.is_symlink():
        raise OutputError(f"output {str(path)!r} is a symbolic link; pass the file itself or a new path.")
    if path.exists():
        if not force:
            raise OutputError(f"output file {str(path)!r} exists; pass --force to replace it.")
        if not path.is_file() or not _is_onnx_or_empty(path):
            raise OutputError(
                f"--force replaces only an ONNX model (what `attnres export` writes) or an empty file, and "
                f"{str(path)!r} is not one; choose another -o."
            )
    _check_writable(path.absolute().parent, path)


def _is_onnx_or_empty(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    try:
        import onnx

        onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not an ONNX model"
        return False
    return True


def _check_writable(directory: Path, target: Path) -> None:
    """The nearest existing ancestor of ``directory`` must be a directory that accepts new entries.

    Checked by creating (and removing) a temporary directory there: permission bits
    say nothing for root, a read-only mount or ``/proc``.
    """
    existing = directory
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"cannot write {str(target)!r}: {str(existing)!r} is a file, not a directory; pass a path outside it."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".attnres-probe-", dir=existing)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {_reason(exc, existing)}; choose another -o.") from exc
    os.rmdir(probe)


def _reason(exc: OSError, where: Path) -> str:
    return f"{str(where)!r} is not writable ({exc.strerror or exc})"


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn a failure of the file system while writing ``target`` into an :class:`OutputError`.

    A full disk, a quota, a file-size limit or a file system gone read-only are the
    user's environment, not a bug; the temporary output is removed by the writer
    (``fileio``), so nothing half-written is left behind either way.
    """
    from safetensors import SafetensorError

    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(_write_failure(target, exc.errno, exc.strerror or str(exc))) from exc
    except SafetensorError as exc:
        if "I/O error" not in str(exc):  # safetensors wraps the OS's errors; anything else is not the disk's
            raise
        code = _errno_in(str(exc))
        raise OutputError(_write_failure(target, code, os.strerror(code) if code else str(exc))) from exc


def _write_failure(target: Path, code: int | None, reason: str) -> str:
    hint = "free some space or choose another -o" if code in _SPACE_ERRNOS else "choose another -o"
    return f"writing {str(target)!r} failed: {reason}; {hint} (what was there before is unchanged)."


def _errno_in(message: str) -> int | None:
    """The ``os error N`` safetensors appends to I/O failures."""
    marker = "os error "
    if marker not in message:
        return None
    digits = message.split(marker, 1)[1].split(")", 1)[0]
    return int(digits) if digits.isdigit() else None
