#!/usr/bin/env bash
# Runs the default experiment from a fresh clone: set-up if needed (no fixtures, no
# TransformerLens run), a release build, then the IOI demo on the real SmolLM2-135M-Instruct.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release --quiet
exec target/release/tl-run experiments/default.toml "$@"
