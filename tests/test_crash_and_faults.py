"""The send path under crashes and storage faults, judged from the outside: what HVE (the emulator)
accepted, the ledger rows, the queue and the poison queue. The machinery is bench/conservation.py:
the local host runs as a subprocess (`python -m tools.devhost`, lease shortened to a few seconds),
SMTP goes through a latency proxy (a slow peer, so transactions are in flight), storage through
fault proxies."""

from __future__ import annotations

from bench.conservation import Report, run

NAMES = ("MAIL_QUEUE", "LEDGER_TABLE", "RECIPIENT_INDEX_TABLE", "GOVERNOR_TABLE", "CLAIM_CHECK_CONTAINER",
         "AGGREGATES_TABLE")


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
    assert report.over_counted == {}, summary     # the aggregates never count a request twice


def test_killing_the_host_twice_mid_batch_loses_nothing_and_never_changes_a_message_id(azurite, storage, emulator, tmp_path):
    report = run(300, azurite=azurite, emulator=emulator, workdir=tmp_path, names=names(storage),
                 kills=2, rtt_ms=100, seed=7, timeout=120)
    assert report.faults["host SIGKILL"] == 2
    assert_conserved(report)
    # Only what the killed hosts held in memory is missing (a few seconds of counts each).
    assert report.under_counted < report.count // 2, "\n".join(report.lines())
    print("\n".join(report.lines()))


def test_a_storage_outage_and_table_500s_and_503s_lose_nothing_and_double_nothing(azurite, storage, emulator, tmp_path):
    report = run(200, azurite=azurite, emulator=emulator, workdir=tmp_path, names=names(storage),
                 table_fault_rate=0.06, outage_seconds=3, rtt_ms=20, seed=11, timeout=120)
    assert report.faults["table 500 (applied)"] and report.faults["table 503 (not applied)"]
    assert_conserved(report)
    # No host killed: lost answers are recognised (the ledger row holds the write's mark, the
    # aggregates row the batch's number). Missing only: a final write the outage cut off after
    # storage applied it, all of its SDK retries failing too; its redelivery finds the row final
    # and does not count it (the low side, by design). A few at most.
    assert report.under_counted <= max(3, report.count // 40), "\n".join(report.lines())
    print("\n".join(report.lines()))
