"""Hostile or buggy Graph answers never stop the delivery trace: mail sent through the real send
stage to the HVE emulator, trace rows served by the Graph stand-in over HTTP (some of them wrong on
purpose), the reconciliation's state in Azurite, on a fake clock shared with the stand-in."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.fixtures_graph import graph_standin  # noqa: F401  (fixture)
from tests.test_delivery_trace import Clock, Harness, mail, run, send, settings_for


@pytest.fixture
def clock():
    return Clock()


def _cursor(h: Harness, account: str):
    return run(h._store(lambda s: s.cursor(account)))


def test_a_row_with_a_non_string_message_id_is_counted_and_the_rest_of_the_trace_still_read(
        storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("first", ["ann@contoso.com"]), mail("second", ["bob@contoso.com", "cy@contoso.com"])))
    assert graph_standin.feed_from(emulator) == 2
    senders = {row["senderAddress"] for row in graph_standin.trace_rows()}
    # For every account that sent: one row whose messageId is a number, one whose date is garbage.
    for sender in senders:
        graph_standin.add_trace(sender, ["bad1@contoso.com"], "<x@y>", fields={"messageId": 12345})
        graph_standin.add_trace(sender, ["bad2@contoso.com"], "<x@y>", fields={"receivedDateTime": "2026-13-45T99:00:00Z"})
    h = Harness(settings, graph_standin, clock)
    tally = h.once()
    assert not tally.stopped, tally.stopped
    assert tally.unreadable == {"messageId is not a string": len(senders), "receivedDateTime is not a date-time": len(senders)}
    assert tally.matched == 3
    assert h.summary("first")["delivery"] == {"delivered": 1}
    assert h.summary("second")["delivery"] == {"delivered": 2}
    # Every account's cursor moved past the bad rows: the next run does not read them again and again.
    for sender in senders:
        cursor = _cursor(h, sender)
        assert cursor.finished is not None and cursor.recheck_from is None
    clock.advance(minutes=40)
    again = h.once()   # inside the overlap the rows are read again: bad ones counted again, nothing changes
    assert not again.stopped and again.changed_requests == 0
    clock.advance(hours=2)
    later = h.once()   # past it, the bad rows are not read again (they pin no window)
    assert not later.stopped and later.rows == 0


@pytest.mark.parametrize("retry_after", ["1e11", "1e15", "100000000000000000000"])
def test_an_absurd_retry_after_waits_at_most_the_cap_and_the_trace_then_goes_on(
        storage, emulator, graph_standin, clock, retry_after):
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_RETRY_AFTER_MAX="PT1H")
    run(send(settings, mail("held", ["held@contoso.com"])))
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    graph_standin.fail_next(429, retry_after=retry_after, path="/v1.0/admin/exchange/tracing")
    first = h.once()
    assert first.stopped.startswith("throttled"), first.stopped
    waits = [c.not_before for c in (_cursor(h, a) for a in settings.accounts) if c.not_before is not None]
    assert waits and max(waits) <= clock.now + timedelta(hours=1, seconds=1)
    clock.advance(minutes=30)
    assert h.once().stopped.startswith("throttled")   # the (capped) wait is honoured
    clock.advance(minutes=31)
    last = h.once()
    assert not last.stopped, last.stopped
    assert h.summary("held")["delivery"] == {"delivered": 1}
