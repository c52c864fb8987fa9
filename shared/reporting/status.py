"""The live view of the HVE accounts that HVE's own day-old report lacks: per account, what was used
today by kind, what remains, when the next slot is free, cooldown and health."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.governor.pacing import AccountState, PacingConfig, Shape, TenantState, earliest_slot


def _iso(ts: float) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts > 0 else None


def _remaining(cap: int | None, used: int) -> int | None:
    return None if cap is None else max(0, cap - used)


def account_status(state: AccountState, tenant: TenantState | None, cfg: PacingConfig, now: float) -> dict[str, Any]:
    today = state.on_day(cfg.day_of(now))
    lim = cfg.limits
    internal_at, internal_why = earliest_slot(state, tenant, Shape(1, 0), now, cfg)
    # None means "now".
    next_free: dict[str, Any] = {
        "internal": _iso(internal_at) if internal_at > now else None,
        "internal_reason": internal_why or None,
    }
    if lim.external_allowed:
        external_at, external_why = earliest_slot(state, tenant, Shape(0, 1), now, cfg)
        next_free.update(
            external=_iso(external_at) if external_at > now else None, external_reason=external_why or None
        )
    if state.unhealthy_until > now:
        health = "unhealthy"
    elif state.cooldown_until > now:
        health = "cooling-down"
    else:
        health = "healthy"
    return {
        "account": state.account,
        "health": health,
        "last_problem": state.last_problem or None,
        "used_today": {
            "messages": today.messages_today,
            "internal_recipients": today.internal_today,
            "external_recipients": today.external_today,
        },
        "remaining_today": {
            "external_recipients": _remaining(lim.external_recipients_per_day, today.external_today)
            if lim.external_allowed
            else 0,
            "recipients": _remaining(lim.recipients_per_day_per_account, today.recipients_today),
        },
        "next_free_slot": next_free,
        "cooldown_until": _iso(state.cooldown_until) if state.cooldown_until > now else None,
        "unhealthy_until": _iso(state.unhealthy_until) if state.unhealthy_until > now else None,
        "last_granted": _iso(state.last_granted),
    }


def usage_from_buckets(
    states: list[AccountState], buckets: list[Any], cfg: PacingConfig, now: float
) -> list[AccountState]:
    """On the plain path (no per-minute window, nothing counted per day) the governor's rows count
    nothing: what each account used today comes from the hourly aggregates instead (requests sent,
    recipients by kind, of the hours since the daily window began; a few seconds behind, as the
    aggregates are flushed). `buckets` must cover that window."""
    from dataclasses import replace

    day = cfg.day_of(now)
    day_start = cfg.day_end(day - 1)
    used: dict[str, Counter] = defaultdict(Counter)
    for bucket in buckets:
        if bucket.start + 3600 > day_start and bucket.start <= now:
            used[bucket.account].update(bucket.counts)
    return [
        replace(
            s,
            day=day,
            messages_today=used[s.account]["requests.sent"],
            internal_today=used[s.account]["recipients.internal"],
            external_today=used[s.account]["recipients.external"],
        )
        for s in states
    ]


async def usage_from_aggregates(
    states: list[AccountState], aggregates: Any, cfg: PacingConfig, now: float
) -> list[AccountState]:
    """`usage_from_buckets`, reading the aggregates of the daily window so far."""
    since = datetime.fromtimestamp(cfg.day_end(cfg.day_of(now) - 1), UTC)
    buckets = await aggregates.read(since, datetime.fromtimestamp(now, UTC) + timedelta(seconds=1))
    return usage_from_buckets(states, buckets, cfg, now)


def last_24h_since(now: float) -> datetime:
    """The start of the hour 24 hours ago: the window of `delivery_last_24h`."""
    return (datetime.fromtimestamp(now, UTC) - timedelta(hours=24)).replace(minute=0, second=0, microsecond=0)


async def delivery_last_24h(aggregates: Any, now: float, buckets: list[Any] | None = None) -> dict[str, Any]:
    """Message-trace rates of the requests sent in the last 24 hours (whole hours: from the start
    of the hour 24 h ago), overall and per account, from the hourly aggregates' `delivery.<status>`
    counts. Its cost is the aggregates' two range queries, whatever the size of the delivery table
    (none when `buckets` of that window are given)."""
    from shared.delivery.policy import delivery_rates

    since = last_24h_since(now)
    if buckets is None:
        buckets = await aggregates.read(since, datetime.fromtimestamp(now, UTC))
    totals: Counter = Counter()
    per_account: dict[str, Counter] = defaultdict(Counter)
    for bucket in buckets:
        if bucket.start < since.timestamp():
            continue
        for name, n in bucket.counts.items():
            if name.startswith("delivery.") and n:
                totals[name[len("delivery.") :]] += n
                per_account[bucket.account][name[len("delivery.") :]] += n

    def counts(c: Counter) -> dict[str, int]:
        return {k: v for k, v in sorted(c.items()) if v}

    return {
        "since": since.isoformat(timespec="seconds"),
        "counts": counts(totals),
        "rates": delivery_rates(counts(totals)),
        "accounts": {
            a: {"counts": counts(c), "rates": delivery_rates(counts(c))}
            for a, c in sorted(per_account.items())
            if counts(c)
        },
    }


def status_report(
    states: list[AccountState],
    tenant: TenantState | None,
    cfg: PacingConfig,
    profile: str,
    now: float | None = None,
    delivery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`delivery`: message-trace rates of the last 24 hours (`delivery_last_24h`), when traced."""
    now = time.time() if now is None else now
    day = cfg.day_of(now)
    used = sum(s.on_day(day).recipients_today for s in states)
    tenant_today = tenant.on_day(day) if tenant is not None else None
    return {
        "at": _iso(now),
        "limits_profile": profile,
        "daily_window_ends": _iso(cfg.day_end(day)),
        "tenant": {
            "recipients_today": used,
            "cap": cfg.tenant_cap,
            "allowance_claimed": tenant_today.claimed if tenant_today else None,
            "remaining": _remaining(cfg.tenant_cap, tenant_today.claimed if tenant_today else used),
        },
        "accounts": [account_status(s, tenant, cfg, now) for s in states],
        **({"delivery_24h": delivery} if delivery is not None else {}),
    }


def render_text(report: dict[str, Any]) -> str:
    """The report as a terminal table (tools.status)."""
    lines = [
        f"HVE accounts at {report['at']}  (profile {report['limits_profile']}, daily window ends {report['daily_window_ends']})",
        f"tenant: {report['tenant']['recipients_today']} recipients today"
        + (
            f", cap {report['tenant']['cap']}, remaining {report['tenant']['remaining']}"
            if report["tenant"]["cap"]
            else ""
        ),
    ]
    header = f"{'account':32} {'health':12} {'msgs':>6} {'int':>6} {'ext':>6} {'ext left':>8}  next free (int / ext)"
    lines += [header, "-" * len(header)]
    for a in report["accounts"]:
        used, left, nxt = a["used_today"], a["remaining_today"], a["next_free_slot"]
        ext_left = "-" if left["external_recipients"] is None else str(left["external_recipients"])
        lines.append(
            f"{a['account']:32} {a['health']:12} {used['messages']:>6} {used['internal_recipients']:>6} "
            f"{used['external_recipients']:>6} {ext_left:>8}  {nxt['internal'] or 'now'} / {(nxt.get('external') or 'now') if 'external' in nxt else '-'}"
            + (f"  [{a['last_problem']}]" if a["last_problem"] else "")
        )
    delivery = report.get("delivery_24h")
    if delivery is not None:
        rates = delivery["rates"]
        if rates["traced"]:
            lines.append(
                f"delivery, last 24 h ({rates['traced']} traced recipients): "
                + ", ".join(
                    f"{name} {rates[name]:.1%}"
                    for name in ("delivered", "failed", "quarantined", "filteredAsSpam", "open")
                )
            )
        else:
            lines.append("delivery, last 24 h: nothing traced yet (python -m tools.delivery --once)")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
