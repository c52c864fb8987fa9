"""Ask the outcome ledger: a summary, one request (with its chunks), or whether an address was mailed.

    python -m tools.ledger summary [--since 2026-11-28]
    python -m tools.ledger report [--since 2026-11-28]   # per day, account, category: outcomes, recipients
    python -m tools.ledger show REQUEST_ID [--json]   # with per-recipient delivery status (by hash)
    python -m tools.ledger lookup ADDRESS      # by keyed hash: the ledger holds no addresses
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from shared.delivery import DeliveryStore
from shared.ledger import Ledger
from shared.settings import Settings
from shared.storage import StorageClients
from tools.enqueue import load_local_settings


async def run(settings: Settings, command: str, arg: str | None, since: datetime | None = None) -> object:
    storage = StorageClients(settings)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                        settings.recipient_hash_key)
        if command == "summary":
            return await ledger.summary(since)
        if command == "report":
            since = since or datetime.now(timezone.utc) - timedelta(days=7)
            delivery = DeliveryStore(await storage.table(settings.delivery_table))
            return with_delivery(await ledger.report(since), await delivery.summaries_since(since - timedelta(days=1)))
        if command == "show":
            entry = await ledger.get(arg)
            if entry is None:
                return {"error": f"no request {arg!r} in the ledger"}
            delivery = DeliveryStore(await storage.table(settings.delivery_table))
            summary = await delivery.summary(arg)
            return {"id": entry.request_id, "state": entry.state, "account": entry.account, "attempts": entry.attempts,
                    "last_code": entry.last_code, "delivery": summary["delivery"] if summary else {},
                    "delivery_by_chunk": summary["chunks"] if summary else {},
                    "recipients": await delivery.recipients(arg),
                    **{k: v for k, v in asdict(entry).items() if k not in ("request_id", "etag")},
                    "chunks": await ledger.chunks(arg)}
        return {"address": "(hashed)", "requests": await ledger.requests_for_address(arg)}
    finally:
        await storage.close()


REPORT_STATUSES = ("delivered", "failed", "quarantined", "filteredAsSpam")


def with_delivery(groups: list[dict], summaries: list[dict]) -> list[dict]:
    """The report's groups (day of first receipt, account, category) with recipients by trace status."""
    by_key = {(g["day"], g["account"], g["category"]): g for g in groups}
    for group in groups:
        group["delivery"] = {s: 0 for s in REPORT_STATUSES}
    for summary in summaries:
        first = summary["first_received"]
        key = (first.date().isoformat() if first else "-", summary["account"] or "-", summary["category"] or "-")
        group = by_key.get(key)
        if group is None:
            continue
        for status, n in summary["delivery"].items():
            group["delivery"][status] = group["delivery"].get(status, 0) + n
    return groups


def render_show(doc: dict) -> str:
    """One request for a terminal: its outcome, then each recipient's delivery status (by hash)."""
    if "error" in doc:
        return doc["error"]
    lines = [f"request {doc['id']}: {doc['state']} via {doc['account'] or '-'}, {doc['attempts']} attempt(s), "
             f"last code {doc['last_code'] or '-'}" + (f" ({doc['reason']})" if doc.get("reason") else ""),
             "delivery: " + (", ".join(f"{k} {v}" for k, v in doc["delivery"].items()) or "not traced yet")]
    for r in doc["recipients"]:
        lines.append(f"  {r['recipient'][:16]}  chunk {r['chunk']}  {r['status']:14} {r['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["summary", "report", "show", "lookup"])
    parser.add_argument("arg", nargs="?", help="request id (show) or address (lookup)")
    parser.add_argument("--since", type=lambda v: datetime.fromisoformat(v).replace(tzinfo=timezone.utc),
                        help="UTC date or date-time (report default: 7 days ago)")
    parser.add_argument("--json", action="store_true", help="show: one JSON object instead of text")
    parser.add_argument("--settings", default="local.settings.json")
    args = parser.parse_args(argv)
    if args.command in ("show", "lookup") and not args.arg:
        parser.error(f"{args.command} needs an argument")
    load_local_settings(Path(args.settings))
    result = asyncio.run(run(Settings.from_env(), args.command, args.arg, args.since))
    if args.command == "show" and not args.json:
        print(render_show(result))
        return 1 if "error" in result else 0
    print(json.dumps(result, indent=2, default=str))
    return 1 if isinstance(result, dict) and "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
