#!/usr/bin/env bash
# The SAELens oracle's virtualenv (SAELens 6.54 with the TransformerLens 2.x it accepts), under
# ~/.cache keyed by its pinned requirements, linked as .venv-saelens. Idempotent; prints nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${TL_RUN_CACHE:-$HOME/.cache/tl-run}"
venv="$cache/venv-saelens-$(sha256sum scripts/sae_lens_requirements.txt | cut -c1-12)"
if [ ! -f "$venv/.tl-run-complete" ]; then
  echo "tl-run setup: creating $venv (SAELens 6.54 + TransformerLens 2.18; a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/sae_lens_requirements.txt
  "$venv/bin/python" -c "import sae_lens" >/dev/null
  touch "$venv/.tl-run-complete"
fi
ln -sfn "$venv" .venv-saelens
