#!/usr/bin/env bash
# Runs the default experiment from a fresh clone: set-up and fixtures if needed, a release
# build, then the IOI activation-patching spec on a GPT-2-architecture fixture the repo makes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/fixtures.sh
cargo build --release --quiet
exec target/release/tl-run experiments/default.toml "$@"
