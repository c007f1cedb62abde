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
# --durations: where the suite's minutes go, printed at the end of every run (CI included).
# -n 2 --dist loadfile: two workers, each module on one of them (its module-scoped clusters
# start once); most tests wait on processes and heartbeats, so two at a time take ~55% of the
# serial wall time on 2 cores (17.7 min against 32 min, 2026-12-06). IRONPOD_TEST_WORKERS=0
# runs them one by one.
workers=${IRONPOD_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
    exec .venv/bin/python -m pytest --durations=25 "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --durations=25 "$@"
