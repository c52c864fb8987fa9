#!/usr/bin/env bash
# The whole suite at chosen hours of the UTC day (the clock shifted with Debian's faketime, every
# child process included: Azurite, the emulator, the local host; the monotonic clock stays real).
# The suite must not depend on the hour; this is how to check it. Not part of CI: each hour is a
# whole suite run (pytest only: the Bicep checks read no clock).
#   tools/test_hours.sh                       # 00:00:30 03:00 12:00 21:30 23:59:30 today (UTC)
#   tools/test_hours.sh 23:59:30 -- -k report # some hours, extra pytest arguments after --
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
hours=()
while (($#)) && [[ "$1" != "--" ]]; do hours+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
((${#hours[@]})) || hours=(00:00:30 03:00:00 12:00:00 21:30:00 23:59:30)
if ! command -v faketime >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
  else
    echo "faketime is needed (sudo apt-get install faketime)" >&2; exit 1
  fi
fi
"$ROOT/tools/setup.sh" --tests   # once, on the real clock
lib="$(find /usr/lib /usr/local/lib -name libfaketime.so.1 -path '*faketime*' 2>/dev/null | head -n 1)"
[[ -n "$lib" ]] || { echo "libfaketime.so.1 not found" >&2; exit 1; }
# Only the wall clock is shifted; see tools/faketime/monotonic_sleep.c for why and for the shim.
mkdir -p .local
shim=".local/monotonic_sleep.so"
if [[ ! -f "$shim" || tools/faketime/monotonic_sleep.c -nt "$shim" ]]; then
  cc -O2 -shared -fPIC -o "$shim" tools/faketime/monotonic_sleep.c -ldl
fi
day="$(date -u +%F)"
summary=()
status=0
for hour in "${hours[@]}"; do
  log=".local/test-hours-${hour//:/}.log"
  start=$SECONDS
  # The clock starts at that instant and runs on from there (so 23:59:30 crosses midnight).
  # Chromium does not run under libfaketime here (pages never load, or it crashes when skipped
  # with FAKETIME_SKIP_CMDS): the browser test runs on the real clock only, in ./tools/test.sh.
  # An offset from the real clock, not an absolute start ("@day hour"): with an absolute start each
  # process's clock begins at that instant when the process starts, so a local host started twenty
  # minutes into the run is twenty minutes behind Azurite and the emulator, whose TLS certificate is
  # then "not yet valid" for it. With an offset every process reads the same shifted clock.
  offset=$(( $(date -u -d "$day $hour" +%s) - $(date -u +%s) ))
  TZ=UTC LD_PRELOAD="$ROOT/$shim:$lib" FAKETIME="$(printf '%+d' "$offset")" FAKETIME_DONT_FAKE_MONOTONIC=1 \
    .venv/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_dashboard_browser.py "$@" >"$log" 2>&1
  rc=$?
  line="$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -n 1)"
  summary+=("$(printf '%s UTC  rc %s  %4d s  %s' "$hour" "$rc" $((SECONDS - start)) "$line")")
  printf '%s\n' "${summary[-1]}"
  ((rc == 0)) || status=1
done
echo "== suite by hour of day (logs in .local/test-hours-*.log)"
printf '%s\n' "${summary[@]}"
exit $status
