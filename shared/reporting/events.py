"""Outcome events: what a request's final state and its delivery changes look like as CloudEvents 1.0.

Pure: the send stage (shared/send/events.py) and the delivery trace (shared/delivery/events.py)
decide when to publish; shared/events.py carries the events to their targets. Schema:
shared/schema/event.v1.json.

- `type`: hve-relay.request.sent | .refused | .dead (the request became final) or
  hve-relay.request.delivery (its delivery counts changed, from message trace);
- `source`: /hve-relay/<EVENTS_SOURCE, else the app's name>; `subject`: the request id;
- `id`: deterministic from (request id, what the event says: its final state, or `delivery-<seq>`,
  the delivery counts' version), so every copy of one event carries the same id: delivery is at
  least once, consumers drop an id they have seen;
- `time`: when it happened (the ledger row's final update; the delivery summary's update), so a
  copy published again is the same event, byte for byte;
- `data`: the request's status view (shared/reporting/request_status.py, GET /api/requests/{id}):
  no recipient address.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.ledger import FINAL_STATES, LedgerEntry, as_stored
from shared.reporting.request_status import request_view

SPEC_VERSION = "1.0"
TYPE_PREFIX = "hve-relay.request."
DELIVERY_TYPE = TYPE_PREFIX + "delivery"
TYPES = tuple(TYPE_PREFIX + s for s in ("sent", "refused", "dead")) + (DELIVERY_TYPE,)
# Event ids are name-based UUIDs (version 5) in this namespace: uuid5(NAMESPACE, "<request id>\n<version>").
NAMESPACE = uuid.UUID("5f0d7a52-3c1e-4b8e-9a55-6d1f0c2b7e41")
# How often one event is tried before it is dropped (logged and counted in hve_relay.events.dropped):
# the queue trigger's maxDequeueCount in host.json (a publish failure leaves the mail request's queue
# message for the host to deliver again; the last delivery drops the event instead of failing, so
# the message is never moved to the poison queue for an event), and as many trace runs for a
# delivery event.
PUBLISH_ATTEMPTS = 5


def event_id(request_id: str, version: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{request_id}\n{version}"))


def _instant(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _event(kind: str, request_id: str, version: str, at: datetime, data: dict[str, Any], source: str) -> dict:
    """(`data` from the entry as the ledger holds it: never HVE's reply text with an address in it.)"""
    return {
        "specversion": SPEC_VERSION,
        "type": kind,
        "source": source,
        "subject": request_id,
        "id": event_id(request_id, version),
        "time": _instant(at),
        "datacontenttype": "application/json",
        "data": data,
    }


def outcome_event(entry: LedgerEntry, source: str) -> dict[str, Any] | None:
    """The event of a final ledger row (None for a row that is not final). Its `data.delivery` is
    empty: delivery changes come as their own events."""
    if entry.state not in FINAL_STATES:
        return None
    return _event(
        TYPE_PREFIX + entry.state,
        entry.request_id,
        entry.state,
        entry.updated,
        request_view(as_stored(entry), None),
        source,
    )


def delivery_event(entry: LedgerEntry, summary: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The event of a delivery summary (shared/delivery/trace.py `summary_view`) at version `seq`:
    the counts then, with the request's ledger row."""
    at = summary.get("updated") or entry.updated
    data = request_view(as_stored(entry), summary)
    return _event(DELIVERY_TYPE, entry.request_id, f"delivery-{summary['seq']}", at, data, source)
