#!/usr/bin/env bash
# The main job: set up .venv, then run the local demo (arguments go to `ironpod demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ironpod demo "$@"
