#!/usr/bin/env bash
# Compiles requirements.in (the app's direct runtime dependencies, with ranges) into
# requirements.txt: every package pinned with ==, every file of each pinned version hashed, so
# tools/setup.sh and CI install it with --require-hashes and Azure's remote build installs exactly it.
#   tools/lock.sh                               after editing requirements.in (other pins are kept)
#   tools/lock.sh --upgrade                     every package to the newest version requirements.in allows
#   tools/lock.sh --upgrade-package aiohttp     one package (repeatable)
# pip-compile (pip-tools, requirements-dev.txt) resolves for the Python it runs on: run this with
# Python 3.11 on Linux x86_64, the deployed runtime (Flex Consumption). This machine's pip
# configuration (extra indexes, find-links, constraints) is ignored, so the lock is resolved from
# PyPI alone (LOCK_INDEX_URL=<a mirror of PyPI> to use another).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/pip-compile ]] || { echo "pip-compile is missing: run tools/setup.sh (requirements-dev.txt)" >&2; exit 1; }
if ! .venv/bin/python -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or sys.platform != "linux" or platform.machine() != "x86_64")'; then
  echo "warning: .venv is not CPython 3.11 on Linux x86_64: the lock may miss what the deployed runtime needs" >&2
fi
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_REQUIRE_HASHES \
  PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="tools/lock.sh" \
  .venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --index-url "${LOCK_INDEX_URL:-https://pypi.org/simple}" \
  --output-file requirements.txt "$@" requirements.in
echo "requirements.txt: $(grep -cE '^[A-Za-z0-9]' requirements.txt) packages pinned and hashed"
