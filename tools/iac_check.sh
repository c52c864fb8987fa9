#!/usr/bin/env bash
# Offline checks of the infrastructure code in infra/ (no Bicep CLI, no network but PyPI):
#   1. every .bicep file parses with pycep-parser 0.7.x            (.venv-iac/pycep)
#   2. checkov's Bicep checks pass, every skip has its reason       (.venv-iac/checkov,
#      config infra/.checkov.yaml)
#   3. infra/deploy.sh passes `bash -n` and, where installed, shellcheck
#
# Usage: tools/iac_check.sh                    run everything (creates .venv-iac/ on first use, ~40 s)
#        tools/iac_check.sh --setup [pycep|checkov]   only create/update the environment(s)
#
# Environment: IAC_PYTHON        interpreter for the environments (default python3.11, python3)
#              IAC_VENV          where the environments live (default <repo>/.venv-iac)
#              IAC_REQUIRE_SHELLCHECK=1   fail instead of skipping when shellcheck is missing
#
# Why two environments: checkov 3.3.x pins pycep-parser==0.5.1, whose grammar has no
# `extension` statement (Bicep's extensibility, used by infra/modules/graph.bicep for the
# Microsoft Graph extension). pycep-parser 0.7.1 parses it. checkov scans a copy of infra/ in
# which `extension <name>` lines are blanked (line numbers kept), so it sees every file; step 1
# proves the real files parse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IAC_VENV:-$ROOT/.venv-iac}"
REQS="$ROOT/requirements-iac.txt"
INFRA="$ROOT/infra"
CHECKOV_CONFIG="$INFRA/.checkov.yaml"

if [[ -n "${IAC_PYTHON:-}" ]]; then
  PYTHON="$IAC_PYTHON"
elif command -v python3.11 >/dev/null 2>&1; then
  PYTHON=python3.11
else
  PYTHON=python3
fi

say() { printf '%s\n' "$*"; }
fail() { printf 'iac_check: FAILED: %s\n' "$*" >&2; exit 1; }

# make_env NAME PACKAGE: .venv-iac/NAME with the requirements-iac.txt line(s) of PACKAGE.
make_env() {
  local package="$2" dir="$VENV/$1" want stamp
  local -a specs
  want="$(grep -E "^${package}([=<>!~ ]|$)" "$REQS" | sed 's/[[:space:]]*#.*$//')"
  [[ -n "$want" ]] || fail "requirements-iac.txt has no line for $package"
  stamp="$dir/.requirements"
  if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  say "setting up $dir ($want)"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  read -ra specs <<<"$want"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "${specs[@]}"
  printf '%s' "$want" >"$stamp"
}

case "${1:-}" in
  "") ;;
  --setup)
    case "${2:-all}" in
      pycep) make_env pycep pycep-parser ;;
      checkov) make_env checkov checkov ;;
      all) make_env pycep pycep-parser; make_env checkov checkov ;;
      *) fail "--setup takes pycep, checkov or nothing" ;;
    esac
    say "environments ready under $VENV"
    exit 0 ;;
  -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
  *) fail "unknown option: $1 (see --help)" ;;
esac
make_env pycep pycep-parser
make_env checkov checkov

mapfile -t BICEP_FILES < <(cd "$ROOT" && find infra -name '*.bicep' | sort)
[[ ${#BICEP_FILES[@]} -gt 0 ]] || fail "no .bicep files under infra/"

# ---------------------------------------------------------------- 1. parse
say "== 1. pycep-parser $("$VENV/pycep/bin/python" -c 'import importlib.metadata as m; print(m.version("pycep-parser"))'): parse every .bicep file"
(cd "$ROOT" && "$VENV/pycep/bin/python" - "${BICEP_FILES[@]}" <<'PY'
import sys
from pathlib import Path

from pycep import BicepParser

parser = BicepParser()
failed = 0
for name in sys.argv[1:]:
    try:
        parser.parse(file_path=Path(name))
    except Exception as exc:  # any parse error fails the check
        failed += 1
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"  FAILED  {name}: {type(exc).__name__}: {first}")
    else:
        print(f"  ok      {name}")
sys.exit(1 if failed else 0)
PY
) || fail "a .bicep file does not parse"

# ---------------------------------------------------------------- 2. checkov
say "== 2. checkov $("$VENV/checkov/bin/checkov" --version) (framework bicep, config infra/.checkov.yaml)"
check_skip_reasons() {
  # Every skipped check id must have a comment right above it (its reason).
  "$VENV/pycep/bin/python" - "$CHECKOV_CONFIG" <<'PY'
import re
import sys

lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
bad = []
for i, line in enumerate(lines):
    m = re.match(r"\s*-\s*(CKV2?_[A-Z0-9_]+)\s*$", line)
    if m and not (i > 0 and lines[i - 1].strip().startswith("#")):
        bad.append(m.group(1))
if bad:
    print("skipped without a reason comment: " + ", ".join(bad))
    sys.exit(1)
PY
}
check_skip_reasons || fail "infra/.checkov.yaml: every skip needs its reason"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp -R "$INFRA" "$WORK/infra"
# Blank `extension <alias>` statements for checkov's older parser (see the header).
while IFS= read -r -d '' f; do
  sed -i -E 's/^([[:space:]]*)extension[[:space:]].*$/\1\/\/ (extension statement blanked for checkov)/' "$f"
done < <(find "$WORK/infra" -name '*.bicep' -print0)

set +e
(cd "$WORK" && "$VENV/checkov/bin/checkov" -d infra --framework bicep --quiet --skip-download \
  --config-file "$CHECKOV_CONFIG" -o cli -o json --output-file-path "console,$WORK/checkov.json")
checkov_rc=$?
set -e
[[ -f "$WORK/checkov.json" ]] || fail "checkov wrote no results (exit code $checkov_rc)"
"$VENV/pycep/bin/python" - "$WORK/checkov.json" "${#BICEP_FILES[@]}" <<'PY' || fail "checkov"
import json
import sys

data = json.load(open(sys.argv[1], encoding="utf-8"))
reports = data if isinstance(data, list) else [data]
summary = {"passed": 0, "failed": 0, "parsing_errors": 0, "resource_count": 0}
for report in reports:
    for key in summary:
        summary[key] += int(report.get("summary", {}).get(key, 0))
print(f"  summary: {summary}")
problems = []
if summary["failed"]:
    problems.append(f"{summary['failed']} failed check(s)")
if summary["parsing_errors"]:
    problems.append(f"{summary['parsing_errors']} file(s) checkov could not parse (so it checked nothing in them)")
if summary["passed"] == 0 or summary["resource_count"] == 0:
    problems.append("checkov checked nothing")
if problems:
    print("  " + "; ".join(problems))
    sys.exit(1)
PY
[[ $checkov_rc -eq 0 ]] || fail "checkov exited with $checkov_rc"

# ---------------------------------------------------------------- 3. deploy script
say "== 3. infra/deploy.sh"
bash -n "$INFRA/deploy.sh" || fail "bash -n infra/deploy.sh"
say "  ok      bash -n"
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck "$INFRA/deploy.sh" "$INFRA"/hooks/*.sh "$ROOT/tools/iac_check.sh" "$ROOT/tools/test_hours.sh" || fail "shellcheck"
  say "  ok      shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
elif [[ "${IAC_REQUIRE_SHELLCHECK:-0}" == "1" ]]; then
  fail "shellcheck is not installed (apt-get install -y shellcheck)"
else
  say "  SKIPPED shellcheck (not installed; apt-get install -y shellcheck)"
fi

say "iac_check: all passed"
