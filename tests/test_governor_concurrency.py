"""8 worker processes share one governor in Azurite: optimistic concurrency alone keeps every
window within its limit, and no capacity is handed out twice."""

from __future__ import annotations

import asyncio
import multiprocessing
import random

from shared.hve.limits import Limits
from shared.governor.pacing import Grant, Impossible, PacingConfig, Shape, Wait
from tests.test_pacing import check_windows

ACCOUNTS = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]
START = 1_800_000_000.0
WORKERS = 8
REQUESTS_PER_WORKER = 25
CONFIG = PacingConfig(
    limits=Limits(external_allowed=True, recipients_per_message=50, message_bytes=None,
                  external_messages_per_minute=4, external_recipients_per_day=None,
                  recipients_per_day_per_account=None, messages_per_minute=None,
                  recipients_per_day_per_tenant=60),
    margin_seconds=1.0,
)


def worker(connection_string: str, table_name: str, seed: int, barrier) -> tuple[list, int]:
    """One process: its own clients, its own governor object; only the table is shared."""
    async def run() -> tuple[list, int]:
        from azure.data.tables.aio import TableClient

        from shared.governor.table import TableGovernor

        rng = random.Random(seed)
        async with TableClient.from_connection_string(connection_string, table_name) as table:
            governor = TableGovernor(table, ACCOUNTS, CONFIG, rng=random.Random(seed))
            barrier.wait()
            grants = []
            for i in range(REQUESTS_PER_WORKER):
                shape = Shape(internal=rng.randint(0, 1), external=1)
                now = START + i * 3.0  # the workers move through several rolling minutes together
                decision = await governor.acquire(shape, now)
                assert not isinstance(decision, Impossible)
                if isinstance(decision, Grant):
                    grants.append((decision.account, decision.at, shape.internal, shape.external))
                else:
                    assert isinstance(decision, Wait) and decision.until > now
            return grants, governor.round_trips
    return asyncio.run(run())


def test_eight_processes_never_exceed_a_window_or_the_tenant_cap(azurite, storage):
    async def create():
        from azure.data.tables.aio import TableServiceClient
        async with TableServiceClient.from_connection_string(azurite.connection_string) as service:
            await service.create_table(f"{storage.table_prefix}gov")
    asyncio.run(create())

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(WORKERS)
    with ctx.Pool(WORKERS) as pool:
        results = pool.starmap(worker, [(azurite.connection_string, f"{storage.table_prefix}gov", seed, barrier)
                                        for seed in range(WORKERS)])
    grants = [g for worker_grants, _ in results for g in worker_grants]
    round_trips = sum(rt for _, rt in results)
    sent = [(account, at, Shape(internal, external)) for account, at, internal, external in grants]

    check_windows(CONFIG, sent)  # rolling minute per account, daily tenant cap
    recipients = sum(s.recipients for _, _, s in sent)
    # Demand (8 x 25 requests) is far above the cap: the cap is reached, never passed; at most
    # a message's worth of allowance per account can be left stranded.
    assert 60 - 2 * len(ACCOUNTS) <= recipients <= 60
    # Each external slot of an account's rolling minute went to exactly one request.
    for account in ACCOUNTS:
        times = sorted(at for a, at, _ in sent if a == account)
        assert all(times[i + 4] - times[i] >= 61.0 - 1e-6 for i in range(len(times) - 4))
    print(f"grants {len(grants)}, recipients {recipients}, table round trips {round_trips} for {WORKERS * REQUESTS_PER_WORKER} decisions")
    assert round_trips / max(1, WORKERS * REQUESTS_PER_WORKER) < 6
