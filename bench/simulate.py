"""Simulation of the governor against the HVE emulator on an accelerated (virtual) clock.

    .venv/bin/python -m bench.simulate                       # issue figures: 20 accounts, 10k + 10k
    .venv/bin/python -m bench.simulate --accounts 4 --external 400 --internal 400
    .venv/bin/python -m bench.simulate --budget              # ga-2026 with a daily recipient budget

Real parts: the send stage (`Relay.handle`), the governor and ledger tables in Azurite, pooled
SMTP over verified TLS to the HVE emulator, which judges every message by the same virtual clock.
Simulated: time, and with it the queue's visibility delays. A discrete-event loop plays the
queue: it runs every message that is due, then moves the clock to the next due message, so an
hour of HVE pacing takes as long as the work itself, and the emulator's rolling minute and
daily quotas see exactly the arrival times the relay chose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.sender import Relay
from shared.settings import Settings
from tools.azurite import Azurite
from tools.hve_emulator import EmulatorConfig, HveEmulator

# 2027-01-15 10:00:00 UTC: mid-day, so a run of an hour or two stays in one daily window.
START = 1_799_920_800.0


class VirtualClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


@dataclass(order=True)
class _Due:
    due: float
    seq: int
    body: str = field(compare=False)
    message_id: str = field(compare=False)
    dequeue_count: int = field(compare=False, default=1)


class VirtualQueue:
    """The storage queue's visibility delays on the virtual clock (the relay only ever calls
    send_message; the simulation loop plays the host's receive/delete)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.heap: list[_Due] = []
        self._seq = itertools.count()

    async def send_message(self, content: Any, *, visibility_timeout: int | None = None, time_to_live: int | None = None) -> None:
        self.put(str(content), delay=visibility_timeout or 0)

    def put(self, body: str, delay: float = 0.0) -> None:
        n = next(self._seq)
        heapq.heappush(self.heap, _Due(self.clock() + delay, n, body, f"vq-{n}"))


@dataclass
class SimResult:
    accounts: int
    external: int
    internal: int
    sent: int
    outcomes: dict[str, int]
    throttle_replies: dict[str, int]
    makespan_seconds: float
    theoretical_seconds: float
    invocations: int
    governor_round_trips: int
    wall_seconds: float
    sent_per_day: dict[int, int]

    @property
    def makespan_ratio(self) -> float:
        return self.makespan_seconds / self.theoretical_seconds if self.theoretical_seconds else 1.0


def theoretical_minimum(external: int, accounts: int, per_minute: int | None) -> float:
    """Earliest possible finish for the external messages: each account sends `per_minute` per
    rolling minute, so its k-th batch cannot start before (k-1) minutes."""
    if not external or not per_minute:
        return 0.0
    per_account = math.ceil(external / accounts)
    return (math.ceil(per_account / per_minute) - 1) * 60.0


def _accounts(n: int) -> dict[str, str]:
    return {f"hve{i:02d}@contoso.com": f"pw-{i}" for i in range(n)}


async def _run(connection_string: str, emulator: HveEmulator, accounts: dict[str, str], clock: VirtualClock,
               requests: list[dict], overrides: dict[str, str], concurrency: int) -> tuple[Relay, list, float, dict[int, int]]:
    settings = Settings.from_env({
        "AzureWebJobsStorage": connection_string, "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(emulator.port),
        "HVE_SMTP_CA_FILE": str(emulator.ca_file), "HVE_ACCOUNTS": ",".join(accounts),
        "HVE_PASSWORDS": json.dumps(accounts), "HVE_INTERNAL_DOMAINS": "contoso.com",
        "RECIPIENT_HASH_KEY": "simulation", "HVE_POOL_SIZE": "2", **overrides,
    })
    relay = await Relay.create(settings, clock=clock)
    queue = VirtualQueue(clock)
    relay.queue = queue  # visibility delays on the virtual clock instead of Azurite's wall clock
    for request in requests:
        queue.put(json.dumps(request))
    handled: list = []
    last_sent = clock()
    sent_per_day: dict[int, int] = {}
    limit = asyncio.Semaphore(concurrency)

    async def one(item: _Due) -> None:
        nonlocal last_sent
        async with limit:
            result = await relay.handle(item.body, item.message_id, item.dequeue_count)
        handled.append(result)
        if result.state == "sent":
            last_sent = max(last_sent, clock())
            day = relay.governor.config.day_of(clock())
            sent_per_day[day] = sent_per_day.get(day, 0) + 1

    while queue.heap:
        clock.t = max(clock.t, queue.heap[0].due)
        due = []
        while queue.heap and queue.heap[0].due <= clock.t:
            due.append(heapq.heappop(queue.heap))
        await asyncio.gather(*(one(item) for item in due))
    return relay, handled, last_sent, sent_per_day


def simulate(*, accounts: int = 20, external: int = 10_000, internal: int = 10_000, profile: str = "preview-2024",
             budget: int | None = None, start: float = START, concurrency: int = 32,
             margin_seconds: float = 1.0, azurite: Azurite | None = None) -> SimResult:
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
                 "HVE_LIMITS_PROFILE": profile, "HVE_PACING_MARGIN_SECONDS": str(margin_seconds),
                 "SEND_MAX_AGE_HOURS": "72", "SEND_MAX_ATTEMPTS": "20"}
    if budget is not None:
        overrides["HVE_DAILY_RECIPIENT_BUDGET"] = str(budget)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as state, (contextlib.nullcontext(azurite) if azurite else Azurite()) as az, HveEmulator(EmulatorConfig(
            accounts=account_passwords, internal_domains={"contoso.com"}, profile=profile,
            state_dir=Path(state), clock=clock)) as emulator:
        async def main():
            relay, handled, last_sent, per_day = await _run(az.connection_string, emulator, account_passwords, clock,
                                                            requests, overrides, concurrency)
            round_trips = relay.governor.round_trips
            await relay.close()
            return handled, last_sent, per_day, round_trips
        handled, last_sent, per_day, round_trips = asyncio.run(main())
        replies = emulator.stats()["replies"]
    outcomes: dict[str, int] = {}
    for h in handled:
        outcomes[h.state] = outcomes.get(h.state, 0) + 1
    per_minute = 10 if profile == "preview-2024" else None
    return SimResult(
        accounts=accounts, external=external, internal=internal, sent=outcomes.get("sent", 0), outcomes=outcomes,
        throttle_replies={code: n for code, n in replies.items() if code.startswith("4.")},
        makespan_seconds=last_sent - start,
        theoretical_seconds=theoretical_minimum(external, accounts, per_minute),
        invocations=len(handled), governor_round_trips=round_trips, wall_seconds=time.perf_counter() - wall,
        sent_per_day={day: n for day, n in sorted(per_day.items())},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--external", type=int, default=10_000)
    parser.add_argument("--internal", type=int, default=10_000)
    parser.add_argument("--budget", action="store_true", help="ga-2026 with a daily recipient budget instead")
    args = parser.parse_args()
    if args.budget:
        # 23:00 UTC: the budget runs out before midnight and sending resumes in the next window.
        late = START + 13 * 3600
        result = simulate(accounts=args.accounts, external=0, internal=args.internal, profile="ga-2026",
                          budget=args.internal * 2 // 3, start=late)
        print(f"ga-2026, budget {args.internal * 2 // 3} recipients/day, {args.internal} internal messages from 23:00 UTC")
        print(f"sent per UTC day: {result.sent_per_day}  outcomes: {result.outcomes}")
        print(f"governor Table round trips per message: {result.governor_round_trips / max(1, result.sent):.2f}; "
              f"wall {result.wall_seconds:.1f} s")
        return
    result = simulate(accounts=args.accounts, external=args.external, internal=args.internal)
    print(f"preview-2024, {result.accounts} accounts, {result.external} messages with external recipients + "
          f"{result.internal} internal, virtual clock")
    print(f"sent {result.sent}; outcomes of {result.invocations} invocations: {result.outcomes}")
    print(f"throttling replies from HVE (4.x.x): {result.throttle_replies or 0}")
    print(f"makespan {result.makespan_seconds:.0f} s vs theoretical minimum {result.theoretical_seconds:.0f} s "
          f"-> ratio {result.makespan_ratio:.4f}")
    print(f"governor Table round trips per message: {result.governor_round_trips / max(1, result.sent):.2f}; "
          f"wall {result.wall_seconds:.1f} s")


if __name__ == "__main__":
    main()
