#!/usr/bin/env bash
# One command: set up, then run the whole test suite (unit, real Azurite, real SMTP over TLS,
# swaks, the Bicep checks). Extra arguments go to pytest, e.g. tools/test.sh -k governor
# Tiers (markers set in tests/conftest.py): tools/test.sh -m unit runs only the pure tests, in
# seconds (no Bicep checks, a smaller property-test search); -m integration; -m system.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit_only=0
prev=""
for arg in "$@"; do
  if [[ "$prev" == "-m" && "$arg" == "unit" ]] || [[ "$arg" == "-m=unit" || "$arg" == "-munit" ]]; then unit_only=1; fi
  prev="$arg"
done
if ((unit_only)); then
  "$ROOT/tools/setup.sh"
  cd "$ROOT"
  export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-quick}"
  exec .venv/bin/python -m pytest "$@"
fi
"$ROOT/tools/setup.sh" --tests
cd "$ROOT"
# The deployed code: lint, format and types (ruff.toml, mypy.ini).
.venv/bin/ruff check shared function_app.py
.venv/bin/ruff format --check shared function_app.py
.venv/bin/mypy
tools/iac_check.sh
exec .venv/bin/python -m pytest "$@"
