"""Run the welcome scan once, now, or show what it would do.

    python -m tools.welcome --dry-run       # who would be welcomed, and why the others are not
    python -m tools.welcome                 # one scan: enqueue the welcomes, record state, move the watermark

Settings come from the environment or local.settings.json (like tools.enqueue). A dry run reads
Graph and the welcome state table and writes nothing. Without --dry-run the scan runs even when
WELCOME_ENABLED is false: that setting switches the timer, not this command.

Against the local stand-in: GRAPH_BASE_URL=http://127.0.0.1:8484 and
GRAPH_DEV_TOKEN=graph-standin-dev-token (python -m tools.graph_standin prints both).
Storage: --connection-string / --account-name (tools/_storage.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.settings import Settings, SettingsError
from shared.welcome.scan import ScanReport, run_scan
from shared.welcome.policy import PENDING, SKIP, WELCOME, Decision, graph_time
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


def _who(decision_user) -> str:
    user = decision_user
    name = user.display_name or "(no display name)"
    address = user.mail or user.user_principal_name or user.id
    return f"{name} <{address}>"


def _created(user) -> str:
    return graph_time(user.created) if user.created else "-"


def format_report(report: ScanReport) -> str:
    lines = [
        f"Welcome scan{' (dry run: nothing is enqueued or recorded)' if report.dry_run else ''}",
        f"  window: users created since {graph_time(report.window.since)} ({report.window.why})",
        f"  {report.users_read} user(s) read from Graph in {report.graph_requests} request(s)",
    ]
    verb = "would welcome" if report.dry_run else "welcomed"
    groups: list[tuple[str, list[Decision]]] = [
        (verb, report.of(WELCOME)), ("pending", report.of(PENDING)), ("skipped", report.of(SKIP))]
    for title, decisions in groups:
        lines.append(f"{title} ({len(decisions)}):")
        for d in decisions:
            detail = f"created {_created(d.user)}"
            if d.outcome == PENDING and d.retry_until:
                detail += f"; {d.reason}; re-checked until {graph_time(d.retry_until)}"
            elif d.reason:
                detail += f"; {d.reason}"
            lines.append(f"  {_who(d.user)}  [{d.user.id}]  {detail}")
    if report.expired:
        lines.append(f"skipped after waiting (not listed any more) ({len(report.expired)}):")
        lines.extend(f"  [{row.user_id}]  {row.reason}" for row in report.expired)
    lines.append(f"already handled by an earlier scan ({len(report.already)}):")
    for user, row in sorted(report.already, key=lambda pair: pair[1].updated):
        lines.append(f"  {_who(user)}  [{user.id}]  {row.state} {graph_time(row.updated)}"
                     + (f"; {row.reason}" if row.reason else ""))
    if not report.dry_run and report.watermark:
        lines.append(f"watermark now {graph_time(report.watermark)}")
    return "\n".join(lines)


def report_json(report: ScanReport) -> dict:
    def decision(d: Decision) -> dict:
        return {"id": d.user.id, "displayName": d.user.display_name, "mail": d.user.mail,
                "created": _created(d.user), "outcome": d.outcome, "reason": d.reason,
                "retryUntil": graph_time(d.retry_until) if d.retry_until else None}

    return {
        "dryRun": report.dry_run, "since": graph_time(report.window.since), "why": report.window.why,
        "usersRead": report.users_read, "graphRequests": report.graph_requests,
        "decisions": [decision(d) for d in report.decisions],
        "already": [{"id": u.id, "state": r.state, "reason": r.reason} for u, r in report.already],
        "expired": [{"id": r.user_id, "reason": r.reason} for r in report.expired],
        "watermark": graph_time(report.watermark) if report.watermark else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.welcome", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="decide and print, write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    load_local_settings(Path(args.settings))

    async def scan(settings: Settings, target: StorageTarget) -> ScanReport:
        storage = open_storage(settings, target)
        try:
            return await run_scan(settings, dry_run=args.dry_run, storage=storage)
        finally:
            await storage.close()

    try:
        report = run_tool(scan(*tool_settings(args)))
    except SettingsError as exc:
        print(f"welcome: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line for the operator; --json users get the same
        print(f"welcome: scan failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report_json(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
