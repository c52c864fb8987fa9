"""8 worker processes share one governor in Azurite: optimistic concurrency alone keeps every
window within its limit, and no capacity is handed out twice. Instances keep to the row they wrote
last (its ETag is current), so they rarely race, and the load still spreads evenly."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from dataclasses import replace

from shared.governor.pacing import Grant, Impossible, PacingConfig, Shape, Wait
from shared.hve.limits import PROFILES, Limits
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


def worker(connection_string: str, table_name: str, seed: int, barrier, step: float = 3.0,
           internal_share: float = 0.0) -> tuple[list, int, int]:
    """One process: its own clients, its own governor object; only the table is shared."""
    async def run() -> tuple[list, int, int]:
        from azure.data.tables.aio import TableClient

        from shared.governor.table import TableGovernor

        rng = random.Random(seed)
        async with TableClient.from_connection_string(connection_string, table_name) as table:
            governor = TableGovernor(table, ACCOUNTS, CONFIG, rng=random.Random(seed))
            barrier.wait()
            grants = []
            for i in range(REQUESTS_PER_WORKER):
                if internal_share and rng.random() < internal_share:
                    shape = Shape(internal=1, external=0)  # no rolling minute: slot blocks
                else:
                    shape = Shape(internal=rng.randint(0, 1), external=1)
                now = START + i * step  # the workers move through several rolling minutes together
                decision = await governor.acquire(shape, now)
                assert not isinstance(decision, Impossible)
                if isinstance(decision, Grant):
                    grants.append((decision.account, decision.at, shape.internal, shape.external, now))
                else:
                    assert isinstance(decision, Wait) and decision.until > now
            return grants, governor.round_trips, len(governor.spares_held())
    return asyncio.run(run())


def test_eight_processes_never_exceed_a_window_or_the_tenant_cap(azurite, storage):
    _eight_processes(azurite, storage, 3.0, 0.0, "gov")


def test_slots_of_a_block_never_exceed_the_rolling_minute_or_the_tenant_cap_across_processes(azurite, storage):
    # Decisions 0.1 s apart, half of them internal mail (no rolling minute): every process books
    # those in blocks and hands out its spares.
    _eight_processes(azurite, storage, 0.1, 0.5, "govblock")


def _eight_processes(azurite, storage, step, internal_share, name):
    async def create():
        from azure.data.tables.aio import TableServiceClient
        async with TableServiceClient.from_connection_string(azurite.connection_string) as service:
            await service.create_table(f"{storage.table_prefix}{name}")
    asyncio.run(create())

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(WORKERS)
    with ctx.Pool(WORKERS) as pool:
        results = pool.starmap(worker, [(azurite.connection_string, f"{storage.table_prefix}{name}", seed, barrier,
                                         step, internal_share) for seed in range(WORKERS)])
    grants = [g for worker_grants, _, _ in results for g in worker_grants]
    round_trips = sum(rt for _, rt, _ in results)
    spares = sum(held for _, _, held in results)
    sent = [(account, at, Shape(internal, external)) for account, at, internal, external, _ in grants]

    check_windows(CONFIG, sent)  # rolling minute per account, daily tenant cap
    # When the messages would go (a spare a moment after its slot goes at once): HVE's own minute.
    check_windows(replace(CONFIG, margin_seconds=0.0),
                  [(account, max(at, now), Shape(i, e)) for account, at, i, e, now in grants])
    recipients = sum(s.recipients for _, _, s in sent)
    # Demand (8 x 25 requests) is far above the cap: the cap is reached, never passed; at most
    # a message's worth of allowance per account can be left stranded (and the spares of blocks
    # the processes still hold: counted, not sent).
    assert 60 - 2 * len(ACCOUNTS) - spares <= recipients <= 60
    # Each external slot of an account's rolling minute went to exactly one request.
    for account in ACCOUNTS:
        times = sorted(at for a, at, shape in sent if a == account and shape.external)
        assert all(times[i + 4] - times[i] >= 61.0 - 1e-6 for i in range(len(times) - 4))
    print(f"grants {len(grants)}, recipients {recipients}, table round trips {round_trips} for {WORKERS * REQUESTS_PER_WORKER} decisions")
    assert round_trips / max(1, WORKERS * REQUESTS_PER_WORKER) < 6


# --- which row an instance writes: the one it wrote last, while the load stays even ---------------

MANY = [f"hve{i:02d}@contoso.com" for i in range(20)]
PREVIEW = PacingConfig(limits=PROFILES["preview-2024"], margin_seconds=1.0)


def _governors(azurite, storage, accounts, seeds):
    """Governors of separate instances on one fresh table, run in this process in a fixed order;
    their snapshot never gets old (the clock stands), so only ETags decide what conflicts."""
    from azure.data.tables.aio import TableClient, TableServiceClient

    from shared.governor.table import TableGovernor

    async def make():
        name = f"{storage.table_prefix}gov{seeds[0]}"
        async with TableServiceClient.from_connection_string(azurite.connection_string) as service:
            await service.create_table(name)
        tables = [TableClient.from_connection_string(azurite.connection_string, name) for _ in seeds]
        return tables, [TableGovernor(t, accounts, PREVIEW, rng=random.Random(s), clock=lambda: 0.0)
                        for t, s in zip(tables, seeds)]
    return make


def test_two_instances_deciding_in_turn_keep_to_their_own_rows_and_rarely_race(azurite, storage):
    async def run():
        tables, (one, two) = await _governors(azurite, storage, MANY, (1, 2))()
        try:
            grants = []
            for i in range(40):
                for governor in (one, two):
                    decision = await governor.acquire(Shape(1, 0), START + i)
                    assert isinstance(decision, Grant)
                    grants.append(decision.account)
            return one, two, grants
        finally:
            for t in tables:
                await t.close()
    one, two, grants = asyncio.run(run())
    # Picking uniformly from its last read, an instance soon picks a row the other wrote since (its
    # ETag fails): about one conflict in three decisions here. Keeping to its own row, hardly any.
    assert one.conflicts + two.conflicts <= 2, (one.conflicts, two.conflicts)
    assert (one.round_trips + two.round_trips) / len(grants) <= 1.3


def test_an_instance_keeping_to_its_row_still_spreads_the_load_evenly(azurite, storage):
    from shared.governor.blocks import BLOCK_MAX
    from shared.governor.table import STICKY_LEAD

    accounts = MANY[:5]

    async def run():
        tables, (governor,) = await _governors(azurite, storage, accounts, (3,))()
        try:
            for i in range(200):
                assert isinstance(await governor.acquire(Shape(1, 0), START + i), Grant)
            return [s.messages_today for s in await governor.states()], len(governor.spares_held())
        finally:
            await tables[0].close()
    counts, spares = asyncio.run(run())
    # Slots booked in blocks and not used yet are counted too (at most a block's worth).
    assert sum(counts) == 200 + spares and spares < BLOCK_MAX
    assert max(counts) - min(counts) <= STICKY_LEAD + BLOCK_MAX, counts


def test_when_another_instance_writes_the_row_kept_to_one_conflict_moves_the_instance_on(azurite, storage):
    async def run():
        tables, (one, two) = await _governors(azurite, storage, MANY, (4, 5))()
        try:
            first = await one.acquire(Shape(1, 0), START)
            assert isinstance(first, Grant)
            await one.acquire(Shape(1, 0), START + 3)
            assert one.conflicts == 0
            await two.acquire(Shape(1, 0, first.account), START + 6)  # a producer asked for that account
            moved = await one.acquire(Shape(1, 0), START + 9)
            assert isinstance(moved, Grant) and moved.account != first.account and one.conflicts == 1
            for i in range(10):
                again = await one.acquire(Shape(1, 0), START + 12 + 3 * i)
                assert isinstance(again, Grant) and again.account == moved.account
            assert one.conflicts == 1
        finally:
            for t in tables:
                await t.close()
    asyncio.run(run())


# --- slot blocks: several slots per write, handed out without a Table call -----------------------

def test_a_process_that_won_the_row_hands_its_next_decisions_slots_from_its_block_without_a_table_call(
        azurite, storage):
    from shared.governor.blocks import BLOCK_MAX

    async def run():
        tables, (governor,) = await _governors(azurite, storage, MANY, (6,))()
        try:
            grants, trips = [], []
            for i in range(12):  # a busy process: a decision every 0.1 s
                grants.append(await governor.acquire(Shape(1, 0), START + i * 0.1))
                trips.append(governor.round_trips)
            return grants, trips, governor.spares_used, len(governor.spares_held())
        finally:
            await tables[0].close()
    grants, trips, used, held = asyncio.run(run())
    assert all(isinstance(g, Grant) for g in grants)
    # A read, then the first write; from then on blocks of up to BLOCK_MAX slots per write.
    writes = trips[-1] - 1
    assert writes <= 1 + -(-(len(grants) - 1) // (BLOCK_MAX - 1)), trips
    assert used == len(grants) - writes
    # Decisions served from a block made no Table call at all.
    assert any(b == a for a, b in zip(trips, trips[1:], strict=False)), trips
    assert held < BLOCK_MAX


def test_a_spare_no_longer_good_is_given_back_in_the_next_write_of_its_row(azurite, storage):
    async def run():
        tables, (governor,) = await _governors(azurite, storage, MANY[:1], (7,))()
        try:
            await governor.acquire(Shape(1, 0), START)
            await governor.acquire(Shape(1, 0), START + 0.1)  # books two: one spare
            [state] = await governor.states()
            assert state.messages_today == 3 and len(governor.spares_held()) == 1
            trips = governor.round_trips
            await governor.acquire(Shape(1, 0), START + 10)  # the spare is too old to hand out
            assert governor.round_trips == trips + 1  # one write, nothing extra to give it back
            [state] = await governor.states()
            return state, governor.spares_held()
        finally:
            await tables[0].close()
    state, held = asyncio.run(run())
    assert state.messages_today == 3 and state.internal_today == 3 and held == []


def test_a_spare_given_back_in_a_write_whose_answer_was_lost_is_not_given_back_twice(azurite, storage):
    from azure.core.exceptions import HttpResponseError

    async def run():
        tables, (governor,) = await _governors(azurite, storage, MANY[:1], (8,))()
        real_update = tables[0].update_entity

        async def applied_then_lost(*args, **kwargs):
            await real_update(*args, **kwargs)
            raise HttpResponseError(message="500: the answer was lost")
        try:
            await governor.acquire(Shape(1, 0), START)
            await governor.acquire(Shape(1, 0), START + 0.1)  # books two: one spare
            tables[0].update_entity = applied_then_lost
            try:
                await governor.acquire(Shape(1, 0), START + 10)  # gives the old spare back, answer lost
                raise AssertionError("the lost answer should surface")
            except HttpResponseError:
                pass
            tables[0].update_entity = real_update
            await governor.acquire(Shape(1, 0), START + 11)
            [state] = await governor.states()
            return state, governor.spares_held()
        finally:
            await tables[0].close()
    state, held = asyncio.run(run())
    # Four messages took a slot (the third's grant was applied though its caller never heard), and
    # the last write booked one more (counted, held by the process); the old spare left once.
    assert state.messages_today == 4 + len(held) and len(held) == 1, (state, held)


# --- no slot now on an account the process has no SMTP session free for --------------------------

def test_a_decision_while_every_free_account_is_busy_waits_in_the_process_and_takes_nothing(azurite, storage):
    """`busy` (no SMTP session free in this process) is asked inside the decision: no slot now goes
    to a busy account, a spare of a busy account is not handed out, and while every account free
    now is busy the answer is a NO_SESSION wait with no Table write."""
    from shared.governor.pacing import NO_SESSION

    async def run():
        tables, (governor,) = await _governors(azurite, storage, MANY[:2], (8,))()
        try:
            busy = {MANY[0]}
            grants = [await governor.acquire(Shape(0, 1), START + i * 0.1, busy=busy.__contains__) for i in range(6)]
            # Internal mail books blocks of slots: the spares of a busy account stay unused.
            blocks = [await governor.acquire(Shape(1, 0), START + 1 + i * 0.1, busy=busy.__contains__)
                      for i in range(6)]
            busy.add(MANY[1])
            trips = governor.round_trips
            waits = [await governor.acquire(shape, START + 2, busy=busy.__contains__)
                     for shape in (Shape(0, 1), Shape(1, 0))]
            return grants, blocks, waits, governor.round_trips - trips, await governor.states()
        finally:
            await tables[0].close()
    grants, blocks, waits, trips, states = asyncio.run(run())
    assert all(isinstance(g, Grant) and g.account == MANY[1] for g in grants + blocks)
    assert all(isinstance(w, Wait) and w.reason == NO_SESSION and w.until == START + 2 for w in waits)
    assert trips == 0
    by_name = {s.account: s for s in states}
    assert by_name[MANY[0]].messages_today == 0


def test_a_decision_is_dated_when_its_turn_comes_not_when_the_caller_began_to_wait(azurite, storage):
    """Decisions in one process take turns; with `clock`, each grant is dated when it is decided.
    (Dated at the `now` the caller read before its turn, a grant on a loaded host was over a
    second old before its session was asked for, and lapsed.)"""
    import time

    async def run():
        tables, (governor,) = await _governors(azurite, storage, MANY[:2], (10,))()
        try:
            t0 = time.monotonic()

            def clock():
                return START + time.monotonic() - t0

            now = clock()
            grants = await asyncio.gather(*(governor.acquire(Shape(0, 1), now, clock=clock) for _ in range(4)))
            return now, grants
        finally:
            await tables[0].close()
    now, grants = asyncio.run(run())
    assert all(isinstance(g, Grant) for g in grants)
    times = [g.at for g in grants]
    # Each one dated after the one before it was written (a Table write takes some milliseconds).
    assert times == sorted(times) and len(set(times)) == 4 and times[0] >= now


def test_a_booking_that_lost_its_race_books_on_another_row_as_near_without_reading_again(azurite, storage):
    """Two instances book a backlog on two full accounts. The one that loses the ETag race on the
    row it keeps to books on the other account from the state it holds (its slot is as near as
    the lost row's was): a lost race costs one write more, not a read and a write more."""
    x, y = MANY[:2]

    async def run():
        tables, (one, two) = await _governors(azurite, storage, [x, y], (11, 12))()
        try:
            for account in (y, x):  # both accounts' minutes full; `one` wrote x last and keeps to it
                for i in range(10):
                    assert (await one.acquire(Shape(0, 1, account), START + i * 0.01)).at == START + i * 0.01
            theirs = await two.acquire(Shape(0, 1, x), START + 1)  # another instance books on x
            trips, conflicts = one.round_trips, one.conflicts
            mine = await one.acquire(Shape(0, 1), START + 1.1)
            return theirs, mine, one.round_trips - trips, one.conflicts - conflicts
        finally:
            for t in tables:
                await t.close()
    theirs, mine, trips, conflicts = asyncio.run(run())
    assert isinstance(theirs, Grant) and theirs.account == x and theirs.at > START + 60
    assert isinstance(mine, Grant) and mine.account == y and mine.at > START + 60
    assert conflicts == 1 and trips == 2  # the lost write on x, the write on y; no read between
