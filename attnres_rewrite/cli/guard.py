"""Map what goes wrong to exit codes and one-line messages, never a traceback by default.

Exit codes (documented in docs/cli.md):

- 0: success;
- 1: a check failed (the model, adapter or ONNX file does not match within tolerance),
  or the model cannot be expressed in ONNX (:class:`~attnres_rewrite.errors.NotExportableError`);
- 2: a user mistake: bad MODEL, bad flags, output in the way, corrupted or foreign
  adapter, or any :class:`~attnres_rewrite.errors.AttnResError` (click's own usage
  errors already use 2);
- 3: an internal error, i.e. a bug in attnres: rerun with ``--debug`` for the traceback;
- 130: interrupted.

``--debug`` (or ``ATTNRES_DEBUG=1``) prints the traceback before exiting with the same code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import traceback
import warnings
from collections.abc import Callable
from typing import TypeVar

import typer

from ..errors import AttnResError, NotExportableError, VerificationError
from .output import stderr

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable)


class CheckFailed(Exception):
    """A verification ran and the numbers are outside tolerance (exit code 1, not a usage error)."""


def debug_enabled(ctx: typer.Context | None = None, flag: bool = False) -> bool:
    """``--debug`` on the command or on ``attnres`` itself, or ``ATTNRES_DEBUG=1``."""
    if flag or os.environ.get("ATTNRES_DEBUG", "") not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def _fail(message: str, code: int, debug: bool) -> None:
    console = stderr()
    if debug:
        console.print(traceback.format_exc(), markup=False, highlight=False, end="")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: F) -> F:
    """Wrap a command so that every exception leaves as a message and an exit code.

    The command must take ``ctx: typer.Context`` and ``debug: bool`` (by keyword, as
    typer passes them) so the wrapper can tell whether ``--debug`` was given.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _quiet_libraries(debug_enabled(kwargs.get("ctx"), bool(kwargs.get("debug")))):
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer already knows how to report these (usage errors exit with 2)
        except Exception as exc:
            debug = debug_enabled(kwargs.get("ctx"), bool(kwargs.get("debug")))
            if isinstance(exc, (CheckFailed, VerificationError)):
                _fail(f"verification failed: {_one_line(exc)}", EXIT_CHECK_FAILED, debug)
            if isinstance(exc, NotExportableError):
                _fail(f"error: {_one_line(exc)}", EXIT_CHECK_FAILED, debug)
            if isinstance(exc, AttnResError):
                _fail(f"error: {_one_line(exc)}", EXIT_USAGE, debug)
            hint = "" if debug else "; rerun with --debug for the traceback"
            message = f"internal error: {type(exc).__name__}: {_one_line(exc)}. This is a bug in attnres{hint}."
            _fail(message, EXIT_INTERNAL, debug)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED, debug_enabled(kwargs.get("ctx"), bool(kwargs.get("debug"))))

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _quiet_libraries(debug: bool):
    """Hide library deprecation chatter (torch, transformers, onnx) that users cannot act on.

    Scoped with ``catch_warnings`` so an in-process caller (tests, notebooks) keeps its
    own filters; ``--debug`` shows everything.
    """
    if debug:
        yield
        return
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        onnx_log.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__
