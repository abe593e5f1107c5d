"""Test-session setup.

Triton kernels run under the interpreter when no GPU is present; the variable must be
set before any kernel module is imported, hence at the top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's CPU code is C++ built with -O3 for every compiled graph: most of a compile
# test's time was g++. The tests check what the generated code computes, not how fast
# it runs, so they build it at -O0 (Inductor's debug-compile switch; read at each build,
# and inherited by the CLI and torchrun subprocesses). Set it to 0 to test -O3 builds.
os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")

import pytest  # noqa: E402

# CI runs `pytest -n 2` on two cores: one intra-op thread per worker avoids the
# oversubscription that makes small ops 100x slower on a contended machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
