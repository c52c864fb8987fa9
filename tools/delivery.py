"""Delivery confirmation by hand: one reconciliation of the ledger with Microsoft Graph message trace.

    python -m tools.delivery --once      # read trace now, record per-recipient status, print what matched
    python -m tools.delivery --dry-run   # print the Graph queries a run would make, send none

Uses the app settings (local.settings.json or the environment): GRAPH_BASE_URL, the app identity
(or GRAPH_DEV_TOKEN for the local stand-in), HVE_ACCOUNTS, DELIVERY_TRACE_* and DELIVERY_TABLE.
Storage: --connection-string / --account-name (tools/_storage.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.delivery.trace import DeliveryDelta, reconcile
from shared.settings import Settings, SettingsError
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


SHOW = 50  # changed requests listed one per line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.delivery", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="run one reconciliation now")
    mode.add_argument("--dry-run", action="store_true", help="show the Graph queries it would make")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    load_local_settings(Path(args.settings))
    changed: list[DeliveryDelta] = []

    async def collect(delta: DeliveryDelta) -> None:
        changed.append(delta)

    async def once(settings: Settings, target: StorageTarget):
        settings.require_accounts()
        storage = open_storage(settings, target)
        try:
            return await reconcile(settings, dry_run=args.dry_run, on_delta=collect, storage=storage)
        finally:
            await storage.close()

    try:
        tally = run_tool(once(*tool_settings(args)))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{len(tally.queries)} Graph quer{'y' if len(tally.queries) == 1 else 'ies'} (GET):")
        for query in tally.queries:
            print(f"  {query}")
        return 0
    for delta in changed[:SHOW]:
        print(f"  {delta.request_id} ({delta.account}): " + ", ".join(f"{n:+d} {status}" for status, n in delta.changes.items()))
    if len(changed) > SHOW:
        print(f"  ... and {len(changed) - SHOW} more request(s) changed")
    print(tally.summary())
    return 1 if tally.stopped.startswith("error") else 0


if __name__ == "__main__":
    raise SystemExit(main())
