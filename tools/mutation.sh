#!/usr/bin/env bash
# Mutation score of the pure policy modules, per module (mutmut 3, configured in setup.cfg [mutmut]).
# Not run by CI: it takes minutes. Each mutant of shared/<module>.py is run against the fast pure
# tests named in setup.cfg; a mutant no test notices "survived". Results stay in mutants/ (gitignored):
# `.venv/bin/mutmut show NAME` prints a survivor's diff, `.venv/bin/mutmut browse` browses them.
#
# Usage: tools/mutation.sh [MODULE ...]   MODULE: pacing replies contract mime limits retry (default: all)
#        KEEP=1 tools/mutation.sh ...     reuse mutants/ from the last run instead of starting afresh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ALL=(pacing replies contract mime limits retry)
modules=("$@")
(( ${#modules[@]} )) || modules=("${ALL[@]}")
for m in "${modules[@]}"; do
  [[ " ${ALL[*]} " == *" $m "* ]] || { echo "unknown module '$m' (one of: ${ALL[*]})" >&2; exit 2; }
done
[[ -x .venv/bin/mutmut ]] || { echo "mutmut is missing: run tools/setup.sh (requirements-dev.txt)" >&2; exit 1; }

[[ "${KEEP:-0}" == "1" ]] || rm -rf mutants
patterns=()
declare -A DOTTED=([pacing]=governor.pacing [replies]=send.replies [contract]=send.contract [mime]=send.mime [limits]=hve.limits [retry]=send.retry)  # module -> its place under shared/
for m in "${modules[@]}"; do patterns+=("shared.${DOTTED[$m]}.*"); done
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "mutmut: mutating ${modules[*]} (log: mutants/run.log)"
if ! .venv/bin/mutmut run "${patterns[@]}" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "mutmut run failed" >&2
  exit 1
fi
cp "$log" mutants/run.log

.venv/bin/mutmut results --all true 2>/dev/null | .venv/bin/python -m tools.mutation_report "${modules[@]}"
