"""One request as `GET /api/requests/{id}` and `python -m tools.ledger show --json` present it.

Read from its ledger row and its delivery summary (counts per message-trace status). No recipient
address: the ledger holds none, and its free text (`Reason`) is masked when written. The account is
the relay's own HVE sender, as in `/api/status`. Schema: shared/schema/request-status.v1.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.ledger import FINAL_STATES, LedgerEntry


def _instant(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def request_view(entry: LedgerEntry, delivery: Mapping[str, Any] | None) -> dict[str, Any]:
    """The public view of one request. `delivery`: the delivery table's summary of it (or None,
    not traced yet)."""
    final = entry.state in FINAL_STATES
    return {
        "id": entry.request_id,
        "state": entry.state,
        "reason": entry.reason,
        "attempts": entry.attempts,
        "account": entry.account,
        "last_code": entry.last_code,
        "first_received": _instant(entry.first_received),
        "updated": _instant(entry.updated),
        "final_at": _instant(entry.updated) if final else None,
        "chunks_total": entry.chunks_total,
        "chunks_sent": entry.chunks_sent,
        "suppressed": len(entry.suppressed_recipients),
        "delivery": dict(delivery["delivery"]) if delivery else {},
    }
