"""Conservation under crashes and faults: nothing lost, nothing sent twice under another Message-ID.

Sends N mixed requests (valid, invalid, oversize, multi-chunk; half of the valid ones without `id`)
through the local host (`python -m tools.devhost`, a subprocess) to the HVE emulator, while:

* SMTP faults are injected (4xx at DATA, connections dropped before DATA, at DATA before the
  reply, and after HVE accepted the message so the relay never sees the 250);
* Table requests are answered 503 (not applied) or 500 (applied, the answer lost) by a proxy;
* storage is unreachable for a few seconds mid-batch (all three Azurite ports);
* the host is SIGKILLed mid-batch (`--kills`), its messages coming back after its lease.

Then it audits the outcome from the outside only: the emulator's record of what HVE accepted, the
ledger rows, the queue and the poison queue. It prints the count of requests in each terminal
state, the repeats (the same Message-ID accepted again: Exchange drops those), the duplicates
under a different Message-ID and the lost requests (targets: 0 and 0). It also reads the hourly
aggregates (what GET /api/report counts) and compares the requests they count in each final
state with the ledger: never more (a count added twice); fewer only by what killed hosts held in
memory.

    python -m bench.conservation [--count 10000] [--kills 2] [--rtt-ms 20] [--seed 1]

Tests drive the same machinery (`run(...)`) on the session's Azurite and emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient
from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from bench.latency_proxy import LatencyProxy
from shared.send.contract import content_request_id
from shared.ledger import FINAL_STATES, SENDING
from shared.send.mime import message_id
from shared.send.producer import attachment_blob_name
from shared.settings import SETTINGS, Settings
from tools import poison as poison_tool
from tools.azurite import connection_string
from tools.devhost_process import HostProcess
from tools.fault_proxy import Fault, FaultProxy

ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw", "billing@contoso.com": "billing-pw"}
DOMAIN = "contoso.com"
MESSAGE_LIMIT = 200_000          # HVE_LIMITS message_bytes of the run: oversize requests are cheap to make
RECIPIENTS_PER_MESSAGE = 10      # HVE_LIMITS recipients_per_message: multi-chunk requests need few RCPTs
OVERSIZE_BLOB = 190_000          # raw bytes; about 257 KB once base64-encoded
_DEFAULT_AGGREGATES_TABLE = next(spec.default for spec in SETTINGS if spec.name == "AGGREGATES_TABLE")
HOST_LEASE_SECONDS = 3           # the killed host's messages come back after this (the CLI's default: 10)
SENDING_LEASE_SECONDS = 2
HOST_JSON = {"version": "2.0", "functionTimeout": "00:02:00", "extensions": {"queues": {
    "batchSize": 16, "newBatchThreshold": 8, "maxPollingInterval": "00:00:00.500",
    "visibilityTimeout": "00:00:01", "maxDequeueCount": 5, "messageEncoding": "none"}}}


@dataclass(frozen=True)
class Request:
    token: str       # unique; the Subject, so the emulator's record names the request
    kind: str        # valid | multi-chunk | invalid | oversize
    body: str
    request_id: str  # the id the relay uses: the given one, or the one derived from the content
    chunks: int      # SMTP transactions when sent

    @property
    def expected_message_ids(self) -> set[str]:
        return {message_id(self.request_id, DOMAIN, chunk, key=b"conservation") for chunk in range(self.chunks)}

    @property
    def should_send(self) -> bool:
        return self.kind in ("valid", "multi-chunk")


@dataclass
class Report:
    count: int
    by_state: Counter = field(default_factory=Counter)   # terminal ledger state of each request
    lost: list[str] = field(default_factory=list)        # tokens neither delivered nor finally recorded
    foreign: list[str] = field(default_factory=list)     # tokens accepted under a Message-ID not theirs
    repeats: int = 0                                     # extra acceptances under the same Message-ID
    sending_rows: int = 0                                # ledger rows still `sending`
    queue_left: int = 0
    poison_left: int = 0
    accepted: int = 0
    faults: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    counted: Counter = field(default_factory=Counter)    # requests.<state> in the aggregates

    @property
    def over_counted(self) -> dict[str, tuple[int, int]]:
        """Final states the aggregates count more requests in than the ledger holds: (counted, ledger)."""
        return {state: (n, self.by_state[state]) for state, n in self.counted.items() if n > self.by_state[state]}

    @property
    def under_counted(self) -> int:
        return sum(max(0, self.by_state[state] - self.counted[state]) for state in FINAL_STATES)

    def lines(self) -> list[str]:
        states = ", ".join(f"{state} {n}" for state, n in sorted(self.by_state.items()))
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        return [
            f"requests                 {self.count} in {self.seconds:.0f} s",
            f"terminal states          {states}",
            f"accepted by HVE          {self.accepted} (repeats under the same Message-ID: {self.repeats})",
            f"duplicates, other Message-ID  {len(self.foreign)}",
            f"lost                     {len(self.lost)}",
            f"ledger rows `sending`    {self.sending_rows}",
            f"queue / poison left      {self.queue_left} / {self.poison_left}",
            f"faults injected          {faults}",
            f"aggregates (requests)    {', '.join(f'{s} {n}' for s, n in sorted(self.counted.items())) or 'none'}"
            f" (over the ledger: {self.over_counted or 'none'}; under: {self.under_counted})",
        ]

    @property
    def conserved(self) -> bool:
        return not self.lost and not self.foreign and self.sending_rows == 0 and not self.queue_left and not self.poison_left


# --- the requests ---------------------------------------------------------------------------------

def build_requests(count: int, rng: random.Random, oversize_url: Callable[[str], str], run: str) -> list[Request]:
    """`oversize_url(request id)`: the URL of a blob too big for the message limit, written for that
    request (a blob a request names must be under requests/<producer>/<its id>/)."""
    out = []
    for i in range(count):
        token = f"cons-{run}-{i:05d}"
        roll = rng.random()
        doc: dict[str, Any] = {"to": [f"user{i % 97}@{DOMAIN}"], "subject": token, "text": f"Conservation {i}"}
        kind, chunks = "valid", 1
        if roll < 0.10:
            kind = "invalid"
            doc["to"] = [f"user{i}..bad@{DOMAIN}"]
        elif roll < 0.15:
            kind = "oversize"
            doc["id"] = f"id-{token}"   # blob attachments need an id
            doc["attachments"] = [{"name": "big.bin", "contentType": "application/octet-stream",
                                   "blobUrl": oversize_url(doc["id"])}]
        elif roll < 0.25:
            kind, chunks = "multi-chunk", 2
            doc["bcc"] = [f"list{i}-{n}@{DOMAIN}" for n in range(RECIPIENTS_PER_MESSAGE + 1)]
        if rng.random() < 0.5 and "id" not in doc:
            doc["id"] = f"id-{token}"
        body = json.dumps(doc, separators=(",", ":"))
        out.append(Request(token, kind, body, doc.get("id") or content_request_id(body), chunks))
    return out


# --- faults ------------------------------------------------------------------------------------------

class SmtpFaults:
    """Keeps one SMTP fault pending every `every` accepted messages (so they spread over the run)."""

    KINDS = (("451 at DATA", 4), ("drop before DATA", 2), ("drop at DATA", 2), ("drop after accept", 2))

    def __init__(self, emulator: Any, rng: random.Random, every: int, counts: Counter) -> None:
        self.emulator, self.rng, self.every, self.counts = emulator, rng, every, counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="smtp-faults")

    def __enter__(self) -> "SmtpFaults":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        injected = 0
        kinds = [k for k, weight in self.KINDS for _ in range(weight)]
        while not self._stop.wait(0.05):
            due = 1 + len(self.emulator.accepted()) // self.every
            while injected < due:
                kind = self.rng.choice(kinds)
                if kind == "451 at DATA":
                    self.emulator.fail_next(1, "451 4.7.0 Temporary server error", stage="DATA")
                elif kind == "drop before DATA":
                    self.emulator.drop_next(1, stage=self.rng.choice(["MAIL", "RCPT"]))
                elif kind == "drop at DATA":
                    self.emulator.drop_next(1, stage="DATA")
                else:
                    self.emulator.drop_next(1, stage="DATA", after_accept=True)
                self.counts[kind] += 1
                injected += 1


def table_fault_rule(rng: random.Random, rate: float, counts: Counter):
    """Some Table requests get 503 before they reach storage, some 500 after storage applied them."""
    lock = threading.Lock()

    def rule(method: str, path: str) -> Fault | None:
        if "/Tables" in path:  # table creation at start-up: leave it alone
            return None
        with lock:
            roll = rng.random()
        if roll < rate / 2:
            counts["table 503 (not applied)"] += 1
            return Fault(503)
        if roll < rate:
            counts["table 500 (applied)"] += 1
            return Fault(500, applied=True)
        return None

    return rule


# --- one run -------------------------------------------------------------------------------------------

def run(count: int, *, azurite: Any, emulator: Any, workdir: Path, names: dict[str, str], kills: int = 0,
        smtp_faults: bool = False, table_fault_rate: float = 0.0, outage_seconds: float = 0.0,
        rtt_ms: float = 20.0, seed: int = 1, timeout: float = 600.0,
        lease_seconds: float = HOST_LEASE_SECONDS) -> Report:
    """Send `count` requests through a local host and audit where each one ended.

    `names`: MAIL_QUEUE, LEDGER_TABLE, RECIPIENT_INDEX_TABLE, GOVERNOR_TABLE, CLAIM_CHECK_CONTAINER
    (and AGGREGATES_TABLE: the app's default otherwise)."""
    rng = random.Random(seed)
    report = Report(count)
    started = time.monotonic()
    conn = azurite.connection_string
    container = ContainerClient.from_connection_string(conn, names["CLAIM_CHECK_CONTAINER"])
    if not container.exists():
        container.create_container()
    oversize = os.urandom(OVERSIZE_BLOB)

    def oversize_url(request_id: str) -> str:
        return container.upload_blob(attachment_blob_name(request_id, "big.bin"), oversize).url

    requests = build_requests(count, rng, oversize_url, uuid.uuid4().hex[:6])

    proxies = [FaultProxy(azurite.blob_port), FaultProxy(azurite.queue_port),
               FaultProxy(azurite.table_port, rule=table_fault_rule(random.Random(seed + 1), table_fault_rate, report.faults)
                          if table_fault_rate else None)]
    with LatencyProxy(emulator.port, rtt_ms) as smtp_proxy, proxies[0], proxies[1], proxies[2]:
        settings = {
            **names,
            "AzureWebJobsStorage": connection_string(*(p.port for p in proxies)),
            "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(smtp_proxy.port), "HVE_SMTP_CA_FILE": str(emulator.ca_file),
            "HVE_ACCOUNTS": ",".join(ACCOUNTS), "HVE_PASSWORDS": json.dumps(ACCOUNTS), "HVE_INTERNAL_DOMAINS": DOMAIN,
            "HVE_LIMITS": json.dumps({"message_bytes": MESSAGE_LIMIT, "recipients_per_message": RECIPIENTS_PER_MESSAGE}), "RECIPIENT_HASH_KEY": "conservation",
            "RETRY_BASE_SECONDS": "1", "RETRY_MAX_SECONDS": "2", "SENDING_LEASE_SECONDS": str(SENDING_LEASE_SECONDS),
            "HVE_SMTP_TIMEOUT_SECONDS": "10",
            # Many small flushes: more aggregate merges meet the table faults.
            "AGGREGATES_FLUSH_SECONDS": "0.5",
        }
        queue = QueueClient.from_connection_string(conn, names["MAIL_QUEUE"])
        queue.create_queue()
        # Producers trickle: the backlog stays bounded (Azurite slows down with a deep queue).
        producer = threading.Thread(target=lambda: asyncio.run(_produce(conn, names["MAIL_QUEUE"], [r.body for r in requests])),
                                    daemon=True, name="producer")
        producer.start()

        host = HostProcess(workdir, settings, host_json=HOST_JSON, lease_seconds=lease_seconds)
        fault_thread = SmtpFaults(emulator, random.Random(seed + 2), max(5, count // 100), report.faults) if smtp_faults else None
        try:
            if fault_thread:
                fault_thread.__enter__()
            # Disruptions at fractions of the run: kills spread over the middle, the outage at a third.
            events = [((k + 1) / (kills + 2), "kill") for k in range(kills)]
            if outage_seconds:
                events.append((1 / 3, "outage"))
            events.sort()
            host.start()
            deadline = started + timeout
            expected = sum(r.chunks for r in requests if r.should_send)
            for at, what in events:
                _wait_until(lambda: len(emulator.accepted()) >= at * expected, deadline, host, f"{what} at {at:.0%}")
                if what == "kill":
                    host.kill()
                    report.faults["host SIGKILL"] += 1
                    host.start()
                else:
                    for proxy in proxies:
                        proxy.down()
                    report.faults[f"storage down {outage_seconds:g} s"] += 1
                    time.sleep(outage_seconds)
                    for proxy in proxies:
                        proxy.up()
            producer.join(max(1.0, deadline - time.monotonic()))
            _wait_until(lambda: len(emulator.accepted()) >= expected or _count(conn, names["MAIL_QUEUE"]) == 0,
                        deadline, host, "the backlog")
            # Stop gracefully (in-flight invocations finish); a host that exits when all is done takes over.
            host.terminate()
            host.start(once=True)
            code = host.wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"the local host exited with {code}; see {workdir}")
            # What the host gave up on, the operator replays (python -m tools.poison requeue).
            poisoned = _count(conn, f"{names['MAIL_QUEUE']}-poison")
            if poisoned:
                report.faults["poisoned, replayed"] += poisoned
                with contextlib.redirect_stdout(io.StringIO()):
                    asyncio.run(poison_tool.run(Settings.from_env({**settings, "AzureWebJobsStorage": conn}), "requeue"))
                host.start(once=True)
                host.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if fault_thread:
                fault_thread.__exit__(None, None, None)
            host.stop()

    _audit(report, requests, emulator, conn, names)
    report.counted = _counted(conn, names.get("AGGREGATES_TABLE") or _DEFAULT_AGGREGATES_TABLE,
                              time.time() - (time.monotonic() - started))
    report.seconds = time.monotonic() - started
    return report


def _wait_until(predicate, deadline: float, host: HostProcess, what: str) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        if host.proc is not None and host.proc.poll() is not None:
            raise RuntimeError(f"the local host exited early ({host.proc.returncode}) waiting for {what}")
        time.sleep(0.05)


async def _produce(conn: str, queue_name: str, bodies: list[str], backlog: int = 500, slice_size: int = 250) -> None:
    from azure.storage.queue.aio import QueueClient as AsyncQueueClient

    async with AsyncQueueClient.from_connection_string(conn, queue_name) as queue:
        gate = asyncio.Semaphore(16)

        async def one(body: str) -> None:
            async with gate:
                await queue.send_message(body, time_to_live=-1)

        for start in range(0, len(bodies), slice_size):
            while (await queue.get_queue_properties()).approximate_message_count > backlog:
                await asyncio.sleep(0.5)
            await asyncio.gather(*(one(b) for b in bodies[start:start + slice_size]))


def _subject(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096).split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


def _audit(report: Report, requests: list[Request], emulator: Any, conn: str, names: dict[str, str]) -> None:
    accepted: dict[str, list[str]] = {}
    records = emulator.accepted()
    report.accepted = len(records)
    for record in records:
        accepted.setdefault(_subject(record.path), []).append(record.message_id)
    table = TableClient.from_connection_string(conn, names["LEDGER_TABLE"])
    rows = {row["PartitionKey"]: row for row in table.query_entities("RowKey eq 'request'", select=["PartitionKey", "State"])}
    report.sending_rows = sum(1 for row in rows.values() if row.get("State") == SENDING)
    for request in requests:
        state = rows.get(request.request_id, {}).get("State", "missing")
        got = accepted.get(request.token, [])
        expected = request.expected_message_ids
        report.by_state[state] += 1
        report.repeats += len(got) - len(set(got))
        if set(got) - expected or (got and not request.should_send):
            report.foreign.append(request.token)
        delivered = expected <= set(got)
        if request.should_send and state == "sent" and not delivered:
            report.lost.append(request.token)
        elif state not in FINAL_STATES and not delivered:
            report.lost.append(request.token)
    report.queue_left = _count(conn, names["MAIL_QUEUE"])
    report.poison_left = _count(conn, f"{names['MAIL_QUEUE']}-poison")


def _counted(conn: str, table_name: str, since: float) -> Counter:
    """Requests counted in each final state by the hourly aggregates since `since` (epoch seconds)."""
    from datetime import datetime, timedelta, timezone

    from azure.data.tables.aio import TableClient as AsyncTableClient

    from shared.reporting.aggregates import Aggregates

    async def read() -> Counter:
        async with AsyncTableClient.from_connection_string(conn, table_name) as table:
            start = datetime.fromtimestamp(since, timezone.utc) - timedelta(hours=1)
            buckets = await Aggregates(table).read(start, datetime.now(timezone.utc) + timedelta(hours=1))
        out: Counter = Counter()
        for bucket in buckets:
            for name, n in bucket.counts.items():
                if name.startswith("requests."):
                    out[name[len("requests."):]] += n
        return +out

    return asyncio.run(read())


def _count(conn: str, queue_name: str) -> int:
    try:
        return QueueClient.from_connection_string(conn, queue_name).get_queue_properties().approximate_message_count
    except ResourceNotFoundError:  # the poison queue exists only once something was poisoned
        return 0


# --- CLI -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conservation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILL the local host this many times mid-run")
    parser.add_argument("--table-fault-rate", type=float, default=0.02, help="share of Table requests answered 500/503")
    parser.add_argument("--outage-seconds", type=float, default=3.0, help="storage unreachable this long at a third")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip to the SMTP peer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease-seconds", type=float, default=10.0, help="the local host's message lease")
    args = parser.parse_args(argv)

    from tools.azurite import Azurite
    from tools.hve_emulator import EmulatorConfig, HveEmulator

    suffix = uuid.uuid4().hex[:8]
    names = {"MAIL_QUEUE": f"conservation-{suffix}", "LEDGER_TABLE": f"c{suffix}ledger",
             "RECIPIENT_INDEX_TABLE": f"c{suffix}rcpt", "GOVERNOR_TABLE": f"c{suffix}gov",
             "CLAIM_CHECK_CONTAINER": f"c{suffix}-payloads", "AGGREGATES_TABLE": f"c{suffix}agg"}
    with tempfile.TemporaryDirectory(prefix="conservation-") as tmp, Azurite() as azurite, \
            HveEmulator(EmulatorConfig(accounts=dict(ACCOUNTS), internal_domains=frozenset({DOMAIN}),
                                       state_dir=Path(tmp) / "emulator")) as emulator:
        report = run(args.count, azurite=azurite, emulator=emulator, workdir=Path(tmp), names=names,
                     kills=args.kills, smtp_faults=True, table_fault_rate=args.table_fault_rate,
                     outage_seconds=args.outage_seconds, rtt_ms=args.rtt_ms, seed=args.seed,
                     timeout=max(600.0, args.count * 0.3), lease_seconds=args.lease_seconds)
        for line in report.lines():
            print(line)
        for token in (report.lost + report.foreign)[:20]:
            print(f"  problem: {token}")
    return 0 if report.conserved and not report.over_counted else 1


if __name__ == "__main__":
    raise SystemExit(main())
