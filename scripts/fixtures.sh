#!/usr/bin/env bash
# Builds the fixture models and the TransformerLens outputs the tests compare against. They live
# in ~/.cache/tl-run/fixtures-<hash of the scripts that make them>, linked as fixtures/, so a
# fresh clone (CI) reuses them and any change to those scripts rebuilds them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$root/.venv/bin/python"
stamp="$(cat tests/oracle/*.py configs/fixtures.toml scripts/requirements.txt ../shared/models/stories260K/model.safetensors | sha256sum | cut -c1-16)"
cache="${TL_RUN_CACHE:-$HOME/.cache/tl-run}"
dir="$cache/fixtures-$stamp"
if [ ! -f "$dir/.complete" ]; then
  echo "tl-run: building fixture models and TransformerLens reference outputs (a few minutes)" >&2
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONWARNINGS=ignore
  "$py" tests/oracle/make_fixtures.py "$dir.tmp" .gpt2-bpe ../shared/models/stories260K
  "$py" tests/oracle/dump_tl.py "$dir.tmp" "$dir.tmp/oracle"
  "$py" tests/oracle/dump_patching.py "$dir.tmp" "$dir.tmp/oracle"
  touch "$dir.tmp/.complete"
  mv "$dir.tmp" "$dir"
fi
if [ -e fixtures ] && [ ! -L fixtures ]; then rm -rf fixtures; fi
ln -sfn "$dir" fixtures
