"""The shape of the aggregates: counter names, row keys, the row's properties and the buckets the
report reads (pure: no I/O). Written by shared/reporting/aggregates.py, read by
shared/reporting/rollups.py.

Rows are keyed by UTC day (PartitionKey, `20261129`) and `HH-shard-digest` (RowKey; the digest
names the account and category). A closed day's rollup rows (`~digest`) and its marker
(`~~rollup`) sort after every hour row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("hve_relay.aggregates")

DELIVERY_STATUSES = frozenset(
    {"delivered", "failed", "pending", "expanded", "quarantined", "filteredAsSpam", "gettingStatus", "recalled"}
)
OUTCOMES = ("sent", "refused", "dead")
# Where categories past the cap are counted (the writers' per-hour cap, the report's top N).
OTHER_CATEGORY = "other"
HOUR = 3600
# Day rollups: RowKeys that sort after every hour row ("00-" .. "23-"); the marker sorts last.
ROLLUP = "~"
ROLLUP_MARK = "~~rollup"
_CODE = re.compile(r"[^0-9. ]")


def code_label(code: int, enhanced: str = "") -> str:
    """`451 4.7.0`: the basic and enhanced code of a reply, nothing else of its text."""
    return _CODE.sub("", f"{code} {enhanced}".strip())[:16]


_REPLY = re.compile(r"^\s*(\d{3})(?:[\s-]+([245]\.\d{1,3}\.\d{1,3}))?")


def reply_labels(result: Any, recipients: int) -> list[str]:
    """The replies other than 250 of one SMTP transaction (an `hve_smtp.SubmitResult`): each
    recipient refused or deferred at RCPT, and the final reply unless it was one of those. Only
    the codes: reply texts may name addresses."""
    try:
        return _reply_labels(result, recipients)
    except Exception:  # noqa: BLE001 - counting must never fail a send
        log.exception("aggregates: replies not counted")
        return []


def _reply_labels(result: Any, recipients: int) -> list[str]:
    labels = []
    for text in result.refused.values():
        m = _REPLY.match(text)
        if m:
            labels.append(code_label(int(m[1]), m[2] or ""))
    labels += [code_label(v.code, v.enhanced) for v in result.deferred.values() if v.code]
    verdict = result.verdict
    if verdict.code and verdict.code != 250 and len(result.refused) + len(result.deferred) < recipients:
        labels.append(code_label(verdict.code, verdict.enhanced))
    return labels


def hour_of(at: float) -> int:
    return int(at // HOUR) * HOUR


def day_key(at: float) -> str:
    """The PartitionKey of the rows counting time `at`: its UTC day (`20261129`)."""
    return datetime.fromtimestamp(int(at), UTC).strftime("%Y%m%d")


def split_days(start: int, end: int, now: float, rollup_after: float) -> tuple[list[str], list[str]]:
    """The UTC days (partition keys) of the hours [start, end): those that ended more than
    `rollup_after` before `now` (read from their rollups) and the others (read hour by hour)."""
    days = range(start - start % 86400, end, 86400)
    closed = [day_key(d) for d in days if d + 86400 + rollup_after <= now]
    open_ = [day_key(d) for d in days if d + 86400 + rollup_after > now]
    return closed, open_


def row_key(hour: int, shard: int, account: str, category: str) -> str:
    """The RowKey of an hour row: `HH-shard-digest`, sorting before every rollup row."""
    return f"{datetime.fromtimestamp(hour, UTC).hour:02d}-{shard:03d}-{name_digest(account, category)}"


def name_digest(account: str, category: str) -> str:
    # Account and category come from producers: hashed, so any text makes a valid key.
    return hashlib.sha256(f"{account}\x00{category}".encode()).hexdigest()[:20]


def row_fields(
    hour: int, account: str, category: str, counts: Mapping[str, int], last_seen: Mapping[str, float]
) -> dict[str, Any]:
    """The properties of an aggregate row besides its keys and `Writes`. The report reads `Data`
    only: one JSON property per row parses several times faster than five typed ones. Account
    and Category are repeated as plain properties for people browsing the table."""
    data = {"h": hour // HOUR, "a": account, "c": category, "n": dict(counts), "l": dict(last_seen)}
    return {"Account": account, "Category": category, "Data": json.dumps(data, separators=(",", ":"))}


@dataclass
class Bucket:
    """The counts of one (hour, account, category), summed over shards."""

    start: int  # epoch seconds of the hour
    account: str
    category: str
    counts: Counter = field(default_factory=Counter)
    last_seen: dict[str, float] = field(default_factory=dict)  # code -> epoch seconds


def fold_categories(buckets: Iterable[Bucket], keep: int) -> list[Bucket]:
    """The buckets with every category but the `keep` busiest of the window (by requests, then by
    all counts, then by name) counted under `other`; '' (no category) and `other` are always kept.
    Writers cap categories per process and hour; this bounds what several of them add up to."""
    buckets = list(buckets)
    if keep <= 0:
        return buckets
    volume: dict[str, tuple[int, int]] = {}
    for b in buckets:
        if b.category in ("", OTHER_CATEGORY):
            continue
        requests, everything = volume.get(b.category, (0, 0))
        volume[b.category] = (
            requests + sum(n for k, n in b.counts.items() if k.startswith("requests.")),
            everything + sum(abs(n) for n in b.counts.values()),
        )
    if len(volume) <= keep:
        return buckets
    kept = set(sorted(volume, key=lambda c: (-volume[c][0], -volume[c][1], c))[:keep])
    out: dict[tuple[int, str, str], Bucket] = {}
    for b in buckets:
        category = b.category if b.category in kept or b.category in ("", OTHER_CATEGORY) else OTHER_CATEGORY
        key = (b.start, b.account, category)
        into = out.get(key)
        if into is None:
            into = out[key] = Bucket(b.start, b.account, category)
        into.counts.update(b.counts)
        for code, ts in b.last_seen.items():
            into.last_seen[code] = max(into.last_seen.get(code, 0.0), ts)
    return [out[k] for k in sorted(out)]
