"""Governor cost under concurrency: Table round trips per decision and decisions per second, with
N worker processes sharing one governor in Azurite (each process its own clients and state).

    .venv/bin/python -m bench.bench_governor [--workers 8] [--decisions 300] [--accounts 20]

Two workloads: ga-2026 internal mail (no window binds: pure bookkeeping) and preview-2024 with
external recipients (rolling minute, daily and tenant limits bind, bookings ahead).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
import uuid

from shared.limits import PROFILES
from shared.pacing import Grant, PacingConfig, Shape
from tools.azurite import Azurite

START = 1_799_920_800.0


def _worker(connection_string: str, table_name: str, accounts: list[str], profile: str, decisions: int,
            seed: int, barrier) -> tuple[int, int, int, float]:
    async def run() -> tuple[int, int, int, float]:
        from azure.data.tables.aio import TableClient

        from shared.governor import TableGovernor

        config = PacingConfig(limits=PROFILES[profile], margin_seconds=1.0)
        rng = random.Random(seed)
        async with TableClient.from_connection_string(connection_string, table_name) as table:
            governor = TableGovernor(table, accounts, config, rng=random.Random(seed))
            await governor.read()  # warm the connection; not counted
            governor.round_trips = 0
            barrier.wait()
            started = time.perf_counter()
            grants = 0
            for i in range(decisions):
                external = 1 if profile == "preview-2024" and rng.random() < 0.5 else 0
                decision = await governor.acquire(Shape(1 - external, external), START + i * 0.01)
                grants += isinstance(decision, Grant)
            return grants, governor.round_trips, governor.conflicts, time.perf_counter() - started
    return asyncio.run(run())


def measure(connection_string: str, workers: int, decisions: int, accounts: int, profile: str) -> dict:
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
        results = pool.starmap(_worker, [(connection_string, table, names, profile, decisions, seed, barrier)
                                         for seed in range(workers)])
    total = workers * decisions
    wall = max(r[3] for r in results)
    return {"decisions": total, "grants": sum(r[0] for r in results), "round_trips": sum(r[1] for r in results),
            "conflicts": sum(r[2] for r in results), "per_second": total / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=300, help="per worker")
    parser.add_argument("--accounts", type=int, default=20)
    args = parser.parse_args()
    with Azurite() as azurite:
        rows = [(profile, measure(azurite.connection_string, args.workers, args.decisions, args.accounts, profile))
                for profile in ("ga-2026", "preview-2024")]
    print(f"{args.workers} worker processes x {args.decisions} decisions, {args.accounts} accounts, one governor in Azurite")
    print(f"{'workload':14} {'decisions/s':>12} {'round trips/decision':>21} {'conflicts':>10} {'grants':>7}")
    for profile, r in rows:
        print(f"{profile:14} {r['per_second']:12.0f} {r['round_trips'] / r['decisions']:21.2f} {r['conflicts']:10d} {r['grants']:7d}")


if __name__ == "__main__":
    main()
