"""The suppression list: which recipients the relay skips, and why (by keyed hash, never by address).

    python -m tools.suppression list [--json]           # in force now: hash prefix, reason, source, since, until
    python -m tools.suppression check ADDRESS [--json]  # suppressed? reason, until
    python -m tools.suppression add ADDRESS             # reason `admin`, for SUPPRESSION_DAYS from now
    python -m tools.suppression remove ADDRESS          # mailed again (other instances: within SUPPRESSION_CACHE_SECONDS)

Storage: --connection-string / --account-name (tools/_storage.py). Against a real account,
`check`, `add` and `remove` need the deployment's RECIPIENT_HASH_KEY in the environment (Key Vault
secret `recipient-hash-key`): without it no address matches. `list` and `check` read (Storage Table
Data Reader); `add` and `remove` write the table (Storage Table Data Contributor, not an operator
role by default). The address is hashed here and never printed back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.send.contract import RequestRefused, parse_address
from shared.send.suppression import ADMIN, SuppressionList
from shared.settings import UNSET_HASH_KEY, Settings
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


async def run(settings: Settings, command: str, address: str | None, target: StorageTarget | None = None) -> dict:
    storage = open_storage(settings, target)
    try:
        suppressions = SuppressionList(
            await storage.table(settings.suppression_table), settings.recipient_hash_key, days=settings.suppression_days
        )
        if command == "list":
            rows = await suppressions.list()
            return {"suppressions": [s.view() for s in rows], "count": len(rows)}
        assert address is not None
        if command == "add":
            return {"added": True, **(await suppressions.add(address, ADMIN, ADMIN)).view()}
        if command == "remove":
            return {"removed": await suppressions.remove(address), "suppressed": False}
        found = await suppressions.check(address)
        return found.view() if found is not None else {"suppressed": False, "reason": None, "until": None}
    finally:
        await storage.close()


def render(command: str, doc: dict) -> str:
    if command == "list":
        lines = [f"{doc['count']} suppressed recipient(s)"]
        for s in doc["suppressions"]:
            lines.append(f"  {s['hash']}  {s['reason']:18} since {s['since'][:19]}  until {s['until'][:19]}  {s['source']}")
        return "\n".join(lines)
    if command == "remove":
        return "removed" if doc["removed"] else "not suppressed (nothing to remove)"
    if not doc["suppressed"]:
        return "not suppressed"
    return f"suppressed ({doc['reason']}) until {doc['until']}" + (" — added" if doc.get("added") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.suppression", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["list", "check", "add", "remove"])
    parser.add_argument("address", nargs="?", help="the recipient address (check, add, remove)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.command != "list":
        if not args.address:
            parser.error(f"{args.command} needs an address")
        try:
            args.address = parse_address("address", args.address).addr
        except RequestRefused as refusal:
            parser.error(refusal.detail)
    load_local_settings(Path(args.settings))
    settings, target = tool_settings(args)
    if args.command != "list" and target.signed_in and settings.recipient_hash_key == UNSET_HASH_KEY.encode():
        parser.error(f"{args.command} needs the deployment's RECIPIENT_HASH_KEY (Key Vault secret "
                     "recipient-hash-key): without it no address matches")
    doc = run_tool(run(settings, args.command, args.address, target))
    print(json.dumps(doc, indent=2) if args.json else render(args.command, doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
