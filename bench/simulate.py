"""Simulation of the governor against the HVE emulator, on a virtual clock, with the queue played
the way the real Functions host plays it.

    .venv/bin/python -m bench.simulate                        # the issue table: 2 s and 60 s polling, 1 and 4 instances
    .venv/bin/python -m bench.simulate --polling 60 --instances 4
    .venv/bin/python -m bench.simulate --accounts 4 --external 400 --internal 400
    .venv/bin/python -m bench.simulate --budget               # ga-2026 with a daily recipient budget
    .venv/bin/python -m bench.simulate --scheduler bookings --scheduler next-free   # both, side by side

Real parts: the send stage (`Relay.handle`, one Relay per host instance, as each instance is its
own process), the governor and ledger tables in Azurite, pooled SMTP over verified TLS to the HVE
emulator, which judges every message by the same virtual clock.

Modelled from docs/functions-host-facts.md (the Storage Queues extension's listener):
- each instance polls on its own: 100 ms after a poll that found messages; after k empty polls
  it waits 100 ms + U(0.8, 1.2) x 2^(k-1) x 100 ms, up to `maxPollingInterval`;
- a poll takes up to `batchSize` visible messages, and an instance fetches a new batch only while
  no more than `newBatchThreshold` of its messages are in flight;
- a message becomes visible when its visibility delay (whole seconds) ends, and runs a handler
  time after the poll that took it (the whole handler happens at that moment of virtual time);
- so a message is picked up late by up to one polling interval, as on Azure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import math
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from shared.send.stage import Relay
from shared.settings import Settings
from tools.azurite import Azurite
from tools.hve_emulator import EmulatorConfig, HveEmulator

# 2027-01-15 10:00:00 UTC: mid-day, so a run of an hour or two stays in one daily window.
START = 1_799_920_800.0
FIRST_POLL_SECONDS = 0.1


class VirtualClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


@dataclass
class _Message:
    visible_at: float
    body: str
    message_id: str
    dequeue_count: int = 1


class VirtualQueue:
    """The storage queue on the virtual clock: visibility delays in whole seconds, as the service
    takes them. The relay only ever calls send_message; the host model receives."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, _Message]] = []
        self._seq = itertools.count()

    async def send_message(self, content: Any, *, visibility_timeout: int | None = None, time_to_live: int | None = None) -> None:
        self.put(str(content), delay=int(visibility_timeout or 0))

    async def get_queue_properties(self) -> Any:
        # Like the service's approximate count: visible and invisible messages alike.
        return SimpleNamespace(approximate_message_count=len(self._heap))

    def put(self, body: str, delay: float = 0.0) -> None:
        n = next(self._seq)
        heapq.heappush(self._heap, (self.clock() + delay, n, _Message(self.clock() + delay, body, f"vq-{n}")))

    def receive(self, now: float, count: int) -> list[_Message]:
        got = []
        while self._heap and self._heap[0][0] <= now and len(got) < count:
            got.append(heapq.heappop(self._heap)[2])
        return got

    def __len__(self) -> int:
        return len(self._heap)


@dataclass
class HostModel:
    """host.json `extensions.queues` and the scale the simulation plays."""

    instances: int = 1
    max_polling_interval: float = 2.0
    batch_size: int = 16
    new_batch_threshold: int = 8
    handler_seconds: tuple[float, float] = (0.02, 0.3)
    # The preview's pacing: "bookings" (the governor's acquire, as deployed) or "next-free" (the
    # the next-free experiment, bench/next_free.py), with its jitter.
    scheduler: str = "bookings"
    jitter_seconds: float = 2.0


@dataclass
class _Instance:
    relay: Relay
    empty_polls: int = 0
    inflight: int = 0
    waiting_for_room: bool = False


@dataclass
class SimResult:
    accounts: int
    external: int
    internal: int
    host: HostModel
    sent: int
    outcomes: dict[str, int]
    throttle_replies: dict[str, int]
    makespan_seconds: float
    theoretical_seconds: float
    invocations: int
    governor_round_trips: int
    governor_conflicts: int
    late: int
    late_rebooked: int
    polls: int
    wall_seconds: float
    sent_per_day: dict[int, int] = field(default_factory=dict)
    deferrals: int = 0  # next-free: deferrals to an opening (re-deferrals are in late_rebooked)

    @property
    def makespan_ratio(self) -> float:
        return self.makespan_seconds / self.theoretical_seconds if self.theoretical_seconds else 1.0

    @property
    def target_seconds(self) -> float:
        """The issue's target: 1.05 x the minimum plus one polling interval."""
        return 1.05 * self.theoretical_seconds + self.host.max_polling_interval

    @property
    def rebookings_per_message(self) -> float:
        return self.late_rebooked / max(1, self.sent)

    @property
    def round_trips_per_message(self) -> float:
        return self.governor_round_trips / max(1, self.sent)


def theoretical_minimum(external: int, accounts: int, per_minute: int | None) -> float:
    """Earliest possible finish for the external messages: each account sends `per_minute` per
    rolling minute (HVE's 60 s, no margin), so its k-th batch cannot start before (k-1) minutes."""
    if not external or not per_minute:
        return 0.0
    per_account = math.ceil(external / accounts)
    return (math.ceil(per_account / per_minute) - 1) * 60.0


def _accounts(n: int) -> dict[str, str]:
    return {f"hve{i:02d}@contoso.com": f"pw-{i}" for i in range(n)}


async def _run(connection_string: str, emulator: HveEmulator, accounts: dict[str, str], clock: VirtualClock,
               requests: list[dict], overrides: dict[str, str], host: HostModel, rng: random.Random):
    settings = Settings.from_env({
        "AzureWebJobsStorage": connection_string, "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(emulator.port),
        "HVE_SMTP_CA_FILE": str(emulator.ca_file), "HVE_ACCOUNTS": ",".join(accounts),
        "HVE_PASSWORDS": json.dumps(accounts), "HVE_INTERNAL_DOMAINS": "contoso.com",
        "RECIPIENT_HASH_KEY": "simulation", "HVE_POOL_SIZE": "2", **overrides,
    })
    queue = VirtualQueue(clock)
    instances = []
    for _ in range(host.instances):
        relay = await Relay.create(settings, clock=clock)
        relay.queue = queue  # visibility delays on the virtual clock instead of Azurite's wall clock
        if host.scheduler == "next-free":
            from bench.next_free import install

            install(relay, host.jitter_seconds)
        elif host.scheduler != "bookings":
            raise ValueError(f"unknown scheduler {host.scheduler!r}")
        instances.append(_Instance(relay))
    for request in requests:
        queue.put(json.dumps(request))
    handled: list = []
    last_sent = clock()
    sent_per_day: dict[int, int] = {}
    events: list[tuple[float, int, str, int, Any]] = []
    seq = itertools.count()
    polls = 0
    running: set[asyncio.Task] = set()
    parked = 0  # handlers waiting on the virtual clock (a booked slot a moment away)

    async def virtual_sleep(seconds: float) -> None:
        nonlocal parked
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(events, (clock() + max(0.0, seconds), next(seq), "wake", -1, woken))
        parked += 1
        await woken

    for inst in instances:
        inst.relay.sleep = virtual_sleep
    for i in range(host.instances):  # instances start at slightly different moments
        heapq.heappush(events, (clock() + rng.uniform(0, FIRST_POLL_SECONDS), next(seq), "poll", i, None))

    async def run_one(i: int, message: _Message) -> None:
        nonlocal last_sent
        inst = instances[i]
        try:
            result = await inst.relay.handle(message.body, message.message_id, message.dequeue_count)
        finally:
            inst.inflight -= 1
            if inst.waiting_for_room and inst.inflight <= host.new_batch_threshold:
                inst.waiting_for_room = False
                heapq.heappush(events, (clock.t, next(seq), "poll", i, None))
        handled.append(result)
        if result.state == "sent":
            last_sent = max(last_sent, clock())
            day = inst.relay.governor.config.day_of(clock())
            sent_per_day[day] = sent_per_day.get(day, 0) + 1

    async def settle() -> None:
        """Let the handlers run (real I/O to Azurite and the emulator) until each has finished or
        waits on the virtual clock: only then may virtual time move on."""
        while True:
            busy = {t for t in running if not t.done()}
            running.intersection_update(busy)
            if len(busy) <= parked:
                return
            await asyncio.wait(busy, timeout=0.005, return_when=asyncio.FIRST_COMPLETED)

    while events:
        # Stop once nothing is queued or in flight (only idle polls would remain).
        if not len(queue) and not running and all(e[2] == "poll" for e in events):
            break
        at, _, kind, i, payload = heapq.heappop(events)
        clock.t = max(clock.t, at)
        if kind == "wake":
            parked -= 1
            payload.set_result(None)
        elif kind == "run":
            for m in payload:
                running.add(asyncio.ensure_future(run_one(i, m)))
        else:
            inst = instances[i]
            if inst.inflight > host.new_batch_threshold:
                inst.waiting_for_room = True  # the listener waits for a handler to finish
            else:
                polls += 1
                batch = queue.receive(clock.t, host.batch_size)
                if batch:
                    inst.empty_polls = 0
                    inst.inflight += len(batch)
                    heapq.heappush(events, (clock.t + rng.uniform(*host.handler_seconds), next(seq), "run", i, batch))
                    wait = FIRST_POLL_SECONDS
                else:
                    inst.empty_polls += 1
                    wait = min(host.max_polling_interval,
                               FIRST_POLL_SECONDS + rng.uniform(0.8, 1.2) * 2 ** min(inst.empty_polls - 1, 30) * FIRST_POLL_SECONDS)
                heapq.heappush(events, (clock.t + wait, next(seq), "poll", i, None))
        await settle()
    return [inst.relay for inst in instances], handled, last_sent, sent_per_day, polls


def simulate(*, accounts: int = 20, external: int = 10_000, internal: int = 10_000, profile: str = "preview-2024",
             budget: int | None = None, start: float = START, host: HostModel | None = None,
             margin_seconds: float | None = None, azurite: Azurite | None = None, seed: int = 1,
             settings: dict[str, str] | None = None) -> SimResult:
    host = host or HostModel()
    account_passwords = _accounts(accounts)
    clock = VirtualClock(start)
    requests = []
    for i in range(max(external, internal)):
        if i < external:
            requests.append({"id": f"ext-{i}", "to": [f"customer{i}@fabrikam.example"], "subject": f"Notice {i}", "text": "x"})
        if i < internal:
            requests.append({"id": f"int-{i}", "to": [f"staff{i % 500}@contoso.com"], "subject": f"Memo {i}", "text": "x"})
    run_id = uuid.uuid4().hex[:8]  # own tables, so runs can share one Azurite
    overrides = {"LEDGER_TABLE": f"sim{run_id}ledger", "RECIPIENT_INDEX_TABLE": f"sim{run_id}rcpt",
                 "GOVERNOR_TABLE": f"sim{run_id}gov", "MAIL_QUEUE": f"sim-{run_id}",
                 "HVE_LIMITS_PROFILE": profile, "SEND_MAX_AGE_HOURS": "72", "SEND_MAX_ATTEMPTS": "20"}
    overrides.update(settings or {})
    if margin_seconds is not None:
        overrides["HVE_PACING_MARGIN_SECONDS"] = str(margin_seconds)
    if budget is not None:
        overrides["HVE_DAILY_RECIPIENT_BUDGET"] = str(budget)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as state, (contextlib.nullcontext(azurite) if azurite else Azurite()) as az, HveEmulator(EmulatorConfig(
            accounts=account_passwords, internal_domains={"contoso.com"}, profile=profile,
            state_dir=Path(state), clock=clock)) as emulator:
        async def main():
            relays, handled, last_sent, per_day, polls = await _run(
                az.connection_string, emulator, account_passwords, clock, requests, overrides, host, random.Random(seed))
            figures = (sum(r.governor.round_trips for r in relays), sum(r.governor.conflicts for r in relays),
                       sum(r.stats.late for r in relays), sum(r.stats.late_rebooked for r in relays),
                       sum(getattr(r.slots, "deferrals", 0) for r in relays))
            for relay in relays:
                await relay.close()
            return handled, last_sent, per_day, polls, figures
        handled, last_sent, per_day, polls, (round_trips, conflicts, late, rebooked, deferrals) = asyncio.run(main())
        replies = emulator.stats()["replies"]
    outcomes: dict[str, int] = {}
    for h in handled:
        outcomes[h.state] = outcomes.get(h.state, 0) + 1
    per_minute = 10 if profile == "preview-2024" else None
    return SimResult(
        accounts=accounts, external=external, internal=internal, host=host, sent=outcomes.get("sent", 0),
        outcomes=outcomes, throttle_replies={code: n for code, n in replies.items() if code.startswith("4.")},
        makespan_seconds=last_sent - start, theoretical_seconds=theoretical_minimum(external, accounts, per_minute),
        invocations=len(handled), governor_round_trips=round_trips, governor_conflicts=conflicts, late=late, late_rebooked=rebooked, polls=polls,
        wall_seconds=time.perf_counter() - wall, sent_per_day={day: n for day, n in sorted(per_day.items())},
        deferrals=deferrals,
    )


def table_row(r: SimResult) -> str:
    return (f"| {r.host.scheduler} | {r.host.max_polling_interval:g} s | {r.host.instances} | {r.sent} | "
            f"{sum(r.throttle_replies.values())} | {r.makespan_seconds:.0f} s / {r.theoretical_seconds:.0f} s = "
            f"{r.makespan_ratio:.3f} (target {r.target_seconds:.0f} s) | {r.rebookings_per_message:.4f} | "
            f"{r.round_trips_per_message:.2f} | {r.invocations / max(1, r.sent):.2f} | {r.wall_seconds:.0f} s |")


TABLE_HEADER = ("| pacing | maxPollingInterval | instances | sent | throttling replies | makespan / minimum | "
                "re-bookings (bookings: late; next-free: re-deferrals) per message | governor round trips per message | "
                "handler runs per message | wall |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--external", type=int, default=10_000)
    parser.add_argument("--internal", type=int, default=10_000)
    parser.add_argument("--polling", type=float, action="append", help="maxPollingInterval in seconds (repeatable; default 2 and 60)")
    parser.add_argument("--instances", type=int, action="append", help="host instances (repeatable; default 1 and 4)")
    parser.add_argument("--budget", action="store_true", help="ga-2026 with a daily recipient budget instead")
    parser.add_argument("--scheduler", action="append", choices=["bookings", "next-free"],
                        help="the preview's pacing (repeatable; default bookings): next-free is bench/next_free.py")
    parser.add_argument("--jitter", type=float, default=2.0, help="next-free: seconds of jitter after an opening")
    args = parser.parse_args()
    if args.budget:
        # 23:00 UTC: the budget runs out before midnight and sending resumes in the next window.
        late = START + 13 * 3600
        result = simulate(accounts=args.accounts, external=0, internal=args.internal, profile="ga-2026",
                          budget=args.internal * 2 // 3, start=late)
        print(f"ga-2026, budget {args.internal * 2 // 3} recipients/day, {args.internal} internal messages from 23:00 UTC")
        print(f"sent per UTC day: {result.sent_per_day}  outcomes: {result.outcomes}")
        print(f"governor Table round trips per message: {result.round_trips_per_message:.2f}; wall {result.wall_seconds:.1f} s")
        return
    print(f"preview-2024, {args.accounts} accounts, {args.external} messages with external recipients + "
          f"{args.internal} internal; virtual clock, host model: per-instance polling back-off, batches of 16")
    print(TABLE_HEADER, flush=True)
    for polling in args.polling or [2.0, 60.0]:
        for instances in args.instances or [1, 4]:
            for scheduler in args.scheduler or ["bookings"]:
                result = simulate(accounts=args.accounts, external=args.external, internal=args.internal,
                                  host=HostModel(instances=instances, max_polling_interval=polling,
                                                 scheduler=scheduler, jitter_seconds=args.jitter))
                print(table_row(result), flush=True)


if __name__ == "__main__":
    main()
