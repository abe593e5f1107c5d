#!/usr/bin/env bash
# The GPU check in one line: tests, correctness and speed of the Triton kernels (see gpu_check.py).
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
