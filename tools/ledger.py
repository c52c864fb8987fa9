"""Ask the outcome ledger: a summary, one request (with its chunks), or whether an address was mailed.

    python -m tools.ledger summary [--since 2026-11-28]
    python -m tools.ledger report [--since 2026-11-28] [--until ...] [--bucket day|hour] [--json]
                                               # from the aggregates: what GET /api/report answers
    python -m tools.ledger show REQUEST_ID [--json]   # with per-recipient delivery status (by hash)
    python -m tools.ledger lookup ADDRESS      # by keyed hash: the ledger holds no addresses

Storage: --connection-string / --account-name (tools/_storage.py). `lookup` against a real
account needs the deployment's RECIPIENT_HASH_KEY in the environment (Key Vault secret
`recipient-hash-key`); without it no address would ever match.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from shared.reporting.aggregates import Aggregates
from shared.governor.table import TableGovernor
from shared.delivery.trace import DeliveryStore
from shared.ledger import Ledger
from shared.hve.limits import resolve_limits
from shared.reporting.request_status import request_view
from shared.reporting.report import ReportRequestError, build_report, parse_window, render_text
from shared.send.stage import pacing_config
from shared.settings import UNSET_HASH_KEY, Settings
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


async def report(settings: Settings, since: datetime | None, until: datetime | None, bucket: str,
                 target: StorageTarget | None = None) -> dict:
    """The same document as `GET /api/report`, read from the aggregates table (not the ledger rows:
    its cost does not grow with the ledger)."""
    storage = open_storage(settings, target)
    try:
        config = pacing_config(settings, resolve_limits(settings.limits_profile, settings.limits_overrides))
        now = time.time()
        since = since or datetime.fromtimestamp(now, timezone.utc) - timedelta(days=7)
        params = {"bucket": bucket, "since": since.isoformat(),
                  **({"until": until.isoformat()} if until else {})}
        window = parse_window(params, now, settings.report_max_days)
        return await build_report(
            window=window, aggregates=Aggregates(storage.tables.get_table_client(settings.aggregates_table),
                                  rollup_after_seconds=settings.aggregates_rollup_after_seconds),
            governor=TableGovernor(await storage.table(settings.governor_table), settings.accounts, config),
            mail_queue=await storage.queue(settings.mail_queue), poison_queue=await storage.queue(settings.poison_queue),
            settings=settings, now=now)
    finally:
        await storage.close()


async def run(settings: Settings, command: str, arg: str | None, since: datetime | None = None,
              target: StorageTarget | None = None) -> object:
    storage = open_storage(settings, target)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                        settings.recipient_hash_key)
        if command == "summary":
            return await ledger.summary(since)
        if command == "show":
            entry = await ledger.get(arg)
            if entry is None:
                return {"error": f"no request {arg!r} in the ledger"}
            delivery = DeliveryStore(await storage.table(settings.delivery_table), settings.recipient_hash_key)
            summary = await delivery.summary(arg)
            # What GET /api/requests/{id} answers, and the operator's detail beside it.
            view = request_view(entry, summary)
            return {**view, "delivery_by_chunk": summary["chunks"] if summary else {},
                    "recipients": await delivery.recipients(arg),
                    **{k: v for k, v in asdict(entry).items() if k not in ("request_id", "etag") and k not in view},
                    "chunks": await ledger.chunks(arg)}
        return {"address": "(hashed)", "requests": await ledger.requests_for_address(arg)}
    finally:
        await storage.close()


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
    parser.add_argument("--since", type=_utc, help="UTC date or date-time (report default: 7 days ago)")
    parser.add_argument("--until", type=_utc, help="report: UTC date or date-time (default: now)")
    parser.add_argument("--bucket", choices=["day", "hour"], default="day", help="report: bucket size (default: day)")
    parser.add_argument("--json", action="store_true", help="report: the JSON of GET /api/report; show: one JSON object instead of text")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.command in ("show", "lookup") and not args.arg:
        parser.error(f"{args.command} needs an argument")
    load_local_settings(Path(args.settings))
    settings, target = tool_settings(args)
    if args.command == "lookup" and target.signed_in and settings.recipient_hash_key == UNSET_HASH_KEY.encode():
        parser.error("lookup needs the deployment's RECIPIENT_HASH_KEY (Key Vault secret recipient-hash-key): "
                     "without it no address matches")
    if args.command == "report":
        try:
            doc = run_tool(report(settings, args.since, args.until, args.bucket, target))
        except ReportRequestError as exc:
            parser.error(str(exc))
        print(json.dumps(doc, indent=2) if args.json else render_text(doc))
        return 0
    result = run_tool(run(settings, args.command, args.arg, args.since, target))
    if args.command == "show" and not args.json:
        print(render_show(result))
        return 1 if "error" in result else 0
    print(json.dumps(result, indent=2, default=str))
    return 1 if isinstance(result, dict) and "error" in result else 0


def _utc(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at


if __name__ == "__main__":
    raise SystemExit(main())
