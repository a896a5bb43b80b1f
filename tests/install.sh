#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: the Python packages,
# Chromium and its driver for the page tests, a local Chart.js, and a running
# PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ ! -f vendor/chart.umd.js ] && command -v npm >/dev/null; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent chart.js@4.6.1 >/dev/null && tar xzf chart.js-*.tgz)
    mkdir -p vendor && cp "$tmp/package/dist/chart.umd.js" vendor/chart.umd.js
    rm -rf "$tmp"
fi
# PostgreSQL for the tests that run on both engines: the Debian package's
# cluster, started, with a superuser role for whoever runs the tests (peer
# authentication over the Unix socket). LLIMIT_TEST_POSTGRES_URL points the
# tests elsewhere instead.
if [ -z "${LLIMIT_TEST_POSTGRES_URL:-}" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    if ! command -v pg_ctlcluster >/dev/null; then
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq postgresql >/dev/null
    fi
    cluster=$(pg_lsclusters -h | awk 'NR == 1 {print $1, $2}')
    if [ -z "$cluster" ]; then
        version=$(ls /usr/lib/postgresql | sort -n | tail -1)
        $SUDO pg_createcluster "$version" main >/dev/null
        cluster="$version main"
    fi
    $SUDO pg_ctlcluster $cluster start 2>/dev/null || true
    if [ "$(id -u)" = 0 ]; then AS_POSTGRES="runuser -u postgres --"; else AS_POSTGRES="sudo -u postgres"; fi
    me=$(id -un)
    $AS_POSTGRES psql -qtAc "select 1 from pg_roles where rolname = '$me'" | grep -q 1 \
        || $AS_POSTGRES createuser --superuser "$me"
fi
