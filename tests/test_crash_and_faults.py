"""The send path under crashes and storage faults, judged from the outside: what HVE (the emulator)
accepted, the ledger rows, the queue and the poison queue. The machinery is bench/conservation.py:
the local host runs as a subprocess (`python -m tools.devhost`, lease shortened to a few seconds),
SMTP goes through a latency proxy (a slow peer, so transactions are in flight), storage through
fault proxies."""

from __future__ import annotations

from bench.conservation import Report, run

NAMES = ("MAIL_QUEUE", "LEDGER_TABLE", "RECIPIENT_INDEX_TABLE", "GOVERNOR_TABLE", "CLAIM_CHECK_CONTAINER")


def names(storage) -> dict[str, str]:
    env = storage.env()
    return {name: env[name] for name in NAMES}


def assert_conserved(report: Report) -> None:
    summary = "\n".join(report.lines())
    assert report.lost == [], summary             # every request reached HVE or a final, recorded refusal
    assert report.foreign == [], summary          # a request sent twice carried the same Message-ID
    assert report.sending_rows == 0, summary      # no ledger row stays `sending`
    assert (report.queue_left, report.poison_left) == (0, 0), summary
    assert set(report.by_state) <= {"sent", "refused"}, summary


def test_killing_the_host_twice_mid_batch_loses_nothing_and_never_changes_a_message_id(azurite, storage, emulator, tmp_path):
    report = run(300, azurite=azurite, emulator=emulator, workdir=tmp_path, names=names(storage),
                 kills=2, rtt_ms=100, seed=7, timeout=120)
    assert report.faults["host SIGKILL"] == 2
    assert_conserved(report)
    print("\n".join(report.lines()))


def test_a_storage_outage_and_table_500s_and_503s_lose_nothing_and_double_nothing(azurite, storage, emulator, tmp_path):
    report = run(200, azurite=azurite, emulator=emulator, workdir=tmp_path, names=names(storage),
                 table_fault_rate=0.06, outage_seconds=3, rtt_ms=20, seed=11, timeout=120)
    assert report.faults["table 500 (applied)"] and report.faults["table 503 (not applied)"]
    assert_conserved(report)
    print("\n".join(report.lines()))
