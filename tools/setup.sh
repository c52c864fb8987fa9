#!/usr/bin/env bash
# Sets up what the demo and the tests need, once (re-runs are cheap: stamps skip finished steps).
#   .venv/          Python 3.11+ with requirements.txt (the app's runtime packages, locked and
#                   hash-checked: --require-hashes) and requirements-dev.txt (local tools, not
#                   hash-checked, constrained to the runtime pins)
#   node_modules/   Azurite from npm, installed into the repo (not globally)
# Usage: tools/setup.sh [--tests]   (--tests also: swaks, shellcheck, Chromium for the browser test,
#                                    the Bicep check environments)
#   REQUIRE_SWAKS=1   with --tests: fail when swaks is missing and cannot be installed (CI sets it)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '[setup] %s\n' "$*"; }

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  # The deployed runtime is Python 3.11 (infra/), so prefer it locally too.
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON="$candidate"; break
    fi
  done
fi
[[ -n "$PYTHON" ]] || { echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "Node.js 20+ with npm is needed for Azurite" >&2; exit 1; }

# Linux has sha256sum, macOS has shasum.
if command -v sha256sum >/dev/null 2>&1; then hash_cmd=(sha256sum); else hash_cmd=(shasum -a 256); fi
stamp_of() { cat "$@" | "${hash_cmd[@]}" | cut -c1-16; }

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# pip_install ARGS...: quiet pip; on failure its whole output is shown and setup stops.
pip_install() {
  local out
  if ! out="$(.venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    echo "pip install $* failed" >&2
    exit 1
  fi
  grep -v "^WARNING: Location" <<<"$out" || true
}
want="$(stamp_of requirements.txt requirements-dev.txt)"
if [[ "$(cat .venv/.requirements 2>/dev/null)" != "$want" ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null || true
  # The deployed packages exactly as Azure's remote build installs them: every version pinned and
  # every file checked against its hash (requirements.txt, compiled from requirements.in).
  say "installing the app's runtime packages (requirements.txt, --require-hashes)"
  pip_install --require-hashes -r requirements.txt
  # The local tools, not hash-checked; the runtime pins (without their hashes) as constraints, so a
  # tool can never move a runtime package: a conflict stops here instead.
  say "installing the local tools (requirements-dev.txt)"
  grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' requirements.txt | sed 's/[[:space:]].*//' > .venv/runtime-pins.txt
  pip_install -c .venv/runtime-pins.txt -r requirements-dev.txt
  .venv/bin/python -c "import azure.functions, aiosmtplib, aiosmtpd" || { echo "pip install failed" >&2; exit 1; }
  echo "$want" > .venv/.requirements
fi

want="$(stamp_of package.json package-lock.json)"
if [[ ! -d node_modules/azurite || "$(cat node_modules/.requirements 2>/dev/null)" != "$want" ]]; then
  say "installing Azurite from npm into node_modules/"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > node_modules/.requirements
fi

if [[ "${1:-}" == "--tests" ]]; then
  missing=()
  command -v swaks >/dev/null 2>&1 || missing+=(swaks)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  if (( ${#missing[@]} )); then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      say "installing ${missing[*]} from Debian"
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    elif command -v brew >/dev/null 2>&1; then
      say "installing ${missing[*]} with Homebrew"
      brew install "${missing[@]}" >/dev/null
    else
      say "please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]}); the tests that need them are skipped"
    fi
  fi
  # The dashboard's browser test drives Debian's headless Chromium with Playwright (no browser
  # download: Playwright is pointed at this binary; CHROMIUM=/path overrides). In CI a skip fails.
  if [[ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      say "installing chromium from Debian (the dashboard's browser test)"
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      say "no Chromium: the dashboard's browser test is skipped (sudo apt-get install chromium, or CHROMIUM=/path/to/chromium)"
    fi
  fi
  # CI (.ci/run) sets REQUIRE_SWAKS=1: the swaks tests must run there, so no swaks is an error.
  if [[ "${REQUIRE_SWAKS:-0}" == "1" ]] && ! command -v swaks >/dev/null 2>&1; then
    echo "swaks is required (REQUIRE_SWAKS=1) but could not be installed (apt-get install -y swaks)" >&2
    exit 1
  fi
  tools/iac_check.sh --setup >/dev/null
fi
say "ready"
