"""Live status of the HVE accounts from the governor's table: used today by kind, remaining,
next free slot, cooldown, health; and delivery rates of the last 24 hours (message trace).

    python -m tools.status [--json] [--settings local.settings.json]
    python -m tools.status --account-name <storage account>   # production, as you (az login)
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from shared.reporting.aggregates import Aggregates
from shared.governor.table import TableGovernor
from shared.hve.limits import resolve_limits
from shared.send.stage import pacing_config
from shared.settings import Settings
from shared.reporting.status import (delivery_last_24h, last_24h_since, render_text, status_report, to_json,
                                     usage_from_buckets)
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


async def report(settings: Settings, target: StorageTarget | None = None) -> dict:
    storage = open_storage(settings, target)
    try:
        config = pacing_config(settings, resolve_limits(settings.limits_profile, settings.limits_overrides))
        governor = TableGovernor(await storage.table(settings.governor_table), settings.accounts, config)
        states, tenant = await governor.read()
        aggregates = Aggregates(storage.tables.get_table_client(settings.aggregates_table), flush_seconds=0,
                                rollup_after_seconds=settings.aggregates_rollup_after_seconds)
        now = time.time()
        buckets = await aggregates.read(last_24h_since(now), datetime.fromtimestamp(now + 1, timezone.utc))
        if config.plain:
            # The governor counts nothing per message on the plain path: today's use is in the aggregates.
            states = usage_from_buckets(states, buckets, config, now)
        return status_report(states, tenant, config, settings.limits_profile, now,
                             delivery=await delivery_last_24h(aggregates, now, buckets))
    finally:
        await storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the same JSON as the status HTTP function")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    load_local_settings(Path(args.settings))
    settings, target = tool_settings(args)
    result = run_tool(report(settings, target))
    print(to_json(result) if args.json else render_text(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
