#!/usr/bin/env bash
# Headless Chromium for the report test (tests/report.rs opens reports from file:// and takes
# screenshots): installs Debian's chromium if missing (needs root). Sourced by scripts/test.sh.
set -euo pipefail
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    echo "chromium.sh: installing chromium" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
