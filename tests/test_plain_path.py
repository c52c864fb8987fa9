"""The plain path: no per-minute window and nothing counted per day (`ga-2026` without a budget).
Only account health decides which account sends; nothing is written to the governor per message,
the ledger claim is the row's creation, and today's use is read from the aggregates."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone

from azure.core.exceptions import ResourceModifiedError

from shared.governor.pacing import AccountState, PacingConfig, Shape
from shared.governor.table import TableGovernor
from shared.hve.limits import PROFILES
from shared.governor.scheduler import RELEASE_SPREAD_SECONDS, BudgetedScheduler, Go, Later, plain_decision
from shared.send.stage import Relay
from shared.reporting.status import usage_from_aggregates
from tests.relay_harness import ACCOUNTS, drain, enqueue, relay_settings

NOW = 1_796_000_000.0
A, B, C = list(ACCOUNTS)


def test_the_preferred_account_goes_when_it_is_usable_and_otherwise_one_at_random():
    rng = random.Random(7)
    states = [AccountState(a) for a in ACCOUNTS]
    assert plain_decision(states, (), Shape(1, 0, B), NOW, rng) == Go(B, NOW)
    picked = {plain_decision(states, (), Shape(1, 0), NOW, rng).account for _ in range(60)}
    assert picked == set(ACCOUNTS)
    resting = [AccountState(A, cooldown_until=NOW + 60), AccountState(B, unhealthy_until=NOW + 900), AccountState(C)]
    assert {plain_decision(resting, (), Shape(1, 0, A), NOW, rng).account for _ in range(30)} == {C}
    assert {type(plain_decision(resting, {C}, Shape(1, 0), NOW, rng)) for _ in range(5)} == {Later}


def test_requests_released_after_a_cooldown_are_spread_not_crowded_on_one_instant():
    # Two accounts cooling down until +40 s and +45 s: 20 requests come back over the spread after
    # the first one is free again, never before it, never all at once.
    rng = random.Random(3)
    states = [AccountState(A, cooldown_until=NOW + 40), AccountState(B, cooldown_until=NOW + 45)]
    delays = [plain_decision(states, (), Shape(1, 0), NOW, rng).delay for _ in range(20)]
    assert all(40 <= d <= 40 + RELEASE_SPREAD_SECONDS for d in delays)
    assert len({round(d, 3) for d in delays}) == 20
    assert max(delays) - min(delays) > RELEASE_SPREAD_SECONDS / 2
    # Never half of them within the same 5 seconds (the crowd was all 20 at one instant).
    assert max(sum(1 for d in delays if t <= d < t + 5) for t in delays) < 10


class _BudgetGovernor:
    """What `BudgetedScheduler` asks of the governor: every account free, claims answered in turn."""

    def __init__(self, claims):
        self.config = PacingConfig(limits=PROFILES["ga-2026"], daily_recipient_budget=1000)
        self.claims = list(claims)

    async def refresh(self, older_than=0.0):
        pass

    def known_states(self):
        return [AccountState(a) for a in ACCOUNTS]

    def held(self):
        return set()

    async def claim_allowance(self, need, block, now):
        return self.claims.pop(0)


def test_a_budget_claim_that_lost_every_race_defers_briefly_and_is_not_taken_for_a_spent_cap():
    async def run():
        scheduler = BudgetedScheduler(_BudgetGovernor([None, 100]), random.Random(1))
        lost = await scheduler.decide(Shape(1, 0), NOW)
        after = await scheduler.decide(Shape(1, 0), NOW + 2)
        return lost, after
    lost, after = asyncio.run(run())
    assert isinstance(lost, Later) and 1.0 <= lost.delay <= 2.0 and lost.reason == "governor contention"
    assert isinstance(after, Go)


def test_a_spent_budget_defers_to_the_end_of_the_day():
    async def run():
        scheduler = BudgetedScheduler(_BudgetGovernor([0]), random.Random(1))
        return await scheduler.decide(Shape(1, 0), NOW), await scheduler.decide(Shape(1, 0), NOW + 1)
    for spent in asyncio.run(run()):  # the second asks no claim: the cap was found spent today
        day_end = (NOW // 86400 + 1) * 86400
        assert isinstance(spent, Later) and spent.reason == "daily recipient budget spent for today"
        assert day_end - NOW - 1 <= spent.delay <= day_end - NOW + RELEASE_SPREAD_SECONDS


class _Row(dict):
    metadata = {"etag": "W/1"}


class _RacedTenantRow:
    """A table whose tenant row another instance always writes first (every If-Match fails)."""

    def __init__(self, claimed):
        self.claimed = claimed

    async def get_entity(self, partition, row):
        return _Row(PartitionKey=partition, RowKey=row, Day=int(NOW // 86400), Claimed=self.claimed)

    async def submit_transaction(self, operations):
        raise ResourceModifiedError("the row changed")


def test_a_claim_of_the_budget_that_loses_every_race_is_told_apart_from_a_spent_cap():
    config = PacingConfig(limits=PROFILES["ga-2026"], daily_recipient_budget=1000)
    raced = TableGovernor(_RacedTenantRow(claimed=10), ACCOUNTS, config, rng=random.Random(1))
    assert asyncio.run(raced.claim_allowance(1, 100, NOW)) is None
    spent = TableGovernor(_RacedTenantRow(claimed=1000), ACCOUNTS, config, rng=random.Random(1))
    assert asyncio.run(spent.claim_allowance(1, 100, NOW)) == 0


def _governor_rows(relay: Relay):
    async def rows():
        return {r["RowKey"]: r.metadata["etag"] async for r in relay.governor._table.query_entities(
            "PartitionKey eq 'governor'")}
    return rows()


def test_the_plain_path_writes_nothing_to_the_governor_per_message_and_claims_by_creating_the_row(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            assert relay.scheduler is not None
            before = await _governor_rows(relay)
            for i in range(20):
                await enqueue(relay, {"id": f"plain-{i}", "to": [f"u{i}@contoso.com"], "subject": "Hi", "text": "Hello"})
            handled = await drain(relay)
            after = await _governor_rows(relay)
            rows = [await relay.ledger.get(f"plain-{i}") for i in range(20)]
            return handled, before, after, rows
        finally:
            await relay.close()

    handled, before, after, rows = asyncio.run(main())
    assert sorted(h.state for h in handled) == ["sent"] * 20
    assert before == after          # not one governor row created or changed
    assert all(r.state == "sent" and r.attempts == 1 for r in rows)
    assert {h.account for h in handled} == set(ACCOUNTS)   # spread over the accounts
    assert len(emulator.accepted()) == 20


def test_a_throttled_account_rests_and_the_others_take_the_mail(storage, emulator):
    emulator.fail_next(1, f"450 4.5.104 Message rejected. Excessive message rate from sender {A}", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await enqueue(relay, {"id": "first", "to": ["x@contoso.com"], "subject": "Hi", "text": "Hello", "account": A})
            first = await drain(relay, timeout=60)
            for i in range(10):
                await enqueue(relay, {"id": f"next-{i}", "to": ["y@contoso.com"], "subject": "Hi", "text": "Hello",
                                      "account": A})
            rest = await drain(relay, timeout=60)
            states, _ = await relay.governor.read()
            return first, rest, {s.account: s for s in states}
        finally:
            await relay.close()

    first, rest, states = asyncio.run(main())
    assert [h.state for h in first] == ["deferred", "sent"] and first[-1].account != A
    assert states[A].cooldown_until > 0 and "4.5.104" in states[A].last_problem
    # While A rests, its requests go on the others (the preferred account is only a preference).
    assert all(h.state == "sent" and h.account != A for h in rest)


def test_todays_use_comes_from_the_aggregates_when_the_governor_counts_nothing(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0"))
        try:
            for i in range(6):
                await enqueue(relay, {"id": f"use-{i}", "to": [f"a{i}@contoso.com", f"b{i}@contoso.com"],
                                      "subject": "Hi", "text": "Hello", "account": B})
            handled = await drain(relay)
            await relay.aggregates.flush()
            states, _ = await relay.governor.read()
            now = datetime.now(timezone.utc).timestamp()
            used = await usage_from_aggregates(states, relay.aggregates, relay.governor.config, now)
            return handled, {s.account: s for s in used}
        finally:
            await relay.close()

    handled, used = asyncio.run(main())
    assert [h.account for h in handled] == [B] * 6
    assert (used[B].messages_today, used[B].internal_today, used[B].external_today) == (6, 12, 0)
    assert used[A].messages_today == 0 and used[C].messages_today == 0


def test_the_paced_path_is_used_whenever_something_is_windowed_or_counted_per_account(storage, emulator):
    async def scheduler(**env):
        relay = await Relay.create(relay_settings(storage, emulator, **env))
        try:
            return relay.scheduler
        finally:
            await relay.close()

    assert asyncio.run(scheduler()) is not None
    assert isinstance(asyncio.run(scheduler(HVE_DAILY_RECIPIENT_BUDGET="1000")), BudgetedScheduler)
    assert asyncio.run(scheduler(HVE_LIMITS_PROFILE="preview-2024")) is None
    assert asyncio.run(scheduler(HVE_LIMITS='{"messages_per_minute": 30}')) is None


async def _two_workers(a, b):
    async def worker(relay):
        handled = []
        for _ in range(40):
            got = False
            async for msg in relay.queue.receive_messages(messages_per_page=8, visibility_timeout=60):
                got = True
                handled.append(await relay.handle(msg.content, msg.id, msg.dequeue_count))
                await relay.queue.delete_message(msg)
            if not got:
                break
        return handled

    first, second = await asyncio.gather(worker(a), worker(b))
    return first + second


def _budget_run(storage, emulator, budget: str, n: int):
    """Two relays (two processes) share a daily budget; `n` one-recipient requests."""
    async def main():
        env = dict(HVE_DAILY_RECIPIENT_BUDGET=budget, AGGREGATES_FLUSH_SECONDS="0")
        a = await Relay.create(relay_settings(storage, emulator, **env))
        b = await Relay.create(relay_settings(storage, emulator, **env))
        try:
            for i in range(n):
                await enqueue(a, {"id": f"b-{i}", "to": [f"u{i}@contoso.com"], "subject": "Hi", "text": "Hello"})
            claims = {"n": 0}
            for relay in (a, b):
                claim = relay.governor.claim_allowance

                async def counted(*args, _claim=claim, **kwargs):
                    claims["n"] += 1
                    return await _claim(*args, **kwargs)

                relay.governor.claim_allowance = counted
            handled = await _two_workers(a, b)
            _, tenant = await a.governor.read()
            return handled, tenant, claims["n"]
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


def test_a_daily_budget_is_taken_from_the_tenant_row_in_blocks_not_per_message(storage, emulator):
    handled, tenant, claims = _budget_run(storage, emulator, "100000", 60)
    assert sorted(h.state for h in handled) == ["sent"] * 60
    assert claims <= 2 and tenant.claimed <= 200     # a block of 100 per process at most


def test_a_daily_budget_shared_by_two_processes_is_never_exceeded(storage, emulator):
    handled, tenant, claims = _budget_run(storage, emulator, "30", 50)
    sent = [h for h in handled if h.state == "sent"]
    waiting = [h for h in handled if h.state == "deferred"]
    assert len(sent) == len(emulator.accepted()) <= 30 and tenant.claimed <= 30
    assert len(sent) >= 28            # near the cap the blocks shrink: little is stranded
    assert len(sent) + len(waiting) == 50 and all("budget" in h.reason for h in waiting)
    # Once a process finds the day's cap spent it stops asking the tenant row.
    assert claims <= 30 + 2


def test_the_status_cli_shows_todays_use_from_the_aggregates_on_the_plain_path(storage, emulator):
    from tools import status as status_cli

    settings = relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0")

    async def send():
        relay = await Relay.create(settings)
        try:
            for i in range(3):
                await enqueue(relay, {"id": f"cli-{i}", "to": [f"c{i}@contoso.com"], "subject": "Hi", "text": "Hello",
                                      "account": C})
            await drain(relay)
            await relay.aggregates.flush()
        finally:
            await relay.close()

    asyncio.run(send())
    report = asyncio.run(status_cli.report(settings))
    used = {a["account"]: a["used_today"] for a in report["accounts"]}
    assert used[C] == {"messages": 3, "internal_recipients": 3, "external_recipients": 0}
    assert report["tenant"]["recipients_today"] == 3
