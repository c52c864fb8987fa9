"""The send stage's failure branches, against Azurite and the HVE emulator over TLS.

Each test drives one way a request can fail and checks what the docs (docs/operations.md, docs/contract.md) promise for it: the
reason recorded in the ledger, how many attempts it cost, and whether a copy went back on the
queue. Time is the relay's injected clock where the branch depends on age.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from shared.send.stage import Handled, Relay
from tests.relay_harness import drain, enqueue, relay_settings

# Noon UTC on a fixed day: branches that depend on the daily window must not depend on the hour
# the test happens to run at.
NOON = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc).timestamp()


class Clock:
    """The relay's clock: a fixed start that moves with real time, plus jumps the test makes."""

    def __init__(self, start: float = NOON) -> None:
        self._offset = start - time.time()

    def __call__(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


def run(coro):
    return asyncio.run(coro)


def mail(**extra):
    return {"to": ["Ann Example <ann@contoso.com>"], "subject": "Quarterly update", "text": "Hello Ann", **extra}


async def open_relay(storage, emulator, clock=None, **overrides) -> Relay:
    settings = relay_settings(storage, emulator, **overrides)
    return await (Relay.create(settings, clock=clock) if clock else Relay.create(settings))


async def queued(relay: Relay) -> int:
    """Messages on the queue, visible or not (a deferred copy is invisible for a while)."""
    return (await relay.queue.get_queue_properties()).approximate_message_count


# --- refusals: recorded once, never retried ---------------------------------------------------------

@pytest.mark.parametrize("reply", [
    "550 5.6.0 Message content rejected",
    "554 5.7.1 Message rejected as spam by content filtering",
    "552 5.3.4 Message size exceeds fixed maximum message size",
])
def test_a_5xx_from_hve_is_refused_after_one_attempt_and_never_requeued(storage, emulator, reply):
    emulator.fail_next(1, reply, stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="hard-1"))
            results = await drain(relay)
            return results, await relay.ledger.get("hard-1"), await queued(relay)
        finally:
            await relay.close()

    results, entry, left = run(main())
    code = int(reply[:3])
    assert [(r.state, r.code) for r in results] == [("refused", code)]
    assert entry.state == "refused" and entry.attempts == 1 and entry.last_code == code
    assert entry.reason.startswith(f"refused by HVE: {reply}")
    assert left == 0 and emulator.messages() == []


def test_all_recipients_refused_at_rcpt_is_refused_after_one_attempt(storage, emulator):
    emulator.fail_next(2, "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                       stage="RCPT")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="nobody-1", cc=["bob@contoso.com"]))
            results = await drain(relay)
            return results, await relay.ledger.get("nobody-1"), await queued(relay)
        finally:
            await relay.close()

    results, entry, left = run(main())
    assert [(r.state, r.code) for r in results] == [("refused", 550)]
    assert entry.state == "refused" and entry.attempts == 1 and "5.1.10" in entry.reason
    assert left == 0 and emulator.messages() == []
    assert emulator.stats()["faults_pending"]["RCPT"] == 0  # both recipients were offered and refused


def test_a_claim_check_blob_with_another_id_is_refused_and_nothing_is_sent(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            blob = await container.upload_blob("requests/producer-a/cc-1/request.json", json.dumps(mail(id="someone-elses-request")))
            await enqueue(relay, {"id": "cc-1", "claimCheck": {"blobUrl": blob.url}})
            return await drain(relay), await relay.ledger.get("cc-1"), await queued(relay)
        finally:
            await relay.close()

    [handled], entry, left = run(main())
    assert handled.state == "refused" and entry.state == "refused"
    assert entry.reason.startswith("claim-check: the id in the blob differs")
    assert left == 0 and emulator.messages() == [] and emulator.connections_opened == 0


def test_a_missing_or_oversized_blob_is_refused_naming_it_and_nothing_is_sent(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator, HVE_LIMITS='{"message_bytes": 4000}')
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            big = await container.upload_blob("requests/producer-a/big-3/big.bin", b"x" * 5000)
            await enqueue(relay, {"id": "gone-1", "claimCheck": {"blobUrl": f"{container.url}/requests/producer-a/gone-1/request.json"}})
            await enqueue(relay, mail(id="gone-2", attachments=[{"name": "a.pdf", "blobUrl": f"{container.url}/requests/producer-a/gone-2/a.pdf"}]))
            await enqueue(relay, mail(id="big-3", attachments=[{"name": "big.bin", "blobUrl": big.url}]))
            await drain(relay)
            return [await relay.ledger.get(i) for i in ("gone-1", "gone-2", "big-3")], await queued(relay)
        finally:
            await relay.close()

    entries, left = run(main())
    assert [(e.state, e.attempts) for e in entries] == [("refused", 0)] * 3
    assert entries[0].reason == "claim-check: claim check: blob 'requests/producer-a/gone-1/request.json' does not exist"
    assert entries[1].reason == "claim-check: attachment 'a.pdf': blob 'requests/producer-a/gone-2/a.pdf' does not exist"
    # Refused from the blob's size before any download (base64 overhead included).
    assert entries[2].reason == "too-large: the attachments take about 6844 bytes encoded; the message limit is 4000"
    assert left == 0 and emulator.connections_opened == 0


def test_a_request_no_daily_window_can_ever_hold_is_refused_as_over_limit(storage, emulator):
    async def main():
        # A daily budget of 2 recipients: a message to 3 can never be sent, whatever the day.
        relay = await open_relay(storage, emulator, HVE_DAILY_RECIPIENT_BUDGET="2")
        try:
            await enqueue(relay, mail(id="huge-1", cc=["bob@contoso.com", "cy@contoso.com"]))
            return await drain(relay), await relay.ledger.get("huge-1"), await queued(relay)
        finally:
            await relay.close()

    [handled], entry, left = run(main())
    assert handled.state == "refused" and entry.state == "refused" and entry.attempts == 0
    assert entry.reason.startswith("over-limit: 3 exceeds the limit of 2")
    assert left == 0 and emulator.connections_opened == 0


# --- the age limit: dead, not retried forever -------------------------------------------------------

def test_a_request_whose_next_slot_is_past_the_age_limit_is_dead_at_once(storage, emulator):
    clock = Clock()

    async def main():
        # Budget 1 per day: the first request uses it, the second could only go tomorrow, which
        # is past its 1-hour age limit.
        relay = await open_relay(storage, emulator, clock, HVE_DAILY_RECIPIENT_BUDGET="1", SEND_MAX_AGE_HOURS="1")
        try:
            await enqueue(relay, mail(id="today-1"))
            await enqueue(relay, mail(id="tomorrow-1"))
            results = await drain(relay)
            return results, await relay.ledger.get("tomorrow-1"), await queued(relay)
        finally:
            await relay.close()

    results, entry, left = run(main())
    assert sorted(r.state for r in results) == ["dead", "sent"]
    assert entry.state == "dead" and entry.reason.startswith("no send slot before the age limit")
    assert "daily recipient budget" in entry.reason
    assert left == 0 and len(emulator.messages()) == 1


def test_a_deferred_request_delivered_again_after_the_age_limit_is_dead_without_a_send(storage, emulator):
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
    clock = Clock()

    async def main():
        relay = await open_relay(storage, emulator, clock, SEND_MAX_AGE_HOURS="1")
        try:
            await enqueue(relay, mail(id="old-1"))
            [first] = [m async for m in relay.queue.receive_messages(visibility_timeout=60)]
            deferred = await relay.handle(first.content, first.id, first.dequeue_count)
            await relay.queue.delete_message(first)
            clock.advance(3601)  # the copy comes back after the request's age limit
            rest = await drain(relay)
            return deferred, rest, await relay.ledger.get("old-1"), await queued(relay)
        finally:
            await relay.close()

    deferred, rest, entry, left = run(main())
    assert deferred.state == "deferred" and deferred.code == 451
    assert [r.state for r in rest] == ["dead"]
    assert entry.state == "dead" and entry.reason.startswith("gave up after 1.0 hours") and entry.attempts == 1
    assert left == 0 and emulator.messages() == []


# --- the connection itself is refused -------------------------------------------------------------

def test_a_421_greeting_defers_the_request_and_the_next_connection_sends_it(storage, emulator):
    emulator.fail_next(1, "421 4.3.2 Service not available, closing transmission channel", stage="CONNECT")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="greet-1"))
            return await drain(relay), await relay.ledger.get("greet-1")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [(r.state, r.code) for r in results] == [("deferred", 421), ("sent", 250)]
    assert "4.3.2" in results[0].reason
    assert entry.state == "sent" and entry.attempts == 2 and len(emulator.messages()) == 1
    assert emulator.connections_opened == 2


# --- concurrent duplicates --------------------------------------------------------------------------

ROUNDS = 30


def test_two_relays_handling_the_same_request_at_the_same_moment_send_it_once(storage, emulator):
    """Two workers (two Relays, each with its own SMTP pool and storage clients) get copies of one
    request at the same moment, 30 times over. The in-progress claim in the ledger (an ETag'd
    SENDING row) must let exactly one of them send; the other answers busy or duplicate."""
    rng = random.Random(12)

    async def main():
        a = await open_relay(storage, emulator)
        b = await open_relay(storage, emulator)
        outcomes: list[tuple[Handled, Handled]] = []
        try:
            for n in range(ROUNDS):
                body = json.dumps(mail(id=f"race-{n}"))
                # Vary which side starts first and by how little, so the rounds cover different
                # interleavings of read, claim and send.
                lead_a, lead_b = rng.choice([(0.0, 0.0), (0.0, rng.uniform(0, 0.03)), (rng.uniform(0, 0.03), 0.0)])

                async def on(relay: Relay, lead: float, queue_id: str) -> Handled:
                    await asyncio.sleep(lead)
                    return await relay.handle(body, queue_id, 1)

                outcomes.append(tuple(await asyncio.gather(on(a, lead_a, f"qa-{n}"), on(b, lead_b, f"qb-{n}"))))
            entries = [await a.ledger.get(f"race-{n}") for n in range(ROUNDS)]
            return outcomes, entries
        finally:
            await a.close()
            await b.close()

    outcomes, entries = run(main())
    per_id = Counter(m.message_id for m in emulator.accepted())
    sent_ids = {m.message_id for m in emulator.accepted()}
    assert len(sent_ids) == ROUNDS and set(per_id.values()) == {1}, per_id
    for n, pair in enumerate(outcomes):
        states = sorted(h.state for h in pair)
        assert states[1] == "sent" and states[0] in ("busy", "duplicate"), (n, pair)
        assert entries[n].state == "sent" and entries[n].attempts == 1, (n, entries[n])
