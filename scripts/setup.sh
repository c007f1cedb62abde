#!/usr/bin/env bash
# Creates ./.venv (once) and installs ironpod into it with its development tools.
#
# torch goes in first and pinned: on a machine without a GPU, torch==2.13.0 is a CPU build
# (a local wheel on our build machines), whereas an unpinned "torch" pulls several GB of CUDA
# wheels. Set IRONPOD_TORCH to choose another build, e.g. IRONPOD_TORCH="torch==2.13.0" on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: ironpod needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "== installing ${IRONPOD_TORCH:-torch==2.13.0}"
    "${pip[@]}" install -q "${IRONPOD_TORCH:-torch==2.13.0}"
fi
echo "== installing ironpod and its dev tools"
"${pip[@]}" install -q -e ".[dev]"
