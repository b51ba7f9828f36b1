#!/usr/bin/env bash
# CI: install a headless browser (Debian's chromium) for tests/test_report.py, which screenshots the
# run report offline. A no-op when chromium is already installed. Needs root and apt-get; without
# them the screenshot test skips with its reason.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
    echo "chromium-setup: no apt-get; install chromium by hand (the report screenshot test skips without it)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
