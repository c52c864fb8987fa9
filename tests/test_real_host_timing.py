"""Real clock, real host: a backlog over HVE's per-minute limit is sent at the limit, not re-booked forever.

Two local hosts (`python -m tools.devhost`, separate processes, like two Functions instances) share
one queue; host.json is the project's with `maxPollingInterval` raised to 15 s, so an idle host
backs off as it would on Azure (60 s there). The HVE emulator enforces preview-2024 (10 messages
with external recipients per account per rolling minute, by its own real clock) and answers
`450 4.5.104` past it. Two accounts, 40 external requests (20 per account: two minutes' worth) and
a few internal ones, all on the queue before the hosts start.

HVE's minute is 60 s, so this test takes about 90 s of wall time by nature. Nothing is slept for
correctness: it polls the emulator and the ledger against deadlines.

`REAL_HOST_PACING=next-free` runs the same test with the hosts on the next-free experiment
(bench/next_free.py: a per-account next-free time, no bookings; docs/governor.md, "Bookings or
next-free time"), which the comparison in the doc measured. Its own counterpart of "booked twice"
is "deferred to an opening twice".
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

from azure.data.tables import TableClient
from azure.storage.queue import QueueClient

from tools.devhost import parse_timespan
from tools.devhost_process import ROOT, HostProcess

ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw"}
INTERNAL_DOMAIN = "contoso.com"
EXTERNAL = 40
INTERNAL = 4
PER_MINUTE = 10                      # preview-2024: external messages per account per rolling minute
MAX_POLLING_INTERVAL = "00:00:15"
MARGIN_SECONDS = 2.0                 # HVE_PACING_MARGIN_SECONDS as shipped
BOOKINGS_PER_SECOND = 8              # HVE_BOOKINGS_PER_SECOND as shipped
# Long enough for the run to end well past its bound, so a failure shows what happened instead.
DEADLINE_SECONDS = 180.0
PACING = os.environ.get("REAL_HOST_PACING", "bookings")  # or "next-free" (bench/next_free.py)
NEXT_FREE_JITTER_SECONDS = 2.0                          # bench/next_free.py JITTER_SECONDS


def test_two_hosts_with_slow_polling_send_an_over_the_limit_backlog_at_the_limit_without_throttling(
        storage, make_emulator, tmp_path: Path) -> None:
    # A per-test emulator: its counters and rolling windows are this test's alone, and it enforces
    # preview-2024 (the session emulator plays ga-2026, which refuses external recipients).
    emulator = make_emulator(profile="preview-2024")
    settings = storage.env(
        HVE_SMTP_HOST="127.0.0.1", HVE_SMTP_PORT=str(emulator.port), HVE_SMTP_CA_FILE=str(emulator.ca_file),
        HVE_ACCOUNTS=",".join(ACCOUNTS), HVE_PASSWORDS=json.dumps(ACCOUNTS), HVE_INTERNAL_DOMAINS=INTERNAL_DOMAIN,
        HVE_LIMITS_PROFILE="preview-2024", RECIPIENT_HASH_KEY="real-host-timing",
    )
    host_json = json.loads((ROOT / "host.json").read_text())
    host_json["extensions"]["queues"]["maxPollingInterval"] = MAX_POLLING_INTERVAL
    poll_seconds = parse_timespan(MAX_POLLING_INTERVAL)

    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    external_ids = [f"ext-{n:03d}" for n in range(EXTERNAL)]
    internal_ids = [f"int-{n:03d}" for n in range(INTERNAL)]
    for request_id in external_ids:
        queue.send_message(json.dumps({"id": request_id, "to": [f"{request_id}@example.org"],
                                       "subject": request_id, "text": "over the limit"}))
    for request_id in internal_ids:
        queue.send_message(json.dumps({"id": request_id, "to": [f"{request_id}@{INTERNAL_DOMAIN}"],
                                       "subject": request_id, "text": "internal"}))
    everyone = set(external_ids) | set(internal_ids)

    # INFO: one line per handled request ("request <id>: deferred via <account> (booked)"), so
    # bookings can be counted from the outside.
    app = {"bookings": "function_app", "next-free": "bench.next_free_app"}[PACING]
    hosts = [HostProcess(tmp_path / f"host-{n}", settings, host_json=host_json, log_level="INFO", app=app)
             for n in (1, 2)]
    ledger = TableClient.from_connection_string(storage.connection_string, storage.table_prefix + "ledger")
    started = time.monotonic()
    try:
        for host in hosts:
            host.start()

        def sent_rows() -> set[str]:
            try:
                return {row["PartitionKey"] for row in ledger.query_entities(
                    "RowKey eq 'request' and State eq 'sent'", select=["PartitionKey"])}
            except Exception:  # noqa: BLE001 - the table exists only once a host has written to it
                return set()

        while sent_rows() != everyone:
            assert not any(h.exited() for h in hosts), f"a host exited early; see {tmp_path}"
            if time.monotonic() - started > DEADLINE_SECONDS:
                break
            time.sleep(0.5)
    finally:
        for host in hosts:
            host.stop()

    accepted = emulator.accepted()
    stats = emulator.stats()
    by_subject = Counter(_subject(record.path) for record in accepted)
    logs = "".join(host.log_file.read_text() for host in hosts)
    booked = [m.groups() for m in re.finditer(r"request (\S+): deferred via (\S+) \(booked\)", logs)]
    if PACING == "next-free":  # "request <id>: deferred (external messages per minute)": to an opening
        booked = [(m.group(1), "-") for m in re.finditer(r"request (\S+): deferred \([^)]*per minute\)", logs)]
    bookings = Counter(request_id for request_id, _ in booked)
    times = sorted(r.received_at for r in accepted if r.external_recipients)
    makespan = times[-1] - times[0] if times else float("nan")
    summary = (f"pacing {PACING}, accepted {len(accepted)}/{len(everyone)}, makespan {makespan:.1f} s, "
               f"replies {stats['replies']}, "
               f"bookings per account {dict(Counter(account for _, account in booked))}, "
               f"bookings per request {sorted(Counter(bookings.values()).items())}, "
               f"ledger sent {len(sent_rows())}; logs in {tmp_path}")

    # Every request went, once, and the ledger says so.
    assert set(by_subject) == everyone, summary
    assert max(by_subject.values()) == 1, summary
    assert sent_rows() == everyone, summary
    # HVE never had to say no: no 4.x.x reply at all (4.5.104 is the per-minute limit).
    assert not [code for code in stats["replies"] if code.startswith("4.")], summary

    # Makespan, by the emulator's clock: first accepted to last accepted external message.
    per_account = math.ceil(EXTERNAL / len(ACCOUNTS))
    windows = math.ceil(per_account / PER_MINUTE) - 1
    minimum = windows * 60.0
    # Allowance over the minimum and one polling interval:
    # - the relay counts a minute as 60 s + HVE_PACING_MARGIN_SECONDS, once per window waited;
    # - bookings are spread over seconds, at most HVE_BOOKINGS_PER_SECOND (8, never fewer than the
    #   accounts' combined rate needs) falling due in one second (shared/governor/pacing.py, `_spread`): the
    #   second wave's last slot is up to ceil(second wave / 8) - 1 seconds after its first.
    # How late the host picks a booking up (the pacer keeps that to about a second) and how long
    # the first wave takes to go out are inside the polling interval.
    # (Next-free: no spread; a deferred request comes back up to its jitter, plus the rounding of its
    # visibility delay up to whole seconds, after the opening.)
    second_wave = EXTERNAL - len(ACCOUNTS) * PER_MINUTE
    spread = (math.ceil(second_wave / BOOKINGS_PER_SECOND) - 1) if PACING == "bookings" else NEXT_FREE_JITTER_SECONDS + 1
    allowance = MARGIN_SECONDS * windows + spread
    bound = minimum + poll_seconds + allowance
    assert makespan <= bound, f"makespan over {bound:.0f} s (minimum {minimum:.0f} s); {summary}"

    # Lateness never cost a slot: no request was booked twice (a late one goes at once, or is
    # re-booked in the same write that gives back its stale slot: that would show here).
    assert set(bookings) <= set(external_ids), summary
    assert max(bookings.values(), default=0) <= 1, summary
    print(f"bound {bound:.0f} s (minimum {minimum:.0f} s); {summary}")


def _subject(path: Path) -> str:
    head = path.read_bytes().split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""
