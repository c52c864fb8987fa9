#!/usr/bin/env bash
# Mutation score of the pure policy modules, per module (mutmut 3, configured in setup.cfg [mutmut]:
# `only_mutate` lists the pure modules, `pytest_add_cli_args_test_selection` their fast pure tests).
# Not run by CI: it takes minutes. Each mutant is run against those tests (the `unit` tier only); a
# mutant no test notices "survived". Results stay in mutants/ (gitignored): `.venv/bin/mutmut show
# NAME` prints a survivor's diff, `.venv/bin/mutmut browse` browses them.
#
# Usage: tools/mutation.sh [MODULE ...]   MODULE: a pure module's name (`python -m tools.mutation_report
#                                          --list`; default: all of them)
#        KEEP=1 tools/mutation.sh ...     reuse mutants/ from the last run instead of starting afresh
#        WRITE=1 tools/mutation.sh ...    also record the scores in docs/mutation-scores.json and the
#                                          table in docs/testing.md (tests/test_mutation_scores.py)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/mutmut ]] || { echo "mutmut is missing: run tools/setup.sh (requirements-dev.txt)" >&2; exit 1; }
declare -A DOTTED=()  # module name -> shared.<package>.<module>, from setup.cfg's only_mutate
ALL=()
while read -r name dotted; do DOTTED[$name]=$dotted; ALL+=("$name"); done < <(.venv/bin/python -m tools.mutation_report --list)
modules=("$@")
(( ${#modules[@]} )) || modules=("${ALL[@]}")
for m in "${modules[@]}"; do
  [[ -n "${DOTTED[$m]:-}" ]] || { echo "unknown module '$m' (one of: ${ALL[*]})" >&2; exit 2; }
done

[[ "${KEEP:-0}" == "1" ]] || rm -rf mutants
patterns=()
for m in "${modules[@]}"; do patterns+=("${DOTTED[$m]}.*"); done
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "mutmut: mutating ${modules[*]} (log: mutants/run.log)"
if ! .venv/bin/mutmut run ${MAX_CHILDREN:+--max-children "$MAX_CHILDREN"} "${patterns[@]}" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "mutmut run failed" >&2
  exit 1
fi
cp "$log" mutants/run.log

write=()
[[ "${WRITE:-0}" == "1" ]] && write=(--write)
.venv/bin/mutmut results --all true 2>/dev/null | .venv/bin/python -m tools.mutation_report "${write[@]}" "${modules[@]}"
