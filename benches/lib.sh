# Shared set-up of the benchmark scripts (sourced): the venv, fixtures and a release build, and
# the GPT-2-small-shaped bench model, made once under ~/.cache/tl-run/bench-fixtures.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/fixtures.sh
cargo build --release --quiet

# Prints the bench model's directory, building it first if needed.
bench_model() {
  local model="$HOME/.cache/tl-run/bench-fixtures/gpt2-small-shaped"
  if [ ! -f "$model/model.safetensors" ]; then
    .venv/bin/python tests/oracle/make_fixtures.py "$(dirname "$model")" .gpt2-bpe tests/models/stories260K --bench 2>/dev/null >&2
  fi
  echo "$model"
}
