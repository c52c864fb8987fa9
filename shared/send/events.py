"""The send stage's last step: the outcome event of a request that is final, before its queue
message is deleted.

At least once, never lost on a crash: the final ledger row is written first (record.py), the
event is published next (here, still inside the invocation), and the host deletes the queue message
only after the function returns. A process that dies between the ledger write and the publish, or a
publish that fails, leaves the queue message to come back; that delivery finds the row final (the
duplicate path of ledger_gate.py) and publishes the same event again, with the same id, before
its message is deleted. Every delivery of a final request's message publishes (duplicates, too):
consumers drop event ids they have seen.

Bounded: a failed publish fails the invocation (the message comes back after the host's
visibility timeout) up to PUBLISH_ATTEMPTS deliveries, the queue trigger's maxDequeueCount. The
delivery that has no retry left drops the event instead (logged, counted in
hve_relay.events.dropped) and returns, so its message is deleted rather than moved to the poison
queue: an unreachable events target delays nothing but its own events, and never sends a mail twice
(the mail is recorded before any of this).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.events import EventsUnavailable, Publisher, publisher
from shared.ledger import FINAL_STATES
from shared.reporting.events import PUBLISH_ATTEMPTS, outcome_event
from shared.send.outcome import Handled

if TYPE_CHECKING:
    from shared.send.stage import Relay

log = logging.getLogger("hve_relay.events")


class EventsNotPublished(Exception):
    """The outcome is recorded, its event is not: the queue message must come back."""


class OutcomeEvents:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._publisher: Publisher | None = None

    @property
    def publisher(self) -> Publisher:
        """The targets, made on first use (a Relay that never publishes opens no credential)."""
        if self._publisher is None:
            self._publisher = publisher(self.relay.settings, self.relay.storage)
        return self._publisher

    async def after(self, handled: Handled, dequeue_count: int) -> None:
        """Publish the event of a final row this delivery recorded or found (a duplicate)."""
        row = handled.row
        if not self.publisher.enabled or row is None or row.state not in FINAL_STATES:
            return
        event = outcome_event(row, self.publisher.source)
        assert event is not None
        try:
            await self.publisher.publish([event])
        except EventsUnavailable as exc:
            counters = self.relay.instruments
            if dequeue_count >= PUBLISH_ATTEMPTS:
                log.error(
                    "event %s (%s of request %s) dropped after %d deliveries: %s",
                    event["id"],
                    event["type"],
                    row.request_id,
                    dequeue_count,
                    exc,
                )
                counters.events_dropped.add(1, {"type": event["type"]})
                return
            log.warning(
                "event %s of request %s not published (delivery %d of %d): %s; the message comes back",
                event["id"],
                row.request_id,
                dequeue_count,
                PUBLISH_ATTEMPTS,
                exc,
            )
            raise EventsNotPublished(f"request {row.request_id}: {exc}") from exc
        self.relay.instruments.events.add(1, {"type": event["type"]})

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
