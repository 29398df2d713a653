#!/usr/bin/env bash
# The whole test suite from a fresh clone: `cargo fmt --check`, set-up (if needed), fixtures, TransformerLens outputs
# and reference logits (if stale), a single-node Slurm cluster for the array test (installed from
# Debian if missing), headless Chromium for the report test (likewise), every Rust test, clippy with
# warnings as errors, then the regression gate over configs/zoo-ci.toml (its
# table on stdout, check.parquet and JUnit XML under results/check/), and the GPU bench's steps in
# their short CPU mode (benches/gpu/short.sh: TransformerLens against tl-run, the 8B bench's specs),
# and last the gate and the tests that depend on kernels' rounding again with other CPUs' code
# paths forced.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Formatting first: rustfmt.toml is the style, and a diff fails in seconds, before any build.
cargo fmt --check
bash scripts/setup.sh
bash scripts/sae_lens.sh
bash scripts/fixtures.sh
# An assignment, so that a failed Slurm set-up stops the script (`eval "$(...)"` would not).
slurm_env="$(bash scripts/slurm.sh)"
eval "$slurm_env"
bash scripts/chromium.sh
cargo test --all-targets "$@"
# Lints as errors (Cargo.toml's [lints] says which are allowed and why).
cargo clippy --all-targets --quiet -- -D warnings
BIN=target/debug/tl-run bash benches/gpu/short.sh
cargo run --quiet -- check configs/zoo-ci.toml --quiet --junit results/check/junit.xml
# Other x86-64 CPUs' code paths (docs/reproducibility.md): ATen's portable kernels instead of this
# CPU's AVX2/AVX-512 ones, oneMKL's COMPATIBLE GEMM branch, oneDNN capped at AVX2. Every test and
# the gate (goldens written on another CPU's default path) must hold there too.
export ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2
echo "scripts/test.sh: again with ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY MKL_CBWR=$MKL_CBWR ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA"
cargo test --all-targets "$@"
cargo run --quiet -- check configs/zoo-ci.toml --quiet --junit results/check/junit-other-cpu-paths.xml
