"""The corpus of the training study: the Python standard library's own source files.

Why this corpus: it exists on every machine that can run the tool, needs no download,
and is real text with long-range structure (indentation, matching names) that a
byte-level model can learn something about in minutes on a CPU.

Determinism: the file list is sorted by relative path; the held-out validation files
are the ``val_count`` files with the smallest SHA-256 of their relative path, so the
split depends only on the names (not on the file system's listing order or on a
random generator). The exact lists are returned for the results JSON. Different
Python versions ship different stdlibs, so the version and a corpus digest are
recorded too.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Directories left out: installed third-party packages and the (very large, highly
# repetitive) test suites, which would otherwise dominate the corpus.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
FILE_SEPARATOR = b"\n\n"


@dataclass
class Corpus:
    """Train and validation bytes plus the provenance the results must record."""

    root: str
    train_files: list[str]
    val_files: list[str]
    train: Tensor  # uint8, concatenated train files
    val: Tensor  # uint8, concatenated validation files
    digest: str

    def summary(self) -> dict:
        """JSON-serialisable description (file lists included, bytes excluded)."""
        return {
            "root": self.root,
            "python": sys.version.split()[0],
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "split_rule": "validation = files with the smallest sha256(relative path); train = the rest",
            "num_train_files": len(self.train_files),
            "num_val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "sha256": self.digest,
            "val_files": self.val_files,
        }


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> list[str]:
    """Relative paths of the stdlib ``*.py`` files, sorted, test suites excluded."""
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]  # prune: site-packages alone is huge
        rel = Path(folder).relative_to(root)
        names.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(names)


def name_hash(name: str) -> str:
    """Hash that orders files for the validation split (stable across machines)."""
    return hashlib.sha256(name.encode()).hexdigest()


def split_files(names: list[str], val_count: int) -> tuple[list[str], list[str]]:
    """Deterministic split: the ``val_count`` smallest name hashes are held out."""
    if not 0 < val_count < len(names):
        raise ValueError(f"val_count must be between 1 and {len(names) - 1}, got {val_count}")
    held = set(sorted(names, key=name_hash)[:val_count])
    ordered = sorted(names)
    return [n for n in ordered if n not in held], [n for n in ordered if n in held]


def _concat(root: Path, names: list[str], digest) -> Tensor:
    """Concatenate files (name order) into one uint8 tensor, feeding the digest."""
    chunks = []
    for name in names:
        data = (root / name).read_bytes()
        digest.update(name.encode() + b"\0" + data)
        chunks.append(data + FILE_SEPARATOR)
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def load_corpus(val_count: int, max_train_files: int | None = None, root: Path | None = None) -> Corpus:
    """Read the stdlib corpus; ``max_train_files`` shrinks it for smoke tests."""
    root = root or stdlib_root()
    train_names, val_names = split_files(list_sources(root), val_count)
    if max_train_files is not None:
        train_names = train_names[:max_train_files]
    digest = hashlib.sha256()
    train = _concat(root, train_names, digest)
    val = _concat(root, val_names, digest)
    return Corpus(str(root), train_names, val_names, train, val, digest.hexdigest())


def batch_starts(num_bytes: int, seq_len: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """Window offsets ``(steps, batch)`` for training: the data order, fixed by ``seed``.

    Every variant of one seed consumes exactly these windows in this order, so the
    comparison differs only in the residual stream.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_bytes - seq_len - 1, (steps, batch_size), generator=gen)


def windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets (int64) for the windows starting at ``starts``."""
    idx = starts.reshape(-1, 1) + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_starts(num_bytes: int, seq_len: int, count: int) -> Tensor:
    """Evenly spaced validation windows: no randomness, the same for every run."""
    return torch.linspace(0, num_bytes - seq_len - 2, count).long()


def logits_of(output: Any) -> Tensor:
    """The logits tensor, whether a model returns it bare, in a tuple or as ``.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-byte cross-entropy in nats."""
    logits = logits_of(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
