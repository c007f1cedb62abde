#!/usr/bin/env bash
# Installs (Debian packages) and starts the real servers the tests use: PostgreSQL.
# Needs root and apt-get; scripts/test.sh runs it when both are there, otherwise the tests that
# need a server are skipped with that reason. Prints the export lines for the test environment.
set -euo pipefail

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "== installing PostgreSQL (Debian packages)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
    pg_ctlcluster "$version" main start >&2
fi
for _ in $(seq 1 30); do
    su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
    sleep 0.5
done
if ! su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='ironpod'\"" | grep -q 1; then
    su postgres -c "psql -qc \"create role ironpod login createdb password 'ironpod'\"" >&2
fi
echo "export IRONPOD_TEST_POSTGRES_URL=postgresql+psycopg://ironpod:ironpod@127.0.0.1:5432/postgres"
