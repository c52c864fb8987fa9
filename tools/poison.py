"""Look at and replay the poison queue: messages the function failed on `maxDequeueCount` times
(e.g. storage was down). Refused requests never land here — they are in the ledger.

    python -m tools.poison list
    python -m tools.poison requeue            # every poison message back onto the mail queue
    python -m tools.poison --priority list    # the priority lane's: MAIL_QUEUE_PRIORITY-poison, back onto its queue

Storage: --connection-string / --account-name (tools/_storage.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.send.contract import RequestRefused, claim_check_of, content_request_id, decode_queue_body
from shared.settings import Settings
from tools._storage import StorageTarget, add_arguments, open_storage, tool_settings
from tools._storage import run as run_tool
from tools.enqueue import load_local_settings


def describe(body: str) -> str:
    """The request id if the body has one; never addresses or content."""
    try:
        doc = decode_queue_body(body)
        claim = claim_check_of(doc)
    except RequestRefused as refusal:
        return f"(unreadable: {refusal.reason})"
    # Without an id the relay derives it from the content: the same ledger row as the first delivery.
    return f"id={doc.get('id') or content_request_id(body)}" + (" (claim check)" if claim else "")


async def run(settings: Settings, command: str, target: StorageTarget | None = None, *, priority: bool = False) -> int:
    storage = open_storage(settings, target)
    # Each lane's trigger has its own poison queue; a replay goes back onto the lane it came from.
    poison_name = settings.priority_poison_queue if priority else settings.poison_queue
    queue_name = settings.priority_queue if priority else settings.mail_queue
    try:
        poison = await storage.queue(poison_name)
        if command == "list":
            count = 0
            for message in await poison.peek_messages(max_messages=32):
                count += 1
                print(f"{message.id}  inserted {message.inserted_on:%Y-%m-%d %H:%M:%S}  {describe(message.content)}")
            props = await poison.get_queue_properties()
            print(f"{props.approximate_message_count} message(s) on {poison_name}"
                  + (" (first 32 shown)" if props.approximate_message_count > count else ""))
            return 0
        queue = await storage.queue(queue_name)
        moved = 0
        while True:
            batch = [m async for m in poison.receive_messages(messages_per_page=32, visibility_timeout=60, max_messages=32)]
            if not batch:
                break
            for message in batch:
                # Back unchanged: the ledger still knows the request, so nothing is sent twice.
                await queue.send_message(message.content, time_to_live=-1)
                await poison.delete_message(message)
                moved += 1
        print(f"moved {moved} message(s) from {poison_name} to {queue_name}")
        return 0
    finally:
        await storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.poison", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["list", "requeue"])
    parser.add_argument("--priority", action="store_true", help="the priority lane's poison queue (MAIL_QUEUE_PRIORITY)")
    parser.add_argument("--settings", default="local.settings.json")
    add_arguments(parser)
    args = parser.parse_args(argv)
    load_local_settings(Path(args.settings))
    settings, target = tool_settings(args)
    return run_tool(run(settings, args.command, target, priority=args.priority))


if __name__ == "__main__":
    raise SystemExit(main())
