"""`GET /api/report`: the aggregates of a time window, the governor's live view of the accounts,
the queues and the budget, as one JSON document (schema: shared/schema/report.v1.json).

Reading cost does not grow with the ledger: one query per UTC day of the window on the aggregates
table, one read of the governor, two queue properties and two peeks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.reporting import latency as lat
from shared.reporting.aggregates import Aggregates
from shared.reporting.rows import OUTCOMES, Bucket, fold_categories

SCHEMA = "hve-relay.report.v1"
BUCKETS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
DEFAULT_SPAN = timedelta(hours=24)


class ReportRequestError(ValueError):
    """A bad query string: the message says which parameter and why (answered with 400)."""


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime
    bucket: str


def _iso(at: datetime | float | None) -> str | None:
    if at is None:
        return None
    if not isinstance(at, datetime):
        at = datetime.fromtimestamp(at, UTC)
    return at.astimezone(UTC).isoformat(timespec="seconds")


# Times the window may name: a few days inside datetime's range, so rounding out to whole days and
# converting from any UTC offset cannot overflow.
_EARLIEST = datetime(1, 1, 3, tzinfo=UTC)
_LATEST = datetime(9999, 12, 29, tzinfo=UTC)


def _parse_time(name: str, raw: str) -> datetime:
    """The parameter's text is never echoed back: the message names the parameter and what it takes."""
    expected = f"{name} must be an ISO 8601 date or date-time between 0001-01-03 and 9999-12-28"
    try:
        at = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace(" ", "+"))
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ReportRequestError(expected) from None
    if not _EARLIEST <= at <= _LATEST:
        raise ReportRequestError(expected)
    return at


def _floor(at: datetime, bucket: str) -> datetime:
    at = at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if bucket == "day" else at


def _ceil(at: datetime, bucket: str) -> datetime:
    floor = _floor(at, bucket)
    return floor if floor == at else floor + BUCKETS[bucket]


def parse_window(
    params: Mapping[str, str], now: float, max_days: float = 31, retention: timedelta | None = None
) -> Window:
    """since/until/bucket from the query string: defaults until=now, since=until-24h, bucket=hour;
    since rounded down and until up to the bucket. With `retention`, a window reaching further back
    than that before `now` starts at `now - retention` (rounded down): nothing older is kept, so
    nothing older is read; a window wholly before it is empty (since == until)."""
    bucket = (params.get("bucket") or "hour").strip().lower()
    if bucket not in BUCKETS:
        raise ReportRequestError("bucket must be 'hour' or 'day'")
    until = _parse_time("until", params["until"]) if params.get("until") else datetime.fromtimestamp(now, UTC)
    since = _parse_time("since", params["since"]) if params.get("since") else until - DEFAULT_SPAN
    since, until = _floor(since, bucket), _ceil(until, bucket)
    if until <= since:
        raise ReportRequestError("since must be before until")
    if until - since > timedelta(days=max_days):
        raise ReportRequestError(f"the window is longer than {max_days:g} days; ask for less")
    if retention is not None:
        kept = _floor(datetime.fromtimestamp(now, UTC) - retention, bucket)
        since = max(since, kept)
        until = max(until, since)
    return Window(since, until, bucket)


def _empty_counts() -> dict[str, Any]:
    return {
        "requests": {o: 0 for o in OUTCOMES},
        "deferrals": 0,
        "recipients": {"internal": 0, "external": 0},
        "codes": {},
        "delivery": {},
    }


_SPLIT: dict[str, tuple[str, str]] = {}


def _add(into: dict[str, Any], counts: Mapping[str, int]) -> None:
    for name, n in counts.items():
        split = _SPLIT.get(name)
        if split is None:
            split = name.partition(".")[::2]
            if len(_SPLIT) < 10_000:  # counter names are few; the bound is only a guard
                _SPLIT[name] = split
        group, leaf = split
        if group == "deferrals" and not leaf:
            into["deferrals"] += n
        elif leaf and group in ("requests", "recipients", "codes", "delivery"):
            target = into[group]
            target[leaf] = target.get(leaf, 0) + n


def shape(buckets: Iterable[Bucket], window: Window) -> dict[str, Any]:
    """series, totals, errors and latency of the report from the hourly buckets (pure)."""
    buckets = list(buckets)
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    starts: dict[int, tuple[int, str]] = {}  # hour -> (bucket start, its ISO text)
    totals = _empty_counts()
    errors: dict[tuple[str, str], dict[str, Any]] = {}
    for b in buckets:
        start = starts.get(b.start)
        if start is None:
            at = _floor(datetime.fromtimestamp(b.start, UTC), window.bucket)
            start = (int(at.timestamp()), _iso(at) or "")
            starts[b.start] = start
        key = (start[0], b.account, b.category)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"start": start[1], "account": b.account, "category": b.category, **_empty_counts()}
        _add(row, b.counts)
        _add(totals, b.counts)
        for name, n in b.counts.items():
            if n and name.startswith("codes."):
                code = name[6:]
                err = errors.get((code, b.account))
                if err is None:
                    err = errors[(code, b.account)] = {"code": code, "account": b.account, "count": 0, "lastSeen": 0.0}
                err["count"] += n
                err["lastSeen"] = max(err["lastSeen"], b.last_seen.get(code, b.start))
    series = [rows[k] for k in sorted(rows)]
    ordered = sorted(errors.values(), key=lambda e: (-e["count"], e["code"], e["account"]))
    return {
        "series": series,
        "totals": totals,
        "errors": [{**e, "lastSeen": _iso(e["lastSeen"])} for e in ordered],
        "latency": latency_section(buckets, window),
    }


def _slowest(per_account: Mapping[str, list[int]]) -> list[dict[str, Any]]:
    """Per account, count, histogram, p50 and p95; slowest first (p95, then p50, then the number
    of requests; then by name)."""
    shown: list[dict[str, Any]] = [{"account": a, **lat.summary(h)} for a, h in per_account.items() if sum(h)]
    shown.sort(key=lambda s: s["account"])
    shown.sort(key=lat.slower_key, reverse=True)
    return shown


def latency_section(buckets: Iterable[Bucket], window: Window) -> dict[str, Any]:
    """Send latency of the window's sent requests (first seen -> HVE's 250 for the last transaction)
    from the `latency.<bound>` histograms of the hourly buckets: per bucket of the window its
    histogram, p50, p95 and slowest account (by p95); the window's; and per account. p50 and p95
    are the upper bound of the histogram bucket holding them (shared/reporting/latency.py)."""
    per_start: dict[int, dict[str, list[int]]] = {}
    per_account: dict[str, list[int]] = {}
    for b in buckets:
        if not any(name.startswith(lat.PREFIX) for name in b.counts):
            continue
        hist = lat.histogram(b.counts)
        start = int(_floor(datetime.fromtimestamp(b.start, UTC), window.bucket).timestamp())
        accounts = per_start.setdefault(start, {})
        accounts[b.account] = lat.merge([accounts.get(b.account, [0] * len(hist)), hist])
        per_account[b.account] = lat.merge([per_account.get(b.account, [0] * len(hist)), hist])
    series = []
    for start in sorted(per_start):
        merged = lat.merge(per_start[start].values())
        if not sum(merged):
            continue
        slowest = _slowest(per_start[start])[0]
        series.append(
            {
                "start": _iso(start),
                **lat.summary(merged),
                "slowest": {k: slowest[k] for k in ("account", "count", "p50", "p95")},
            }
        )
    return {
        "bounds": list(lat.BOUNDS),
        "series": series,
        "totals": lat.summary(lat.merge(per_account.values())),
        "accounts": _slowest(per_account),
    }


async def queue_state(queue: Any, now: float) -> dict[str, Any]:
    """Approximate depth, and the age of the oldest message visible now (messages waiting out a
    retry delay are counted in the depth, but a peek cannot see them)."""
    props, peeked = await asyncio.gather(queue.get_queue_properties(), queue.peek_messages(max_messages=1))
    oldest = None
    if peeked and peeked[0].inserted_on is not None:
        oldest = round(max(0.0, now - peeked[0].inserted_on.timestamp()), 1)
    return {"name": queue.queue_name, "depth": props.approximate_message_count or 0, "oldestAgeSeconds": oldest}


def budget(
    status: Mapping[str, Any], totals: Mapping[str, Any], daily_budget: int | None, price_per_million: float
) -> dict[str, Any]:
    spent = int(status["tenant"]["recipients_today"] or 0)
    period = totals["recipients"]["internal"] + totals["recipients"]["external"]
    return {
        "dailyRecipientBudget": daily_budget,
        "spentToday": spent,
        "pricePerMillionRecipients": float(price_per_million),
        "currency": "USD",
        "costToday": spent * price_per_million / 1e6,
        "costPeriod": period * price_per_million / 1e6,
    }


async def build_report(
    *,
    window: Window,
    aggregates: Aggregates,
    governor: Any,
    mail_queue: Any,
    poison_queue: Any,
    settings: Any,
    now: float,
) -> dict[str, Any]:
    from shared.reporting.status import status_report, usage_from_aggregates, usage_from_buckets

    buckets, (states, tenant), mail, poison = await asyncio.gather(
        aggregates.read(window.since, window.until),
        governor.read(),
        queue_state(mail_queue, now),
        queue_state(poison_queue, now),
    )
    if governor.config.plain:
        # The governor counts nothing per message on the plain path: today's use is in the aggregates
        # (from the window's buckets when it covers the day so far, else one more read).
        day_start = governor.config.day_end(governor.config.day_of(now) - 1)
        if window.since.timestamp() <= day_start and window.until.timestamp() >= now:
            states = usage_from_buckets(states, buckets, governor.config, now)
        else:
            states = await usage_from_aggregates(states, aggregates, governor.config, now)
    status = status_report(states, tenant, governor.config, settings.limits_profile, now)
    # Categories come from producers: the busiest AGGREGATES_MAX_CATEGORIES of the window are shown,
    # the rest under `other` (totals unchanged), so the series stay bounded.
    body = shape(fold_categories(buckets, settings.aggregates_max_categories), window)
    return {
        "schema": SCHEMA,
        "generatedAt": _iso(now),
        "since": _iso(window.since),
        "until": _iso(window.until),
        "bucket": window.bucket,
        **body,
        "status": status,
        "queues": {"mail": mail, "poison": poison},
        "budget": budget(
            status, body["totals"], settings.daily_recipient_budget, settings.price_per_million_recipients
        ),
    }


def render_text(report: Mapping[str, Any]) -> str:
    """The series as a terminal table (tools.ledger report)."""
    header = (
        f"{'start':25} {'account':28} {'category':16} {'sent':>6} {'refused':>7} {'dead':>5} {'defer':>6} "
        f"{'int':>6} {'ext':>6} {'deliv':>6} {'failed':>6} {'quar':>5} {'spam':>5}  codes"
    )
    lines = [f"report {report['since']} .. {report['until']} by {report['bucket']}", header, "-" * len(header)]
    for r in report["series"] + [{"start": "total", "account": "", "category": "", **report["totals"]}]:
        req, rc, dv = r["requests"], r["recipients"], r.get("delivery") or {}
        codes = ", ".join(f"{c} x{n}" for c, n in sorted(r["codes"].items()))
        lines.append(
            f"{r['start']:25} {(r['account'] or '-')[:28]:28} {(r['category'] or '-')[:16]:16} "
            f"{req.get('sent', 0):>6} {req.get('refused', 0):>7} {req.get('dead', 0):>5} {r['deferrals']:>6} "
            f"{rc['internal']:>6} {rc['external']:>6} {dv.get('delivered', 0):>6} {dv.get('failed', 0):>6} "
            f"{dv.get('quarantined', 0):>5} {dv.get('filteredAsSpam', 0):>5}  {codes}"
        )
    latency = report.get("latency") or {}
    if latency.get("series"):
        lines.append("")
        lines.append(f"{'latency (s)':25} {'sent':>6} {'p50':>6} {'p95':>6}  slowest account (p95)")

        def secs(v: float | None) -> str:
            return f"{v:g}" if v is not None else f">{latency['bounds'][-1]:g}"

        for r in latency["series"] + [{"start": "total", **latency["totals"], "slowest": None}]:
            slow = r.get("slowest") or (latency["accounts"][0] if latency["accounts"] else None)
            lines.append(
                f"{r['start']:25} {r['count']:>6} {secs(r['p50']):>6} {secs(r['p95']):>6}  "
                + (f"{slow['account'] or '-'} ({secs(slow['p95'])})" if slow else "-")
            )
    return "\n".join(lines)
