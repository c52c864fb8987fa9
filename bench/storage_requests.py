"""Storage requests per message on the send path, counted from Azurite's own request log.

    .venv/bin/python -m bench.storage_requests [--messages 60] [--profile ga-2026] [--budget 0] [--events]

Requests go on an Azurite queue, `send_mail` runs under the local host (the real trigger path:
receive, handle, delete) against the HVE emulator over verified TLS, and Azurite logs every
request it serves (`--debug FILE`). Each logged request is put in a class by its method and
path: which table (ledger, recipient index, governor, aggregates), which queue operation. The
host's own polling (receiving messages) is shown apart and not charged to the relay; the delete
after a success is charged, as the function's outcome costs it.

`--events` sets EVENTS_QUEUE: each final request also puts its outcome event there (`events queue put`).

Prints one row per class (requests per message) and the total the relay causes per message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bench.bench_send import ACCOUNTS, EmulatorProcess
from shared.ledger import Ledger
from shared.send.producer import enqueue_requests
from shared.wiring import close_relays
from shared.settings import Settings
from shared.storage import StorageClients
from tools.azurite import Azurite
from tools.devhost import HOST_USER_AGENT, DevHost, _background_loop

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"^(\S+) \S+ info: (Table|Queue|Blob)StorageContextMiddleware: RequestMethod=(\w+) RequestURL=(\S+)"
                   r".*?\"user-agent\":\"([^\"]*)\"")


def request(i: int) -> dict:
    return {"id": f"sr-{i}", "to": [f"user{i % 50}@contoso.com"], "subject": f"Message {i}",
            "text": f"Hello number {i}\n" * 20, "category": "bench"}


def classify(service: str, method: str, url: str, names: dict[str, str], agent: str = "") -> str:
    """A short name for one logged request, e.g. `ledger GET`, `queue delete`, `host receive`.
    The local host's own queue calls carry its user agent (tools.devhost.HOST_USER_AGENT): its
    polls and idle checks are `host …`; its delete after a success is charged to the message."""
    path = unquote(urlsplit(url).path).split("/", 2)[-1]     # after /devstoreaccount1/
    query = urlsplit(url).query
    if service == "Table":
        if path.startswith("$batch"):
            return f"table batch {method}"
        table = re.split(r"[(?/]", path, maxsplit=1)[0]
        if table == "Tables":
            return "table create"
        return f"{names.get(table, table)} {method}"
    if service == "Queue":
        parts = path.split("/")
        if parts[0] in names and method == "POST":
            return f"{names[parts[0]]} put"
        host = agent.startswith(HOST_USER_AGENT)
        if len(parts) == 1:
            if method == "PUT":
                return "queue create"
            what = "queue length read" if "comp=metadata" in query else f"queue {method}"
            return f"host {what}" if host else what
        if method == "GET" and "peekonly" not in query:
            return "host receive" if host else "queue receive"
        if method == "DELETE":
            return "queue delete"
        if method == "POST":
            return "queue put back"
        if method == "PUT":
            return "queue update"
        return f"queue {method}"
    return f"blob {method}"


def run(n: int, profile: str, budget: int, events: bool = False) -> tuple[Counter, float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "azurite-debug.log"
        with Azurite(debug_log=log) as azurite, EmulatorProcess(Path(tmp)) as emulator:
            tag = "sr"
            values = {
                "AzureWebJobsStorage": azurite.connection_string, "MAIL_QUEUE": f"bench-{tag}",
                "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(emulator.port),
                "HVE_SMTP_CA_FILE": str(emulator.ca_file), "HVE_ACCOUNTS": ",".join(ACCOUNTS),
                "HVE_PASSWORDS": json.dumps(ACCOUNTS), "HVE_INTERNAL_DOMAINS": "contoso.com",
                "HVE_LIMITS_PROFILE": profile, "RECIPIENT_HASH_KEY": "bench",
                "LEDGER_TABLE": f"ledger{tag}", "RECIPIENT_INDEX_TABLE": f"rcpt{tag}", "GOVERNOR_TABLE": f"gov{tag}",
                "AGGREGATES_TABLE": f"agg{tag}",
                **({"HVE_DAILY_RECIPIENT_BUDGET": str(budget)} if budget else {}),
                **({"EVENTS_QUEUE": f"events-{tag}"} if events else {}),
            }
            settings = Settings.from_env(values)
            names = {settings.ledger_table: "ledger", settings.recipient_index_table: "recipient index",
                     settings.governor_table: "governor", settings.aggregates_table: "aggregates",
                     settings.suppression_table: "suppression list"}
            if events:
                names[settings.events_queue] = "events queue"

            async def enqueue() -> None:
                storage = StorageClients(settings)
                try:
                    await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container,
                                           [request(i) for i in range(n)])
                finally:
                    await storage.close()

            async def sent() -> int:
                storage = StorageClients(settings)
                try:
                    ledger = Ledger(await storage.table(settings.ledger_table),
                                    await storage.table(settings.recipient_index_table), b"")
                    return (await ledger.summary())["by_state"].get("sent", 0)
                finally:
                    await storage.close()

            asyncio.run(enqueue())
            time.sleep(0.5)
            start_line = len(log.read_text().splitlines()) if log.exists() else 0
            host = DevHost(ROOT / "function_app.py", values, functions=["send_mail"])
            started = time.perf_counter()
            host.start()
            try:
                host.wait_until_idle(timeout=600)
                elapsed = time.perf_counter() - started
            finally:
                asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)
                host.stop()
            time.sleep(0.5)
            lines = log.read_text().splitlines()[start_line:]
            got = asyncio.run(sent())
            if got != n:
                raise SystemExit(f"relay sent {got} of {n}")
    counts: Counter = Counter()
    for line in lines:
        match = _LINE.match(line)
        if match:
            counts[classify(match.group(2), match.group(3), match.group(4), names, match.group(5))] += 1
    return counts, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--profile", default="ga-2026")
    parser.add_argument("--budget", type=int, default=0, help="HVE_DAILY_RECIPIENT_BUDGET (0: none)")
    parser.add_argument("--events", action="store_true", help="EVENTS_QUEUE set: outcome events on")
    args = parser.parse_args()
    counts, elapsed = run(args.messages, args.profile, args.budget, args.events)
    n = args.messages
    host_only = {"host receive", "host queue length read"}
    relay_total = sum(v for k, v in counts.items() if k not in host_only and k not in ("table create", "queue create"))
    print(f"storage requests per message, from Azurite's request log: {n} single-recipient internal messages, "
          f"profile {args.profile}, budget {args.budget or 'none'}, events {'on' if args.events else 'off'}, "
          f"{elapsed:.1f} s under the local host")
    for name, value in sorted(counts.items(), key=lambda kv: -kv[1]):
        note = "  (the host's polling, not charged)" if name in host_only else (
            "  (once per process, not charged)" if name in ("table create", "queue create") else "")
        print(f"  {value / n:7.3f}  {name}{note}")
    print(f"  {relay_total / n:7.3f}  TOTAL caused by the relay per message  ({relay_total} requests)")


if __name__ == "__main__":
    main()
