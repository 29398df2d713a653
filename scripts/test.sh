#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up (if needed), fixtures and TransformerLens
# reference outputs (if stale), then every Rust test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/fixtures.sh
cargo test --all-targets "$@"
