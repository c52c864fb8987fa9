"""The benchmarks still run end to end (tiny sizes; they print ratios, tests assert no timings)."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from bench.bench_governor import START, over_grants, window_over_grants
from shared.governor.blocks import BLOCK_MAX
from shared.hve.limits import PROFILES

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_send_benchmark_prints_both_rates_and_the_ratio():
    out = run("bench.bench_send", "--messages", "20", "--smtp-rtt-ms", "0,5")
    assert out.count("x  (A timed on") == 2


def test_governor_benchmark_reports_contention_waits_and_no_over_grants():
    # One account and two processes: the rolling minute binds (about 20 external messages for a
    # limit of 10 a minute), so the processes really compete for the same slots.
    out = run("bench.bench_governor", "--workers", "2", "--decisions", "20", "--accounts", "1")
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(ga-2026|ga-2026/budget|preview-2024)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$",
                     line)
        if m:
            rows[m[1]] = {"round_trips": float(m[3]), "grants": int(m[5]), "contention_waits": int(m[6]),
                          "over_grants": int(m[7])}
    assert set(rows) == {"ga-2026", "ga-2026/budget", "preview-2024"}, out
    assert all(r["over_grants"] == 0 for r in rows.values()), out
    assert all(r["grants"] + r["contention_waits"] <= 40 and r["grants"] > 0 for r in rows.values()), out
    # The paced path writes an account row per block of at most BLOCK_MAX slots; the plain
    # scheduler only reads now and then (one read per process here), and with a budget claims it
    # in blocks.
    assert rows["preview-2024"]["round_trips"] >= 1 / BLOCK_MAX, out
    assert rows["ga-2026"]["round_trips"] <= 0.1 and rows["ga-2026/budget"]["round_trips"] <= 0.3, out
    assert re.search(r"^over-grants: 0 \(re-counted from \d+ granted slots\)$", out, re.M), out


def test_the_over_grant_recount_sees_a_crowded_minute_and_a_full_day():
    limits = replace(PROFILES["preview-2024"], external_messages_per_minute=2, external_recipients_per_day=3,
                     recipients_per_day_per_tenant=5)
    assert window_over_grants([0.0, 30.0, 59.9], 2) == 1     # three in one minute
    assert window_over_grants([0.0, 30.0, 60.0], 2) == 0     # the first has left the minute
    assert window_over_grants([0.0, 1.0, 2.0, 3.0], 2) == 2  # two minutes start crowded
    assert window_over_grants([0.0] * 9, None) == 0
    fine = [("a", START, 0, 1), ("a", START + 61, 0, 1), ("b", START, 1, 0)]
    assert over_grants(fine, limits) == 0
    # A fourth external recipient for account a on the same UTC day, and a sixth for the tenant.
    assert over_grants(fine + [("a", START + 200, 0, 2)], limits) == 1
    assert over_grants(fine + [("c", START + 300, 3, 0)], limits) == 1


def test_conservation_bench_prints_each_terminal_state_and_finds_nothing_lost_or_doubled():
    out = run("bench.conservation", "--count", "40", "--kills", "1", "--outage-seconds", "1", "--seed", "3")
    assert "terminal states" in out and "sent " in out and "refused " in out
    assert "duplicates, other Message-ID  0" in out and "\nlost                     0" in out


def test_report_bench_writes_a_history_and_asks_the_real_handler_for_24_hours_and_7_days():
    out = run("bench.report", "--days", "3", "--requests-per-day", "300", "--repeat", "2")
    rows = {m[1]: (float(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in re.finditer(
        r"^(24 h|7 days)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\d+\s+\d+\s+\d+\s+\d+\s+(\d+)\s+(\d+)\s+(-?\d+)\s", out, re.M)}
    assert set(rows) == {"24 h", "7 days"}, out
    # Table requests are a count, not a timing, but the open days' hour rows grow through the day
    # (past 1,000 a query takes a second page), so the promise is a function of the rows read:
    # once the closed days have their rollups, one governor read plus one request per 1,000 rows
    # of each range query (two, and a third while closed days without rows are in the window),
    # at whatever hour this runs.
    for label, (requests, rows_read, due, over) in rows.items():
        assert rows_read > 0 and requests <= due and over <= 0, (label, out)
        assert due <= 1 + 3 + rows_read // 1000, (label, out)
    assert "hveledger" not in out and re.search(r"^ratio 7 days / 24 h: time [\d.]+x", out, re.M), out


def test_storage_requests_bench_counts_the_relays_requests_from_azurites_log():
    out = run("bench.storage_requests", "--messages", "6")
    rows = {line.split(None, 1)[1].split("  (")[0]: float(line.split()[0]) for line in out.splitlines()
            if re.match(r"^\s+\d+\.\d{3}\s", line)}
    # Every message is read, claimed and settled in the ledger, indexed, and deleted from the queue.
    assert rows["queue delete"] == 1.0 and rows["recipient index PATCH"] == 1.0
    assert rows["ledger POST"] == 1.0 and "host receive" in rows
    charged = sum(v for k, v in rows.items() if k != "TOTAL caused by the relay per message"
                  and not k.startswith("host ") and k not in ("table create", "queue create"))
    assert abs(charged - rows["TOTAL caused by the relay per message"]) < 0.02
    # The plain path (ga-2026, no budget): no governor write, no ledger read, one ledger update.
    assert "governor PUT" not in rows and "ledger GET" not in rows and rows["ledger PUT"] == 1.0


def test_trace_fairness_bench_reads_every_account_without_a_429():
    out = run("bench.trace_fairness", "--accounts", "5", "--per-day", "4000", "--hours", "1", "--ledger-every", "10")
    m = re.search(r"^\s+5\s+4000\s+1\s+6\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)$",
                  out, re.M)
    assert m, out
    max_per_5min, throttled, never = int(m[1]), int(m[3]), int(m[6])
    assert 0 < max_per_5min <= 60 and throttled == 0 and never == 0, out
    assert "accounts read: 5 of 5" in out, out


def test_priority_lane_bench_prints_both_lanes_and_priority_beats_the_backlog():
    out = run("bench.priority_lane", "--bulk", "300", "--tries", "3", "--bulk-tries", "1", "--bulk-timeout", "150",
              "--gap", "2")
    rows = {m[1]: (int(m[2]), m[3], m[4]) for m in re.finditer(
        r"^(priority|bulk)\s+(\d+)\s+(> \d+|[\d.]+)\s+(> \d+|[\d.]+)\s+(?:> \d+|[\d.]+)$", out, re.M)}
    assert set(rows) == {"priority", "bulk"} and rows["priority"][0] == 3 and rows["bulk"][0] == 1, out
    ratio = re.search(r"^ratio bulk/priority p50: (>? ?)([\d.]+)x", out, re.M)
    assert ratio and float(ratio[2]) > 1.0, out  # the priority request did not wait for the backlog
    assert re.search(r"^target priority p99 <= 5 s: (met|NOT met) \(", out, re.M), out
