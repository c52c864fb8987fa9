#!/usr/bin/env bash
# One command: set up, then run the app locally on Azurite + the HVE emulator + the local host,
# push a sample batch through it and print what happened. Extra arguments go to tools.demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m tools.demo "$@"
