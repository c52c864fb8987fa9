"""Governor cost under concurrency: Table round trips per decision and decisions per second, with
N worker processes sharing one governor in Azurite (each process its own clients and state).

    .venv/bin/python -m bench.bench_governor [--workers 8] [--decisions 300] [--accounts 20] [--budget 100000]

Three workloads, each decided the way the send stage decides it (shared/send/stage.py):
- `ga-2026`: internal mail under HVE's 2026 limits, nothing counted per day: the plain scheduler
  (`PlainScheduler`), which only reads the rows now and then and writes nothing per message;
- `ga-2026/budget`: the same with a daily tenant budget (`--budget`, HVE_DAILY_RECIPIENT_BUDGET):
  `BudgetedScheduler`, which takes the budget from the tenant row in blocks;
- `preview-2024`: half the mail external (rolling minute, daily and tenant limits bind, bookings
  ahead): the governor's `acquire`, one If-Match write of an account row per decision.

Besides the cost it prints what the concurrency costs in outcomes: contention waits (decisions
that gave up on a contended row and said "come back in 1-2 s") and over-grants. Over-grants are
re-counted here from the raw log of granted slots of every worker, without the pacing code: a
rolling minute per account holding more messages than the limit, or a UTC day holding more
recipients than a daily limit of the account or the tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from typing import Iterable, Sequence

from shared.hve.limits import PROFILES, Limits
from shared.governor.pacing import Grant, PacingConfig, Shape, Wait
from shared.governor.scheduler import Go
from tools.azurite import Azurite

START = 1_799_920_800.0
WINDOW_SECONDS = 60.0
DAY_SECONDS = 86_400

# One granted slot: (account, slot time, internal recipients, external recipients).
Slot = tuple[str, float, int, int]
# The workloads: (name, limits profile, daily budget?).
WORKLOADS = (("ga-2026", "ga-2026", False), ("ga-2026/budget", "ga-2026", True), ("preview-2024", "preview-2024", False))


def pacing_config(profile: str, budget: int | None) -> PacingConfig:
    return PacingConfig(limits=PROFILES[profile], margin_seconds=1.0, daily_recipient_budget=budget)


def window_over_grants(times: Sequence[float], limit: int | None) -> int:
    """Messages beyond `limit` in any rolling minute: for each slot, the slots in the minute that
    starts with it, past the limit (an independent re-count; no pacing code)."""
    if limit is None:
        return 0
    ordered = sorted(times)
    crowded = 0
    end = 0
    for start, t in enumerate(ordered):
        while end < len(ordered) and ordered[end] < t + WINDOW_SECONDS:
            end += 1
        if end - start > limit:
            crowded += 1
    return crowded


def over_grants(slots: Iterable[Slot], limits: Limits) -> int:
    """Windows (rolling minutes per account, UTC days per account and for the tenant) that hold
    more than the limit allows."""
    slots = list(slots)
    count = 0
    by_account: dict[str, list[Slot]] = defaultdict(list)
    for slot in slots:
        by_account[slot[0]].append(slot)
    for account_slots in by_account.values():
        count += window_over_grants([s[1] for s in account_slots], limits.messages_per_minute)
        count += window_over_grants([s[1] for s in account_slots if s[3]], limits.external_messages_per_minute)
        daily_external: dict[int, int] = defaultdict(int)
        daily_all: dict[int, int] = defaultdict(int)
        for _, at, internal, external in account_slots:
            daily_external[int(at // DAY_SECONDS)] += external
            daily_all[int(at // DAY_SECONDS)] += internal + external
        count += sum(1 for n in daily_external.values()
                     if limits.external_recipients_per_day is not None and n > limits.external_recipients_per_day)
        count += sum(1 for n in daily_all.values()
                     if limits.recipients_per_day_per_account is not None and n > limits.recipients_per_day_per_account)
    tenant: dict[int, int] = defaultdict(int)
    for _, at, internal, external in slots:
        tenant[int(at // DAY_SECONDS)] += internal + external
    count += sum(1 for n in tenant.values()
                 if limits.recipients_per_day_per_tenant is not None and n > limits.recipients_per_day_per_tenant)
    return count


def _worker(connection_string: str, table_name: str, accounts: list[str], profile: str, budget: int | None,
            decisions: int, seed: int, barrier) -> tuple[list[Slot], int, int, int, float]:
    async def run() -> tuple[list[Slot], int, int, int, float]:
        from azure.data.tables.aio import TableClient

        from shared.governor.scheduler import BudgetedScheduler, PlainScheduler
        from shared.governor.table import TableGovernor

        config = pacing_config(profile, budget)
        rng = random.Random(seed)
        async with TableClient.from_connection_string(connection_string, table_name) as table:
            governor = TableGovernor(table, accounts, config, rng=random.Random(seed))
            # As the send stage chooses: the plain scheduler when nothing is paced per account.
            scheduler = None
            if config.plain:
                scheduler = (BudgetedScheduler if config.tenant_cap is not None else PlainScheduler)(
                    governor, random.Random(seed))
            await governor.read()  # warm the connection; not counted
            governor.round_trips = 0
            barrier.wait()
            started = time.perf_counter()
            granted: list[Slot] = []
            contention_waits = 0
            for i in range(decisions):
                external = 1 if profile == "preview-2024" and rng.random() < 0.5 else 0
                shape = Shape(1 - external, external)
                now = START + i * 0.01
                if scheduler is not None:
                    go = await scheduler.decide(shape, now)
                    if isinstance(go, Go):
                        granted.append((go.account, go.at, 1, 0))
                    continue
                decision = await governor.acquire(shape, now)
                if isinstance(decision, Grant):
                    # When the message would go: a spare slot handed out a moment after its time
                    # (see shared/governor/blocks.py) goes now, and is counted so.
                    granted.append((decision.account, max(decision.at, now), 1 - external, external))
                elif isinstance(decision, Wait) and decision.reason == "governor contention":
                    contention_waits += 1
            return granted, contention_waits, governor.round_trips, governor.conflicts, time.perf_counter() - started
    return asyncio.run(run())


def measure(connection_string: str, workers: int, decisions: int, accounts: int, profile: str,
            budget: int | None = None) -> dict:
    table = f"benchgov{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        from azure.data.tables.aio import TableServiceClient
        async with TableServiceClient.from_connection_string(connection_string) as service:
            await service.create_table(table)
    asyncio.run(create())
    names = [f"hve{i:02d}@contoso.com" for i in range(accounts)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(workers)
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_worker, [(connection_string, table, names, profile, budget, decisions, seed, barrier)
                                         for seed in range(workers)])
    total = workers * decisions
    wall = max(r[4] for r in results)
    slots = [slot for r in results for slot in r[0]]
    # The tenant's daily cap the governor enforces: HVE's or the budget, whichever is lower.
    limits = replace(PROFILES[profile], recipients_per_day_per_tenant=pacing_config(profile, budget).tenant_cap)
    return {"decisions": total, "grants": len(slots), "contention_waits": sum(r[1] for r in results),
            "round_trips": sum(r[2] for r in results), "conflicts": sum(r[3] for r in results),
            "over_grants": over_grants(slots, limits), "per_second": total / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=300, help="per worker")
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--budget", type=int, default=100_000,
                        help="the daily recipient budget of the ga-2026/budget workload")
    args = parser.parse_args()
    with Azurite() as azurite:
        rows = [(name, measure(azurite.connection_string, args.workers, args.decisions, args.accounts, profile,
                               args.budget if budgeted else None))
                for name, profile, budgeted in WORKLOADS]
    print(f"{args.workers} worker processes x {args.decisions} decisions, {args.accounts} accounts, one governor in Azurite")
    print(f"{'workload':14} {'decisions/s':>12} {'round trips/decision':>21} {'conflicts':>10} {'grants':>7}"
          f" {'contention waits':>17} {'over-grants':>12}")
    for name, r in rows:
        print(f"{name:14} {r['per_second']:12.0f} {r['round_trips'] / r['decisions']:21.2f} {r['conflicts']:10d}"
              f" {r['grants']:7d} {r['contention_waits']:17d} {r['over_grants']:12d}")
    print(f"over-grants: {sum(r['over_grants'] for _, r in rows)}"
          f" (re-counted from {sum(r['grants'] for _, r in rows)} granted slots)")


if __name__ == "__main__":
    main()
