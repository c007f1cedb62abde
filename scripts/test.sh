#!/usr/bin/env bash
# The whole test suite: set up .venv, lint, type-check, then pytest (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check src recipes examples bench tests
.venv/bin/ruff format --check src recipes examples bench tests
echo "== mypy (strict, src/)"
.venv/bin/mypy
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== services (PostgreSQL)"
    eval "$(bash scripts/services.sh)"
fi
echo "== pytest"
# --durations: where the suite's minutes go, printed at the end of every run (CI included)
exec .venv/bin/python -m pytest --durations=25 "$@"
