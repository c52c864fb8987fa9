"""Drop mail requests on the relay's queue, as any producer would.

    python -m tools.enqueue --to ann@contoso.com --subject Hi --text "Hello"
    python -m tools.enqueue --file requests.json [--base64] [--repeat 100]
    python -m tools.enqueue --priority --to ann@contoso.com --subject "Reset" --text "..."

`--priority` writes to the priority lane's queue (MAIL_QUEUE_PRIORITY) instead of MAIL_QUEUE: on the
queue path the lane is the queue (a `priority` field in a request moves nothing).

A request bigger than a queue message allows is uploaded to the claim-check container and
the queue gets a stub pointing at it. Settings come from the environment or local.settings.json;
storage: --connection-string / --account-name (tools/_storage.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from shared.send.producer import enqueue_requests
from shared.settings import Settings
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool


def load_local_settings(path: Path) -> None:
    """Values of local.settings.json into the environment; variables already set win."""
    if path.exists():
        for key, value in json.loads(path.read_text()).get("Values", {}).items():
            os.environ.setdefault(key, str(value))


async def enqueue(settings: Settings, requests: list[dict[str, Any]], *, encode_base64: bool = False,
                  target: StorageTarget | None = None, priority: bool = False) -> list[str]:
    storage = open_storage(settings, target)
    queue = settings.priority_queue if priority else settings.mail_queue
    try:
        return await enqueue_requests(storage, queue, settings.claim_check_container, requests,
                                      encode_base64=encode_base64)
    finally:
        await storage.close()


def _requests_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.file:
        doc = json.loads(Path(args.file).read_text())
        requests = doc if isinstance(doc, list) else [doc]
    else:
        if not args.to:
            raise SystemExit("give --file or at least one --to")
        request: dict[str, Any] = {"to": args.to, "subject": args.subject or ""}
        for key in ("cc", "bcc"):
            if getattr(args, key):
                request[key] = getattr(args, key)
        if args.text:
            request["text"] = args.text
        if args.html:
            request["html"] = args.html
        if args.category:
            request["category"] = args.category
        if args.reply_to:
            request["replyTo"] = args.reply_to
        if args.send_at:
            request["sendAt"] = args.send_at
        if args.id:
            request["id"] = args.id
        requests = [request]
    out = []
    batch = uuid.uuid4().hex[:12]
    for n in range(args.repeat):
        for i, request in enumerate(requests):
            copy = dict(request)
            if args.repeat > 1:
                # Without ids the copies would be one request (the id is derived from the content).
                copy["id"] = f"{copy['id']}-{n}" if "id" in copy else f"r-{batch}-{i}-{n}"
            out.append(copy)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.enqueue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", help="JSON file with one request object or a list of them")
    parser.add_argument("--to", action="append")
    parser.add_argument("--cc", action="append")
    parser.add_argument("--bcc", action="append")
    parser.add_argument("--subject")
    parser.add_argument("--text")
    parser.add_argument("--html")
    parser.add_argument("--category")
    parser.add_argument("--reply-to", action="append", help="Reply-To address (repeatable)")
    parser.add_argument("--send-at", help="send not before this ISO 8601 time with an offset, at most 7 days ahead")
    parser.add_argument("--id", help="idempotency key (default: derived from the content, so identical requests are sent once)")
    parser.add_argument("--repeat", type=int, default=1, help="enqueue the requests N times (ids get -N suffixes)")
    parser.add_argument("--base64", action="store_true", help="write base64 like a Functions output binding")
    parser.add_argument("--priority", action="store_true",
                        help="put the requests on the priority lane's queue (MAIL_QUEUE_PRIORITY)")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    load_local_settings(Path(args.settings))
    settings, target = tool_settings(args)
    requests = _requests_from_args(args)
    run_tool(enqueue(settings, requests, encode_base64=args.base64, target=target, priority=args.priority))
    queue = settings.priority_queue if args.priority else settings.mail_queue
    print(f"enqueued {len(requests)} request(s) on {queue}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
