"""Delivery confirmation at volume: send N messages through the real send stage to the HVE emulator,
feed the Graph stand-in's message trace from what it accepted, and time reconciliations.

    .venv/bin/python -m bench.delivery [--messages 2000] [--page-size 5000]

Prints, per run: Graph requests, trace rows, matched/unmatched, changed requests, seconds; and
ratios measured in the same run: a re-read of unchanged rows against the first run, and the Graph
requests spent against one request per message (what a per-message lookup would cost: at Graph's
100 per 5 minutes per tenant, that many requests take that many minutes / 20).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from shared.delivery.trace import DeliveryDelta, DeliveryStore, Reconciler
from shared.graph import GraphClient, StaticToken
from shared.send.stage import Relay
from shared.settings import Settings
from shared.storage import StorageClients
from tools.azurite import Azurite
from tools.graph_standin import GraphStandIn
from tools.hve_emulator import EmulatorConfig, HveEmulator

ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw", "billing@contoso.com": "billing-pw"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> float:
        return self.now.timestamp()


async def send_all(settings: Settings, count: int, rng: random.Random) -> tuple[int, float]:
    relay = await Relay.create(settings)
    recipients = 0
    try:
        started = time.perf_counter()
        docs = []
        for i in range(count):
            n = 1 + (rng.random() < 0.2) + (rng.random() < 0.05)
            to = [f"user{rng.randrange(5000)}-{i}-{k}@contoso.com" for k in range(n)]
            recipients += n
            docs.append(json.dumps({"id": f"bench-{i:05d}", "to": to, "subject": "Bench", "text": "Hello",
                                    "category": rng.choice(["orders", "alerts", "newsletter"])}))
        gate = asyncio.Semaphore(32)

        async def one(i: int, body: str) -> None:
            async with gate:
                handled = await relay.handle(body, f"q-{i}")
                if handled.state != "sent":
                    raise SystemExit(f"request {i}: {handled.state} {handled.reason}")

        await asyncio.gather(*(one(i, body) for i, body in enumerate(docs)))
        return recipients, time.perf_counter() - started
    finally:
        await relay.close()


async def reconcile_once(settings: Settings, graph: GraphStandIn, clock: Clock, deltas: list[DeliveryDelta]):
    storage = StorageClients(settings)
    client = GraphClient(settings.graph_base_url, StaticToken(graph.token), max_attempts=1)

    async def record(delta: DeliveryDelta) -> None:
        deltas.append(delta)

    try:
        reconciler = Reconciler(settings, client, DeliveryStore(await storage.table(settings.delivery_table), settings.recipient_hash_key),
                                await storage.table(settings.ledger_table),
                                await storage.table(settings.recipient_index_table), on_delta=record, clock=clock)
        started = time.perf_counter()
        tally = await reconciler.run()
        return tally, time.perf_counter() - started
    finally:
        await client.close()
        await storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as state, Azurite() as azurite, HveEmulator(EmulatorConfig(
            host="127.0.0.1", port=0, accounts=dict(ACCOUNTS), internal_domains={"contoso.com"}, profile="ga-2026",
            state_dir=Path(state))) as emulator, GraphStandIn() as graph:
        settings = Settings.from_env({
            "AzureWebJobsStorage": azurite.connection_string, "HVE_SMTP_HOST": "127.0.0.1",
            "HVE_SMTP_PORT": str(emulator.port), "HVE_SMTP_CA_FILE": str(emulator.ca_file),
            "HVE_ACCOUNTS": ",".join(ACCOUNTS), "HVE_PASSWORDS": json.dumps(ACCOUNTS),
            "HVE_INTERNAL_DOMAINS": "contoso.com", "RECIPIENT_HASH_KEY": "bench", "HVE_POOL_SIZE": "8",
            "GRAPH_BASE_URL": graph.base_url, "GRAPH_DEV_TOKEN": graph.token,
            "DELIVERY_TRACE_END_LAG": "PT0S", "DELIVERY_TRACE_PAGE_SIZE": str(args.page_size),
            "DELIVERY_TRACE_DETAILS_PER_RUN": "10",
        })
        recipients, send_seconds = asyncio.run(send_all(settings, args.messages, rng))
        print(f"sent {args.messages} messages ({recipients} recipients) through the send stage in {send_seconds:.1f} s")
        # Outcomes: 2% fail, 1% quarantined, 3% pending for 20 minutes, the rest delivered.
        for record in emulator.accepted():
            for address in record.recipients:
                roll = rng.random()
                if roll < 0.02:
                    graph.set_outcome(address, "failed")
                elif roll < 0.03:
                    graph.set_outcome(address, "quarantined")
                elif roll < 0.06:
                    graph.set_outcome(address, [["pending", 0], ["delivered", 1200]])
        fed = graph.feed_from(emulator)
        # Mail the relay did not send, from the same accounts: counted and ignored.
        for i in range(200):
            graph.add_trace("news@contoso.com", [f"other{i}@contoso.com"], f"<other-{i}@contoso.com>")
        print(f"trace: {len(graph.trace_rows())} rows for {fed} messages + 200 rows of other mail")
        clock = Clock()
        clock.now = datetime.now(timezone.utc) + timedelta(seconds=2)
        graph.clock = lambda: clock.now
        deltas: list[DeliveryDelta] = []
        header = f"{'run':38} {'requests':>8} {'rows':>7} {'matched':>7} {'unmatched':>9} {'changed':>7} {'seconds':>8}"
        print(header)
        print("-" * len(header))
        results = {}
        for name, advance in [("1 first run (P3D back, 12 spans/acct)", 0), ("2 ten minutes later, same rows", 10),
                              ("3 pending now delivered", 15)]:
            clock.now += timedelta(minutes=advance)
            tally, seconds = asyncio.run(reconcile_once(settings, graph, clock, deltas))
            results[name[0]] = (tally, seconds)
            print(f"{name:38} {tally.requests:>8} {tally.rows:>7} {tally.matched:>7} {tally.unmatched:>9} "
                  f"{tally.changed_requests:>7} {seconds:>8.2f}" + (f"  stopped: {tally.stopped}" if tally.stopped else ""))
        totals: Counter = Counter()
        for d in deltas:
            totals.update(d.changes)
        first, again = results["1"], results["2"]
        print(f"\nrecipients by status (sum of deltas): {dict(sorted((k, v) for k, v in totals.items() if v))}")
        print(f"deltas: {len(deltas)} for {args.messages} requests; run 2 changed {again[0].changed_requests} "
              f"(re-read rows give no delta)")
        print(f"first run: {first[0].rows / first[1]:.0f} trace rows/s; re-read run 2 took {again[1] / first[1]:.2f}x the first")
        per_message = args.messages
        print(f"Graph requests: {first[0].requests} for {args.messages} messages vs {per_message} one-per-message "
              f"= {per_message / max(1, first[0].requests):.1f}x fewer; at 100 per 5 min per-message lookups need "
              f"{per_message / 20:.0f} min of the tenant's whole budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
