"""Ask the outcome ledger: a summary, one request (with its chunks), or whether an address was mailed.

    python -m tools.ledger summary [--since 2026-11-28]
    python -m tools.ledger report [--since 2026-11-28]   # per day, account, category: outcomes, recipients
    python -m tools.ledger show REQUEST_ID
    python -m tools.ledger lookup ADDRESS      # by keyed hash: the ledger holds no addresses
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

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
            return await ledger.report(since or datetime.now(timezone.utc) - timedelta(days=7))
        if command == "show":
            entry = await ledger.get(arg)
            if entry is None:
                return {"error": f"no request {arg!r} in the ledger"}
            return {**asdict(entry), "chunks": await ledger.chunks(arg)}
        return {"address": "(hashed)", "requests": await ledger.requests_for_address(arg)}
    finally:
        await storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["summary", "report", "show", "lookup"])
    parser.add_argument("arg", nargs="?", help="request id (show) or address (lookup)")
    parser.add_argument("--since", type=lambda v: datetime.fromisoformat(v).replace(tzinfo=timezone.utc),
                        help="UTC date or date-time (report default: 7 days ago)")
    parser.add_argument("--settings", default="local.settings.json")
    args = parser.parse_args(argv)
    if args.command in ("show", "lookup") and not args.arg:
        parser.error(f"{args.command} needs an argument")
    load_local_settings(Path(args.settings))
    print(json.dumps(asyncio.run(run(Settings.from_env(), args.command, args.arg, args.since)), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
