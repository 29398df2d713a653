#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up (if needed), fixtures, TransformerLens outputs
# and reference logits (if stale), a single-node Slurm cluster for the array test (installed from
# Debian if missing), headless Chromium for the report test (likewise), every Rust test, clippy with
# warnings as errors, then the regression gate over configs/zoo-ci.toml (its
# table on stdout, check.parquet and JUnit XML under results/check/), and the GPU bench's steps in
# their short CPU mode (benches/gpu/short.sh: TransformerLens against tl-run, the 8B bench's specs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/fixtures.sh
eval "$(bash scripts/slurm.sh)"
bash scripts/chromium.sh
cargo test --all-targets "$@"
# Lints as errors (Cargo.toml's [lints] says which are allowed and why).
cargo clippy --all-targets --quiet -- -D warnings
BIN=target/debug/tl-run bash benches/gpu/short.sh
cargo run --quiet -- check configs/zoo-ci.toml --quiet --junit results/check/junit.xml
