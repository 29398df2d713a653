#!/usr/bin/env bash
# Builds the fixture models and the TransformerLens outputs the tests compare against, into
# fixtures/ (git-ignored). Skips the work when the scripts that make them have not changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
stamp_value="$(cat tests/oracle/*.py scripts/requirements.txt | sha256sum | cut -c1-16)"
stamp=fixtures/.stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ]; then
  exit 0
fi
echo "tl-run: building fixture models and TransformerLens reference outputs" >&2
rm -rf fixtures
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONWARNINGS=ignore
"$py" tests/oracle/make_fixtures.py fixtures .gpt2-bpe ../shared/models/stories260K
"$py" tests/oracle/dump_tl.py fixtures fixtures/oracle
echo "$stamp_value" > "$stamp"
