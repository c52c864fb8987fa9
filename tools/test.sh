#!/usr/bin/env bash
# One command: set up, then run the whole test suite (unit, real Azurite, real SMTP over TLS,
# swaks, the Bicep checks). Extra arguments go to pytest, e.g. tools/test.sh -k governor
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup.sh" --tests
cd "$ROOT"
tools/iac_check.sh
exec .venv/bin/python -m pytest "$@"
