"""Delivery events: `hve-relay.request.delivery` when a request's delivery counts change.

At least once, never lost on a crash: the trace commits a request's new counts with their version
(`Seq`) in its summary row, then publishes the event of that version, then marks it published
(`Published` = `Seq`, a merge of that one field), all before the run saves its cursor past the
window. A run that dies in between, or a publish that fails (the run then stops before the cursor
moves: shared/delivery/trace.py), leaves the window to be read again by the next run, which finds the
summary unpublished and publishes the same event (same id: request id and version) again.

Only the latest version is published: counts are a snapshot, so a consumer that missed version 2
while version 3 was published has lost nothing (`seq` may skip). Bounded: after PUBLISH_ATTEMPTS
failed runs (`PublishFailures` in the summary row) a version is dropped (logged, counted in
hve_relay.events.dropped) and marked published, so the trace moves on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared.events import EventsUnavailable, Publisher, publisher
from shared.ledger import Ledger
from shared.reporting.events import PUBLISH_ATTEMPTS, delivery_event
from shared.settings import Settings

log = logging.getLogger("hve_relay.events")


class DeliveryEvents:
    def __init__(self, events: Publisher, ledger: Ledger, table: Any, instruments: Any = None) -> None:
        self.events = events
        self.ledger = ledger
        self.table = table  # the delivery table (summary rows)
        self.instruments = instruments
        self.failures = 0  # publishes that failed since the last `take_failures`

    @classmethod
    def of(
        cls, settings: Settings, storage: Any, ledger: Ledger, table: Any, instruments: Any
    ) -> DeliveryEvents | None:
        events = publisher(settings, storage)
        return cls(events, ledger, table, instruments) if events.enabled else None

    @staticmethod
    def carried(summary: Mapping[str, Any] | None) -> dict[str, int]:
        """What a new summary row keeps of the one it replaces: the version published last."""
        return {"Published": int(summary.get("Published", 0)) if summary else 0}

    async def publish_pending(self, row: Mapping[str, Any]) -> None:
        """The event of the summary row's version, unless it is published already."""
        from shared.delivery.trace import summary_view

        seq, published = int(row.get("Seq", 0)), int(row.get("Published", 0))
        if seq <= published:
            return
        keys = {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"]}
        entry = await self.ledger.get(row.get("RequestId", ""))
        if entry is None:  # purged from the ledger: nothing to say it with
            await self.table.update_entity({**keys, "Published": seq}, mode="merge")
            return
        event = delivery_event(entry, summary_view(row), self.events.source)
        try:
            await self.events.publish([event])
        except EventsUnavailable as exc:
            tries = int(row.get("PublishFailures", 0)) + 1
            if tries >= PUBLISH_ATTEMPTS:
                log.error(
                    "event %s (delivery of request %s) dropped after %d runs: %s",
                    event["id"],
                    entry.request_id,
                    tries,
                    exc,
                )
                if self.instruments is not None:
                    self.instruments.events_dropped.add(1, {"type": event["type"]})
                await self.table.update_entity({**keys, "Published": seq}, mode="merge")
                return
            log.warning(
                "event %s (delivery of request %s) not published (run %d of %d): %s",
                event["id"],
                entry.request_id,
                tries,
                PUBLISH_ATTEMPTS,
                exc,
            )
            self.failures += 1
            await self.table.update_entity({**keys, "PublishFailures": tries}, mode="merge")
            return
        if self.instruments is not None:
            self.instruments.events.add(1, {"type": event["type"]})
        await self.table.update_entity({**keys, "Published": seq, "PublishFailures": 0}, mode="merge")

    def take_failures(self) -> int:
        failures, self.failures = self.failures, 0
        return failures

    async def close(self) -> None:
        await self.events.close()
