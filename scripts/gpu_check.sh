#!/usr/bin/env bash
# Run ironpod's deep node health suite on a GPU machine and print the results:
#
#   bash scripts/gpu_check.sh                       # from anywhere; runs in the repo root
#   bash scripts/gpu_check.sh --expected-gpus 8     # extra arguments go to python -m ironpod.health
#   bash scripts/gpu_check.sh --with-dcgm           # also dcgmi diag -r 2 (a few more minutes)
#
# Needs python3 with torch (a CUDA build), pydantic, rich and psutil. nvidia-ml-py is installed
# when `import pynvml` fails and pip can reach a registry; without it the NVML checks skip.
# Exits 0 when checks pass, warn or skip; 1 when one fails. Takes under two minutes without DCGM.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WORK_DIR=/tmp/ironpod-gpucheck

skip_dcgm=(--skip gpu.dcgm_diag)
args=()
for arg in "$@"; do
    if [ "$arg" = "--with-dcgm" ]; then skip_dcgm=(); else args+=("$arg"); fi
done

if ! "$PY" -c "import pynvml" 2>/dev/null; then
    echo "== pynvml missing: installing nvidia-ml-py"
    "$PY" -m pip install -q nvidia-ml-py || echo "   could not install it: NVML checks will skip"
fi

echo "== environment"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import platform

import torch

import ironpod.health  # fails here, not mid-run, when pydantic, rich or psutil is missing

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
try:
    import pynvml

    pynvml.nvmlInit()
    print(f"NVML driver {pynvml.nvmlSystemGetDriverVersion()}")
    pynvml.nvmlShutdown()
except Exception as exc:
    print(f"NVML unavailable: {exc}")
EOF

echo "== python -m ironpod.health --level deep"
mkdir -p "$WORK_DIR"
rc=0
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" COLUMNS="${COLUMNS:-160}" timeout 600 \
    "$PY" -m ironpod.health --level deep --work-dir "$WORK_DIR" \
    ${skip_dcgm[@]+"${skip_dcgm[@]}"} ${args[@]+"${args[@]}"} || rc=$?
rm -rf "$WORK_DIR"
case $rc in
    0) echo "== healthy (warnings, if any, are listed above)" ;;
    1) echo "== at least one check failed" ;;
    *) echo "== the health run itself failed (exit $rc)" ;;
esac
exit "$rc"
