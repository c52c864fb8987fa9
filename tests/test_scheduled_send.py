"""Scheduled send (`sendAt`): parsing and the 7-day bound as pure code, then the send stage against
Azurite and the HVE emulator over TLS, with the relay's injected clock: an early request goes back on
the queue hidden for the time left (no send, no attempt, no governor slot), is sent once due, and its
age limit counts from its sendAt."""

from __future__ import annotations

import asyncio
import math
import json
import time
from datetime import UTC, datetime, timedelta, timezone

import jsonschema
import pytest

from shared.send.contract import RequestRefused, ValidationPolicy, check_send_at, validate_request
from shared.send.retry import MAX_VISIBILITY_SECONDS
from shared.send.send_at import MAX_SEND_AHEAD_SECONDS, hold_seconds
from shared.send.stage import Handled, Relay
from tests.relay_harness import enqueue, relay_settings
from tests.test_contract import SCHEMA

# Noon UTC on a fixed day: nothing here may depend on the hour the test runs at.
NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
DAY = 24 * 3600.0

POLICY = ValidationPolicy(
    accounts=frozenset({"news@contoso.com"}), internal_domains=frozenset({"contoso.com"}),
    external_allowed=False, max_recipients=50,
)


def good(**extra):
    return {"to": ["ann@contoso.com"], "subject": "Hello", "text": "Hi Ann", **extra}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# --- parsing and bounds (pure) --------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "2026-03-10T12:00:00Z",
    "2026-03-10t12:00:00z",
    "2026-03-10T13:00:00+01:00",
    "2026-03-10T07:30:00-04:30",
    "2026-03-10T12:00:00.000000000Z",
    "2026-03-10T12:00:00+00:00",
])
def test_send_at_is_read_as_iso_8601_with_an_offset_or_z(text):
    assert validate_request(good(sendAt=text), POLICY).send_at == NOON
    jsonschema.validate(good(sendAt=text), SCHEMA)


def test_send_at_keeps_fractions_of_a_second_and_none_means_now():
    assert validate_request(good(sendAt="2026-03-10T12:00:00.25Z"), POLICY).send_at == NOON + 0.25
    assert validate_request(good(), POLICY).send_at is None
    assert validate_request(good(sendAt=None), POLICY).send_at is None


# The schema's pattern catches the shape; the validator also checks the calendar and the clock.
SHAPE = ["2026-03-10T12:00:00", "2026-03-10", "2026-03-10T12:00Z", "2026-03-10 12:00:00Z", "2026-03-10T12:00:00+0100",
         "２０２６-03-10T12:00:00Z", "tomorrow", "", 1773144000, ["2026-03-10T12:00:00Z"]]
CALENDAR = ["2026-02-30T12:00:00Z", "2026-03-10T24:00:00Z", "2026-03-10T12:00:60Z", "2026-03-10T12:00:00+24:00",
            "2026-03-10T12:00:00Z\n"]


@pytest.mark.parametrize("value", SHAPE + CALENDAR)
def test_a_malformed_send_at_is_refused_with_a_reason_that_says_what_it_must_be(value):
    with pytest.raises(RequestRefused) as info:
        validate_request(good(sendAt=value), POLICY)
    assert info.value.reason == "bad-send-at"
    assert "ISO 8601" in info.value.detail and "offset" in info.value.detail
    if value in SHAPE:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(good(sendAt=value), SCHEMA)


def test_send_at_up_to_7_days_ahead_is_accepted_and_further_is_refused():
    at_bound = validate_request(good(sendAt=iso(NOON + 7 * DAY)), POLICY)
    check_send_at(at_bound, NOON)
    check_send_at(validate_request(good(sendAt=iso(NOON - 365 * DAY)), POLICY), NOON)  # past: now
    with pytest.raises(RequestRefused) as info:
        check_send_at(validate_request(good(sendAt=iso(NOON + 7 * DAY + 1)), POLICY), NOON)
    assert info.value.reason == "send-at-too-far"
    assert "168.0 hours ahead" in info.value.detail and "at most 7 days" in info.value.detail


def test_an_early_request_is_held_for_the_time_left_at_most_the_queues_maximum():
    assert hold_seconds(None, NOON) == 0
    assert hold_seconds(NOON - 5, NOON) == 0 and hold_seconds(NOON, NOON) == 0
    assert hold_seconds(NOON + 3600.5, NOON) == 3600.5
    assert hold_seconds(NOON + MAX_SEND_AHEAD_SECONDS, NOON) == MAX_VISIBILITY_SECONDS


# --- the send stage against Azurite and the HVE emulator ------------------------------------------

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


async def open_relay(storage, emulator, clock, **overrides) -> Relay:
    return await Relay.create(relay_settings(storage, emulator, **overrides), clock=clock)


async def receive_one(relay: Relay) -> Handled:
    """Take the one visible message off the queue and handle it, as the host does."""
    [msg] = [m async for m in relay.queue.receive_messages(messages_per_page=1, visibility_timeout=60)]
    handled = await relay.handle(msg.content, msg.id, msg.dequeue_count)
    await relay.queue.delete_message(msg)
    return handled


async def on_queue(relay: Relay) -> tuple[int, int]:
    """(messages on the queue, of which visible now)."""
    total = (await relay.queue.get_queue_properties()).approximate_message_count
    visible = len(await relay.queue.peek_messages(max_messages=32))
    return total, visible


def copy_of(doc: dict) -> str:
    """The body of the copy the relay put back (its id and attempts added): a test cannot wait days
    for Azurite to show it, so it hands the stage the same body when the clock says it is back."""
    return json.dumps({**doc, "attempt": 0})


async def governor_rows(relay: Relay) -> list[tuple[str, str, str]]:
    table = await relay.storage.table(relay.settings.governor_table)
    return sorted([(r["PartitionKey"], r["RowKey"], r.metadata["etag"]) async for r in table.list_entities()])


@pytest.mark.parametrize("profile", ["ga-2026", "preview-2024"])
def test_an_early_request_is_not_sent_and_goes_back_hidden_for_the_time_left(storage, emulator, profile):
    clock = Clock()
    doc = good(id=f"later-{profile}", sendAt="2026-03-10T13:00:00Z")

    async def main():
        relay = await open_relay(storage, emulator, clock, HVE_LIMITS_PROFILE=profile)
        try:
            await enqueue(relay, good(id=f"now-{profile}"))
            assert (await receive_one(relay)).state == "sent"  # the governor has its rows now
            before = await governor_rows(relay)
            await enqueue(relay, doc)
            handled = await receive_one(relay)
            return handled, await relay.ledger.get(doc["id"]), await on_queue(relay), before, await governor_rows(relay)
        finally:
            await relay.close()

    handled, entry, (total, visible), before, after = run(main())
    passed = clock() - NOON  # the clock moves with real time: the hold came this late at most
    assert (handled.state, handled.reason, handled.account) == ("deferred", "scheduled", "")
    # The time left, whole seconds rounded up, no jitter (never more than the hour).
    assert math.ceil(3600 - passed) <= handled.delay_seconds <= 3600
    assert (total, visible) == (1, 0)     # the copy is on the queue, hidden
    assert len(emulator.messages()) == 1  # the request sent first, not this one
    assert entry.state == "deferred" and entry.attempts == 0 and entry.account == ""
    assert entry.reason == "scheduled: not before 2026-03-10T13:00:00Z" and entry.send_at == NOON + 3600
    assert after == before                # no slot booked or counted: the governor's rows untouched


def test_a_scheduled_request_comes_back_when_due_and_is_sent(storage, emulator):
    clock = Clock()
    doc = good(id="soon-1")

    async def main():
        relay = await open_relay(storage, emulator, clock)
        try:
            doc["sendAt"] = iso(clock() + 2.5)
            await enqueue(relay, doc)
            held = await receive_one(relay)
            held_at = time.monotonic()
            hidden = await on_queue(relay)
            deadline = held_at + 30
            while time.monotonic() < deadline:
                if (await on_queue(relay))[1]:
                    break
                await asyncio.sleep(0.1)
            back_after = time.monotonic() - held_at
            sent = await receive_one(relay)
            return held, hidden, back_after, sent, await relay.ledger.get("soon-1"), await on_queue(relay)
        finally:
            await relay.close()

    held, hidden, back_after, sent, entry, left = run(main())
    assert held.state == "deferred" and held.reason == "scheduled" and held.delay_seconds in (2, 3)
    assert hidden == (1, 0)
    assert back_after >= held.delay_seconds - 1.0  # Azurite keeps it hidden for its visibility delay
    assert sent.state == "sent" and entry.state == "sent" and entry.attempts == 1
    assert len(emulator.messages()) == 1 and left == (0, 0)


def test_a_request_held_the_queues_7_days_comes_back_early_and_is_held_for_the_rest(storage, emulator):
    clock = Clock()
    doc = good(id="week-1", sendAt=iso(NOON + 7 * DAY))

    async def main():
        relay = await open_relay(storage, emulator, clock)
        try:
            await enqueue(relay, doc)
            first = await receive_one(relay)  # Azurite takes the queue's longest visibility
            clock.advance(first.delay_seconds)
            again = await relay.handle(copy_of(doc), "copy-1", 1)
            clock.advance(again.delay_seconds)
            sent = await relay.handle(copy_of(doc), "copy-2", 1)
            return first, again, sent, await relay.ledger.get("week-1")
        finally:
            await relay.close()

    first, again, sent, entry = run(main())
    assert (first.state, first.delay_seconds) == ("deferred", MAX_VISIBILITY_SECONDS)
    assert (again.state, again.reason) == ("deferred", "scheduled") and again.delay_seconds in (59, 60)
    assert sent.state == "sent" and entry.attempts == 1 and len(emulator.messages()) == 1


def test_a_send_at_more_than_7_days_ahead_is_refused_and_not_held(storage, emulator):
    clock = Clock()
    doc = good(id="too-far-1", sendAt=iso(NOON + 7 * DAY + 60))

    async def main():
        relay = await open_relay(storage, emulator, clock)
        try:
            await enqueue(relay, doc)
            return await receive_one(relay), await relay.ledger.get("too-far-1"), await on_queue(relay)
        finally:
            await relay.close()

    handled, entry, left = run(main())
    assert handled.state == "refused" and entry.reason.startswith("send-at-too-far: sendAt is 168.0 hours ahead")
    assert left == (0, 0) and emulator.messages() == []


def test_a_send_at_in_the_past_within_the_age_limit_is_sent_at_once(storage, emulator):
    clock = Clock()
    doc = good(id="past-1", sendAt=iso(NOON - 50 * 60))

    async def main():
        relay = await open_relay(storage, emulator, clock, SEND_MAX_AGE_HOURS="1")
        try:
            await enqueue(relay, doc)
            return await receive_one(relay), await on_queue(relay)
        finally:
            await relay.close()

    handled, left = run(main())
    assert handled.state == "sent" and left == (0, 0) and len(emulator.messages()) == 1


def test_a_send_at_older_than_the_age_limit_is_dead_without_a_send(storage, emulator):
    clock = Clock()
    doc = good(id="stale-1", sendAt=iso(NOON - 2 * 3600))

    async def main():
        relay = await open_relay(storage, emulator, clock, SEND_MAX_AGE_HOURS="1")
        try:
            await enqueue(relay, doc)
            return await receive_one(relay), await relay.ledger.get("stale-1"), await on_queue(relay)
        finally:
            await relay.close()

    handled, entry, left = run(main())
    assert handled.state == "dead" and entry.reason.startswith("gave up after 2.0 hours") and entry.attempts == 0
    assert left == (0, 0) and emulator.messages() == [] and emulator.connections_opened == 0


def test_the_age_limit_counts_from_send_at_not_from_the_first_receipt(storage, emulator):
    """Held 2 hours, then a 451: 30 minutes after its sendAt (2.5 hours after the relay first saw it)
    the request is within its 1-hour age limit and is sent; a second one 61 minutes after its
    sendAt is dead."""
    clock = Clock()
    late = good(id="due-later-1", sendAt=iso(NOON + 2 * 3600))
    later = good(id="due-later-2", sendAt=iso(NOON + 2 * 3600))

    async def main():
        relay = await open_relay(storage, emulator, clock, SEND_MAX_AGE_HOURS="1")
        try:
            held = [await relay.handle(json.dumps(d), f"q-{d['id']}", 1) for d in (late, later)]
            clock.advance(2 * 3600)
            emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
            deferred = await relay.handle(copy_of(late), "copy-1", 1)
            clock.advance(30 * 60)
            sent = await relay.handle(copy_of(late), "copy-2", 1)
            clock.advance(31 * 60)
            dead = await relay.handle(copy_of(later), "copy-3", 1)
            return held, deferred, sent, dead, await relay.ledger.get("due-later-1"), await relay.ledger.get("due-later-2")
        finally:
            await relay.close()

    held, deferred, sent, dead, first, second = run(main())
    assert [h.reason for h in held] == ["scheduled", "scheduled"]
    assert deferred.state == "deferred" and deferred.code == 451
    assert sent.state == "sent" and first.state == "sent" and first.attempts == 2
    assert dead.state == "dead" and second.reason.startswith("gave up after 1.0 hours") and second.attempts == 0
    assert len(emulator.messages()) == 1


def test_a_time_of_day_in_another_offset_is_the_same_moment():
    plus_two = datetime(2026, 3, 10, 14, 0, tzinfo=timezone(timedelta(hours=2))).isoformat()
    assert validate_request(good(sendAt=plus_two), POLICY).send_at == NOON


def test_tools_enqueue_writes_send_at_and_reply_to_into_the_request():
    import argparse

    from tools.enqueue import _requests_from_args

    args = argparse.Namespace(file=None, to=["ann@contoso.com"], cc=None, bcc=None, subject="Hi", text="Hello",
                              html=None, category=None, id="cli-1", reply_to=["help@contoso.com"],
                              send_at="2026-03-10T13:00:00Z", repeat=1)
    [request] = _requests_from_args(args)
    assert request["sendAt"] == "2026-03-10T13:00:00Z" and request["replyTo"] == ["help@contoso.com"]
    assert validate_request(request, POLICY).send_at == NOON + 3600
