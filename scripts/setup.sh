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
# The compat extra (transformers, lightning, accelerate, deepspeed; tests/compat) comes along
# unless IRONPOD_COMPAT=0. DeepSpeed ships only an sdist whose setup.py imports torch: built in
# an isolated environment it would pull an unpinned torch (GBs of CUDA wheels), so it is built
# first against the venv's torch (--no-build-isolation), without its C++ ops (DS_BUILD_OPS=0;
# they compile on first use).
extras=dev
if [ "${IRONPOD_COMPAT:-1}" != 0 ]; then
    extras=dev,compat
    deepspeed=$(.venv/bin/python - <<'PY'
import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["compat"]
print(next(req for req in extra if req.startswith("deepspeed")))
PY
)
    have=$(.venv/bin/python -c 'from importlib import metadata as m; print(m.version("deepspeed"))' \
        2>/dev/null || true)
    if [ "deepspeed==$have" != "$deepspeed" ]; then
        echo "== building $deepspeed against the venv's torch"
        "${pip[@]}" install -q "setuptools>=70.1"
        DS_BUILD_OPS=0 "${pip[@]}" install -q --no-build-isolation "$deepspeed"
    fi
fi
echo "== installing ironpod and its tools ($extras)"
DS_BUILD_OPS=0 "${pip[@]}" install -q -e ".[$extras]"
