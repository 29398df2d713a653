#!/usr/bin/env bash
# Prints the files an oracle script's output depends on: the script itself and every module of its
# own folder it imports, followed transitively (dump_zoo.py imports dump_attribution.py, which
# imports oracle_common.py), sorted. scripts/fixtures.sh hashes them into the output's cache key,
# so changing any of them reruns that script (tests/scripts.rs checks it).
# Usage: bash scripts/oracle_deps.sh tests/oracle/dump_zoo.py
set -euo pipefail
dir="$(dirname "$1")"
declare -A seen=()
todo=("$1")
while [ "${#todo[@]}" -gt 0 ]; do
  f="${todo[0]}"
  todo=("${todo[@]:1}")
  [ -n "${seen[$f]:-}" ] && continue
  [ -f "$f" ] || { echo "oracle_deps: $f is missing" >&2; exit 1; }
  seen[$f]=1
  # `import a, b` and `from a import x` at the start of a line; local modules only.
  while read -r mod; do
    if [ "$dir" = . ]; then m="$mod.py"; else m="$dir/$mod.py"; fi
    if [ -f "$m" ]; then todo+=("$m"); fi
  done < <(sed -nE 's/^(from ([A-Za-z_][A-Za-z0-9_]*) import .*|import ([A-Za-z_][A-Za-z0-9_, ]*))( *#.*)?$/\2\3/p' "$f" | tr ',' '\n' | sed -E 's/ as .*//; s/^ +| +$//g')
done
printf '%s\n' "${!seen[@]}" | sort
