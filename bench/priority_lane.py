"""Priority lane latency: one urgent request behind a bulk backlog, on the priority queue versus the
mail queue, measured in the same run.

    .venv/bin/python -m bench.priority_lane [--bulk 5000] [--tries 20] [--bulk-tries 3]
                                            [--bulk-timeout 600] [--gap 3] [--timeout 60]

Azurite, the HVE emulator in its own process (ga-2026, verified TLS on 127.0.0.1) and one local host
process (`python -m tools.devhost`, the repo's host.json, `send_mail` and `send_mail_priority`).
`--bulk` requests (internal recipients) are on the mail queue before the host starts, and a
producer keeps the backlog at that size while probes are measured. A probe is one request with
its own X- header; its time is from the moment it is on a queue until the emulator has written it
(the bench watches the emulator's message files).

- priority: `--tries` probes on MAIL_QUEUE_PRIORITY, one at a time, each after the priority queue
  has been idle `--gap` seconds (its trigger has then backed off to host.json's
  maxPollingInterval, the worst case of an idle lane);
- bulk: `--bulk-tries` probes on MAIL_QUEUE, at the back of the backlog; a probe not sent within
  `--bulk-timeout` seconds is reported as "> timeout" (and ends the bulk probes); a priority probe
  not sent within `--timeout`, likewise.

Prints p50/p99 (nearest rank) of both, the ratio bulk/priority of the medians, and whether the
priority p99 is within 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from azure.storage.queue import QueueClient
from azure.storage.queue.aio import QueueClient as AsyncQueueClient

from bench.bench_send import ACCOUNTS, EmulatorProcess
from tools.azurite import Azurite
from tools.devhost_process import HostProcess

ROOT = Path(__file__).resolve().parents[1]
TARGET_P99 = 5.0
_NUMBERED = re.compile(r"^(\d+)-")


def bulk_request(i: int) -> str:
    return json.dumps({"id": f"bulk-{i}", "to": [f"user{i % 50}@contoso.com"], "subject": f"Newsletter {i}",
                       "text": f"Hello number {i}\n" * 20, "category": "bulk"})


def probe_request(tag: str) -> str:
    return json.dumps({"id": f"probe-{tag}", "to": ["oncall@contoso.com"], "subject": "Password reset",
                       "text": "Your code is 123456", "category": "urgent", "headers": {"X-Bench-Probe": tag}})


class Arrivals:
    """The probes the emulator has written: each new .eml file is read once its header is complete
    (a file is listed as soon as it is created, before its bytes are written), for X-Bench-Probe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[str] = set()
        self.count = 0
        self.probes: dict[str, float] = {}

    def poll(self) -> None:
        now = time.perf_counter()
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in set(names) - self.seen:
            if not _NUMBERED.match(name):
                continue
            with open(self.directory / name, "rb") as f:
                head = f.read(8192)
            if b"\r\n\r\n" not in head:
                continue  # still being written: read it again on the next poll
            self.seen.add(name)
            self.count += 1
            match = re.search(rb"^X-Bench-Probe: (\S+)", head, re.M)
            if match:
                self.probes[match.group(1).decode()] = now

    def wait_for(self, tag: str, timeout: float, every: float = 0.05) -> float | None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self.poll()
            if tag in self.probes:
                return self.probes[tag]
            time.sleep(every)
        return None


async def _fill(connection: str, queue: str, start: int, count: int) -> None:
    async with AsyncQueueClient.from_connection_string(connection, queue) as client:
        for at in range(0, count, 64):
            await asyncio.gather(*(client.send_message(bulk_request(start + i))
                                   for i in range(at, min(count, at + 64))))


class Backlog:
    """Keeps about `size` requests on the mail queue while probes run (tops it up every 0.5 s)."""

    def __init__(self, connection: str, queue: str, size: int) -> None:
        self.connection, self.queue, self.size = connection, queue, size
        self.next = 0
        self.stop = threading.Event()
        self.client = QueueClient.from_connection_string(connection, queue)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def length(self) -> int:
        return self.client.get_queue_properties().approximate_message_count

    def fill(self, count: int) -> None:
        asyncio.run(_fill(self.connection, self.queue, self.next, count))
        self.next += count

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            missing = self.size - self.length()
            if missing > 0:
                self.fill(missing)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run(bulk: int, tries: int, bulk_tries: int, bulk_timeout: float, gap: float, timeout: float) -> dict:
    host_json = json.loads((ROOT / "host.json").read_text())
    with tempfile.TemporaryDirectory() as tmp, Azurite() as azurite, EmulatorProcess(Path(tmp) / "hve") as emulator:
        values = {
            "AzureWebJobsStorage": azurite.connection_string, "MAIL_QUEUE": "bench-bulk",
            "MAIL_QUEUE_PRIORITY": "bench-priority", "HVE_SMTP_HOST": "127.0.0.1",
            "HVE_SMTP_PORT": str(emulator.port), "HVE_SMTP_CA_FILE": str(emulator.ca_file),
            "HVE_ACCOUNTS": ",".join(ACCOUNTS), "HVE_PASSWORDS": json.dumps(ACCOUNTS),
            "HVE_INTERNAL_DOMAINS": "contoso.com", "HVE_LIMITS_PROFILE": "ga-2026", "RECIPIENT_HASH_KEY": "bench",
        }
        conn = azurite.connection_string
        priority = QueueClient.from_connection_string(conn, values["MAIL_QUEUE_PRIORITY"])
        bulk_queue = QueueClient.from_connection_string(conn, values["MAIL_QUEUE"])
        for client in (priority, bulk_queue):
            client.create_queue()
        backlog = Backlog(conn, values["MAIL_QUEUE"], bulk)
        filled = time.perf_counter()
        backlog.fill(bulk)
        fill_seconds = time.perf_counter() - filled
        arrivals = Arrivals(Path(tmp) / "hve" / "messages")
        host = HostProcess(Path(tmp) / "host", values, host_json=host_json, functions="send_mail,send_mail_priority")
        host.start()
        result: dict = {"fill_seconds": fill_seconds, "host_json": host_json["extensions"]["queues"]}
        try:
            started = time.perf_counter()
            while arrivals.count == 0:
                if time.perf_counter() - started > 120 or host.exited():
                    raise SystemExit(f"the host sent nothing; its log:\n{host.log_file.read_text()[-3000:]}")
                time.sleep(0.05)
                arrivals.poll()
            backlog.thread.start()
            lengths: list[int] = []
            priority_times: list[float] = []
            for k in range(tries):
                time.sleep(gap)  # the priority queue idle: its trigger polls at maxPollingInterval
                lengths.append(backlog.length())
                tag = f"p{k}"
                priority.send_message(probe_request(tag))
                put = time.perf_counter()
                got = arrivals.wait_for(tag, timeout)
                priority_times.append(got - put if got is not None else math.inf)
            arrivals.poll()
            sent_before, bulk_started = arrivals.count, time.perf_counter()
            bulk_times: list[float] = []
            for k in range(bulk_tries):
                lengths.append(backlog.length())
                tag = f"b{k}"
                bulk_queue.send_message(probe_request(tag))
                put = time.perf_counter()
                got = arrivals.wait_for(tag, bulk_timeout, every=0.25)  # minutes, not milliseconds
                bulk_times.append(got - put if got is not None else math.inf)
                if got is None:
                    break  # the next probe would queue behind this one: one "> timeout" says it
            arrivals.poll()
            bulk_seconds = time.perf_counter() - bulk_started
            result.update(priority=priority_times, bulk=bulk_times, lengths=lengths,
                          rate=(arrivals.count - sent_before) / bulk_seconds if bulk_times else None)
        finally:
            backlog.stop.set()
            host.stop()
        return result


def fmt(seconds: float, timeout: float) -> str:
    return f"> {timeout:.0f}" if math.isinf(seconds) else f"{seconds:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.priority_lane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bulk", type=int, default=5000, help="requests kept on the mail queue (default 5000)")
    parser.add_argument("--tries", type=int, default=20, help="priority probes (default 20)")
    parser.add_argument("--bulk-tries", type=int, default=2, help="probes at the back of the mail queue (default 2)")
    parser.add_argument("--bulk-timeout", type=float, default=600.0,
                        help="give up on a bulk probe after this (default 600 s)")
    parser.add_argument("--gap", type=float, default=3.0, help="idle seconds before each priority probe (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a priority probe after this (default 60 s)")
    args = parser.parse_args(argv)

    r = run(args.bulk, args.tries, args.bulk_tries, args.bulk_timeout, args.gap, args.timeout)
    limits = {"priority": args.timeout, "bulk": args.bulk_timeout}
    q = r["host_json"]
    print(f"priority lane: {args.bulk} bulk requests kept queued (ga-2026, internal recipients), one local host "
          f"process, host.json batchSize {q['batchSize']} newBatchThreshold {q['newBatchThreshold']} "
          f"maxPollingInterval {q['maxPollingInterval']}")
    print(f"backlog filled in {r['fill_seconds']:.1f} s; on the mail queue at the probes: "
          f"min {min(r['lengths'])} max {max(r['lengths'])}; priority probes after {args.gap:g} s idle")
    print(f"{'lane':10} {'tries':>5} {'p50 s':>8} {'p99 s':>8} {'max s':>8}")
    rows = {}
    for lane in ("priority", "bulk"):
        times = r[lane]
        if not times:
            continue
        p50, p99 = nearest_rank(times, 0.5), nearest_rank(times, 0.99)
        rows[lane] = (p50, p99)
        t = limits[lane]
        print(f"{lane:10} {len(times):>5} {fmt(p50, t):>8} {fmt(p99, t):>8} {fmt(max(times), t):>8}")
    if r["rate"] is not None:
        print(f"bulk drain while the bulk probes waited: {r['rate']:.0f} requests/s")
    if "bulk" in rows:
        (pp50, _), (bp50, _) = rows["priority"], rows["bulk"]
        if math.isinf(bp50):
            t = args.bulk_timeout
            print(f"ratio bulk/priority p50: > {t / pp50:.1f}x (bulk not sent within {t:.0f} s)")
        else:
            print(f"ratio bulk/priority p50: {bp50 / pp50:.1f}x")
    p99 = rows["priority"][1]
    print(f"target priority p99 <= {TARGET_P99:g} s: {'met' if p99 <= TARGET_P99 else 'NOT met'} "
          f"({fmt(p99, args.timeout)} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
