#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: the Python packages,
# Chromium and its driver for the page tests, and a local Chart.js.
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
