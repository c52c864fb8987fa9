"""Delivery trace at volume on a virtual clock: are all accounts traced, and soon enough?

    .venv/bin/python -m bench.trace_fairness [--accounts 100] [--per-day 100000] [--hours 6]
                                             [--timer-minutes 10] [--ledger-every 20] [--page-size 5000]

1. Mail: `--per-day` messages a day at a steady rate, spread unevenly over `--accounts` accounts
   (Zipf weights: the busiest account sends about a fifth of all mail, the quietest a few an
   hour), 1-3 recipients each. Each message goes where the send stage leaves it for the trace: a
   `requests.sent` count in the hourly aggregates (flushed before each timer run, under the hour
   it went) and its trace rows at the Graph stand-in (over HTTP), which shows a row 3-10 minutes
   after sending (uniform). Outcomes: 2% failed, 1% quarantined, 3% pending for 20 minutes, the
   rest delivered.
2. Every `--timer-minutes` the app's entry point (`shared.delivery.trace.reconcile`: its settings, its
   budget of DELIVERY_TRACE_REQUESTS_PER_5MIN = 60, the aggregates telling where mail went) runs
   once against the stand-in, whose own limit is Graph's: 100 trace requests per 5 minutes,
   judged on the same virtual clock (a 429 would show in the figures).
3. Sizing, to keep Azurite's work small on a busy machine: only every `--ledger-every`-th message
   is in the ledger and the recipient index (written with the real Ledger); the others carry a
   Message-ID of another shape, so they cost Graph requests and rows like the rest but no Table
   request (counted as unmatched). The confirmation share is measured on the ledger's requests.

Printed, all measured in this run:
- Graph trace requests per 5 minutes (virtual time, from the stand-in's log): max and mean, and 429s;
- per account, the longest wait from a row showing in Graph to the first request of its account
  whose window covers it: the longest over all accounts, the median of the per-account longest,
  and rows never read (rows shown in the last 30 minutes are left out of both measures);
- the share of the ledger's recipients whose final status (delivered, failed, ...) was recorded
  within 30 minutes of Graph showing it, and the longest such wait.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from shared.reporting.aggregates import Aggregates
from shared.delivery.trace import DeliveryDelta, reconcile
from shared.graph import GraphClient, StaticToken
from shared.ledger import Ledger, LedgerEntry
from shared.send.mime import message_id
from shared.settings import Settings
from shared.storage import StorageClients
from shared.delivery.policy import OPEN_STATUSES
from tools.azurite import Azurite
from tools.graph_standin import GraphStandIn

PENDING_SECONDS = 1200


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


@dataclass
class Message:
    at: datetime
    account: str
    recipients: list[str]
    visible: float                  # seconds after sending before Graph shows its rows
    outcome: str | list
    request_id: str | None          # in the ledger (None: costs Graph, not Azurite)

    @property
    def shown(self) -> datetime:
        """When Graph shows the final status of every recipient."""
        final = PENDING_SECONDS if isinstance(self.outcome, list) else 0
        return self.at + timedelta(seconds=max(self.visible, final))


def make_mail(args: argparse.Namespace, start: datetime, rng: random.Random) -> tuple[list[str], list[Message]]:
    accounts = [f"sender{i:03d}@contoso.com" for i in range(args.accounts)]
    weights = [1.0 / (rank + 1) for rank in range(args.accounts)]
    rng.shuffle(weights)              # the busiest account is anywhere in the configuration
    total = int(args.per_day * args.hours / 24)
    seconds = args.hours * 3600
    messages = []
    for i, offset in enumerate(sorted(rng.uniform(0, seconds) for _ in range(total))):
        n = 1 + (rng.random() < 0.2) + (rng.random() < 0.05)
        roll = rng.random()
        outcome: str | list = ("failed" if roll < 0.02 else "quarantined" if roll < 0.03 else
                               [["pending", 0], ["delivered", PENDING_SECONDS]] if roll < 0.06 else "delivered")
        messages.append(Message(start + timedelta(seconds=offset), rng.choices(accounts, weights)[0],
                                [f"r{i}-{k}@fabrikam.example" for k in range(n)], rng.uniform(180, 600), outcome,
                                f"tf-{i:06d}" if i % args.ledger_every == 0 else None))
    return accounts, messages


async def write_ledger(settings: Settings, messages: list[Message]) -> int:
    storage = StorageClients(settings)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                        settings.recipient_hash_key)
        gate = asyncio.Semaphore(16)

        async def one(m: Message) -> None:
            async with gate:
                entry = LedgerEntry(m.request_id, "sent", m.at, m.at, attempts=1, account=m.account,
                                    external_recipients=len(m.recipients), last_code=250,
                                    message_id=message_id(m.request_id, "contoso.com", key=settings.recipient_hash_key),
                                    chunks_sent=1)
                await ledger.put(entry)
                await ledger.index_recipients(entry, m.recipients)

        mine = [m for m in messages if m.request_id]
        await asyncio.gather(*(one(m) for m in mine))
        return len(mine)
    finally:
        await storage.close()


async def flush_sends(settings: Settings, clock: Clock, sends: list[Message]) -> None:
    storage = StorageClients(settings)
    try:
        aggregates = Aggregates(storage.tables.get_table_client(settings.aggregates_table), flush_seconds=0,
                                clock=clock, rollup_after_seconds=settings.aggregates_rollup_after_seconds)
        for m in sends:
            aggregates.outcome(m.at.timestamp(), m.account, "", "sent", external=len(m.recipients))
        await aggregates.flush()
    finally:
        await storage.close()


async def one_run(settings: Settings, graph: GraphStandIn, clock: Clock, on_delta):
    client = GraphClient(settings.graph_base_url, StaticToken(graph.token), max_attempts=1)
    try:
        return await reconcile(settings, on_delta=on_delta, clock=clock, graph=client)
    finally:
        await client.close()


def _window(text: str) -> tuple[str, datetime, datetime]:
    sender = text.split("senderAddress eq '")[1].split("'")[0]
    ge = datetime.fromisoformat(text.split("ge ")[1].split(" ")[0].replace("Z", "+00:00"))
    le = datetime.fromisoformat(text.split("le ")[1].split(" ")[0].replace("Z", "+00:00"))
    return sender, ge, le


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--per-day", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--timer-minutes", type=float, default=10.0)
    parser.add_argument("--ledger-every", type=int, default=20)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    wall = time.perf_counter()
    # Virtual time: any day works; a whole one ago, from 06:00 UTC, whatever the hour now.
    start = datetime.now(timezone.utc).replace(hour=6, minute=0, second=0, microsecond=0) - timedelta(days=1)
    accounts, messages = make_mail(args, start, rng)
    with Azurite() as azurite, GraphStandIn() as graph:
        clock = Clock(start)
        graph.clock = lambda: clock.now
        settings = Settings.from_env({
            "AzureWebJobsStorage": azurite.connection_string, "HVE_ACCOUNTS": ",".join(accounts),
            "RECIPIENT_HASH_KEY": "bench", "GRAPH_BASE_URL": graph.base_url, "GRAPH_DEV_TOKEN": graph.token,
            "DELIVERY_TRACE_PAGE_SIZE": str(args.page_size),
        })
        in_ledger = asyncio.run(write_ledger(settings, messages))
        recipients = sum(len(m.recipients) for m in messages)
        per_account = sorted((sum(1 for m in messages if m.account == a) for a in accounts), reverse=True)
        print(f"{len(messages)} messages ({recipients} recipients) in {args.hours:g} h from {len(accounts)} accounts "
              f"(busiest {per_account[0]}, median {per_account[len(per_account) // 2]}, quietest {per_account[-1]}); "
              f"{in_ledger} in the ledger; timer every {args.timer_minutes:g} min; budget "
              f"{settings.delivery_requests_per_5min} per 5 min; Graph's limit {graph.trace_budget} per "
              f"{graph.trace_window:g} s; page size {args.page_size}")

        confirmed: dict[str, datetime] = {}      # request id -> when its last open recipient became final
        finals: dict[str, int] = defaultdict(int)
        by_id = {m.request_id: m for m in messages if m.request_id}

        async def on_delta(delta: DeliveryDelta) -> None:
            finals[delta.request_id] += sum(n for s, n in delta.changes.items() if s not in OPEN_STATUSES)
            if finals[delta.request_id] >= len(by_id[delta.request_id].recipients) and delta.request_id not in confirmed:
                confirmed[delta.request_id] = clock.now

        runs: list[tuple[datetime, int, int]] = []      # (virtual time, first request index, end index)
        sent = 0
        end = start + timedelta(hours=args.hours)
        step = timedelta(minutes=args.timer_minutes)
        stopped = defaultdict(int)
        details = 0
        while clock.now + step <= end:
            clock.now += step
            due = []
            while sent < len(messages) and messages[sent].at <= clock.now:
                m = messages[sent]
                mid = (message_id(m.request_id, "contoso.com", key=settings.recipient_hash_key) if m.request_id
                       else f"<other-{sent}@contoso.com>")
                graph.add_trace(m.account, m.recipients, mid, received=m.at, outcome=m.outcome, visible_after=m.visible)
                due.append(m)
                sent += 1
            asyncio.run(flush_sends(settings, clock, due))
            first = len(graph.trace_requests)
            tally = asyncio.run(one_run(settings, graph, clock, on_delta))
            details += tally.details
            if tally.stopped:
                stopped[tally.stopped.split(":")[0]] += 1
            runs.append((clock.now, first, len(graph.trace_requests)))
        log = graph.trace_requests

        # Graph requests per 5 minutes of virtual time.
        bins = defaultdict(int)
        reads: dict[str, list[tuple[datetime, datetime, datetime]]] = defaultdict(list)
        for at, lo, hi in runs:
            for request in log[lo:hi]:
                bins[int((at - start).total_seconds() // 300)] += 1
                if request.status == 200 and "$filter" in request.query:
                    sender, ge, le = _window(request.query["$filter"])
                    reads[sender].append((at, ge, le))
        slots = int(args.hours * 12)
        counts = [bins.get(i, 0) for i in range(slots)]
        throttled = sum(1 for r in log if r.status == 429)

        # Per account: from a row showing in Graph to the first read of a window covering it.
        last_run = runs[-1][0]
        longest: dict[str, float] = {}
        never = 0
        for m in messages[:sent]:
            shown = m.at + timedelta(seconds=m.visible)
            if shown > last_run - timedelta(minutes=30):
                continue                 # too near the end to tell
            hit = next((at for at, ge, le in reads[m.account] if at >= shown and ge <= m.at <= le), None)
            if hit is None:
                never += 1
                hit = last_run
            longest[m.account] = max(longest.get(m.account, 0.0), (hit - shown).total_seconds())
        waits = sorted(longest.values())

        # Confirmation of the ledger's recipients, from Graph showing their final status.
        within = total = 0
        latest = 0.0
        for rid, m in by_id.items():
            if m.shown > last_run - timedelta(minutes=30):
                continue                 # not 30 minutes left in the run to confirm it
            total += len(m.recipients)
            wait = ((confirmed[rid] if rid in confirmed else last_run) - m.shown).total_seconds()
            latest = max(latest, wait)
            if rid in confirmed and wait <= 1800:
                within += len(m.recipients)

        print(f"\n{'accounts':>8} {'msgs/day':>9} {'hours':>5} {'runs':>4} {'req/5min max':>12} {'mean':>6} {'429s':>4} "
              f"{'longest wait (min)':>18} {'median acct':>11} {'never read':>10} {'confirmed <=30 min':>18} {'worst (min)':>11}")
        print(f"{len(accounts):>8} {args.per_day:>9} {args.hours:>5g} {len(runs):>4} {max(counts):>12} "
              f"{statistics.mean(counts):>6.1f} {throttled:>4} {waits[-1] / 60:>18.1f} "
              f"{statistics.median(waits) / 60:>11.1f} {never:>10} {within / max(1, total):>17.1%} {latest / 60:>11.1f}")
        print(f"\naccounts read: {len(reads)} of {len(accounts)}; runs stopped: {dict(stopped) or 'none'}; "
              f"getDetailsByRecipient calls: {details}; recipients measured: {total}; "
              f"wall time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
