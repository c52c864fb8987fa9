"""The benchmarks still run end to end (tiny sizes; they print ratios, tests assert no timings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_send_benchmark_prints_both_rates_and_the_ratio():
    out = run("bench.bench_send", "--messages", "20", "--smtp-rtt-ms", "0,5")
    assert out.count("x  (A timed on") == 2


def test_governor_benchmark_prints_round_trips_per_decision():
    out = run("bench.bench_governor", "--workers", "2", "--decisions", "10", "--accounts", "3")
    assert "ga-2026" in out and "preview-2024" in out


def test_conservation_bench_prints_each_terminal_state_and_finds_nothing_lost_or_doubled():
    out = run("bench.conservation", "--count", "40", "--kills", "1", "--outage-seconds", "1", "--seed", "3")
    assert "terminal states" in out and "sent " in out and "refused " in out
    assert "duplicates, other Message-ID  0" in out and "\nlost                     0" in out
