"""GET /api/report on a large history: time and Table requests for 24 h and for 7 days.

    .venv/bin/python -m bench.report [--days 30] [--requests-per-day 100000] [--repeat 5]

1. Writes `--days` of synthetic aggregate rows straight into the aggregates table of a fresh
   in-memory Azurite, as the relay's flushes would leave them: per hour (a day-shaped curve), per
   account and category, outcomes, deferrals, recipients and SMTP codes; a busy hour is spread over
   two shards (writers that lost an ETag race), a quiet one over one.
2. Serves `report` under the local host (tools/devhost.py: the real function handler over HTTP)
   and asks `GET /api/report` for the last 24 h and the last 7 days, `--repeat` times each. The
   first ask of a window also writes the rollups of its closed days (printed apart); the median
   is over the later asks.
3. Counts every Table request the handler makes (a hook on the SDK's HTTP transport, in this
   process) and prints the median time, the requests, and the 7 d / 24 h ratios.

The ledger is not read at all: its size cannot change these numbers (the Table requests per table
are printed to show it). Target: under 1 s and under 200 Table requests for 7 days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables.aio import TableClient

from shared.reporting.rows import HOUR, day_key, hour_of, row_fields, row_key, split_days
from shared.wiring import close_relays
from tools.azurite import Azurite
from tools.devhost import DevHost, _background_loop

ROOT = Path(__file__).resolve().parents[1]
ROLLUP_AFTER_SECONDS = 7200.0   # AGGREGATES_ROLLUP_AFTER_MINUTES' default, as the handler runs it
ACCOUNTS = ["news@contoso.com", "alerts@contoso.com", "billing@contoso.com", "orders@contoso.com",
            "hr@contoso.com"]
CATEGORIES = ["orders", "invoices", "newsletter", "alerts", "password-reset", "welcome", "shipping", ""]
CODES = ["451 4.7.0", "452 4.5.3", "421 4.4.2", "550 5.1.10", "550 5.5.105", "554 5.6.0"]


def synthetic_rows(days: int, per_day: int, now: float, rng: random.Random):
    """Aggregate entities for `days` UTC days ending with the current hour."""
    end = int(now // HOUR) * HOUR
    start = end - days * 24 * HOUR
    # A day-shaped curve: busy in office hours, quiet at night.
    curve = [0.3 + math.sin(math.pi * max(0, h - 5) / 16) ** 2 if 5 <= h <= 21 else 0.3 for h in range(24)]
    weights = [(a, c, rng.uniform(0.2, 1.0)) for a in ACCOUNTS for c in CATEGORIES]
    total_w = sum(w for _, _, w in weights)
    for hour in range(start, end + HOUR, HOUR):
        h = datetime.fromtimestamp(hour, timezone.utc).hour
        requests_hour = per_day * curve[h] / sum(curve)
        for account, category, w in weights:
            n = max(1, round(requests_hour * w / total_w))
            shards = 2 if curve[h] > 1.0 else 1
            for shard in range(shards):
                part = n // shards + (shard < n % shards)
                refused, dead = rng.randint(0, max(1, part // 50)), rng.randint(0, 1) if rng.random() < 0.05 else 0
                counts = {"requests.sent": max(0, part - refused - dead), "requests.refused": refused,
                          "requests.dead": dead, "deferrals": rng.randint(0, max(1, part // 20)),
                          "recipients.internal": part * 2, "recipients.external": rng.randint(0, part // 10)}
                last = {}
                for code in rng.sample(CODES, rng.randint(0, 2)):
                    counts[f"codes.{code}"] = rng.randint(1, 5)
                    last[code] = hour + rng.randint(0, HOUR - 1)
                yield {"PartitionKey": day_key(hour), "RowKey": row_key(hour, shard, account, category),
                       **row_fields(hour, account, category, {k: v for k, v in counts.items() if v}, last),
                       "Writes": json.dumps({f"w{rng.randrange(40):02d}": rng.randrange(1, 9999)})}


async def load(conn: str, table: str, rows) -> int:
    """Batched by partition (one UTC day), 100 entities per transaction, a few at once."""
    by_pk: dict[str, list[dict]] = {}
    for row in rows:
        by_pk.setdefault(row["PartitionKey"], []).append(row)
    async with TableClient.from_connection_string(conn, table) as client:
        await client.create_table()
        sem = asyncio.Semaphore(8)

        async def put(batch: list[dict]) -> None:
            async with sem:
                await client.submit_transaction([("upsert", e) for e in batch])

        await asyncio.gather(*(put(rows[i:i + 100]) for rows in by_pk.values() for i in range(0, len(rows), 100)))
    return sum(len(r) for r in by_pk.values())


class TableRequests:
    """Counts HTTP requests to the Table endpoint made by async SDK clients in this process."""

    def __init__(self, table_port: int) -> None:
        self.port = table_port
        self.by_table: Counter = Counter()
        self._original = AioHttpTransport.send

    def __enter__(self) -> "TableRequests":
        counter = self

        async def send(transport, request, **kwargs):
            url = urlparse(request.url)
            if url.port == counter.port:
                counter.by_table[url.path.split("/")[2].split("(")[0] if url.path.count("/") >= 2 else "?"] += 1
            return await counter._original(transport, request, **kwargs)

        AioHttpTransport.send = send
        return self

    def __exit__(self, *exc: object) -> None:
        AioHttpTransport.send = self._original

    def total(self) -> int:
        return sum(self.by_table.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--requests-per-day", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    with Azurite() as az:
        settings = {
            "AzureWebJobsStorage": az.connection_string, "AGGREGATES_TABLE": "benchaggregates",
            "HVE_ACCOUNTS": ",".join(ACCOUNTS), "HVE_PASSWORDS": json.dumps({a: "pw" for a in ACCOUNTS}),
            "HVE_INTERNAL_DOMAINS": "contoso.com", "RECIPIENT_HASH_KEY": "bench", "MAIL_QUEUE": "bench-mail",
            "AGGREGATES_ROLLUP_AFTER_MINUTES": str(ROLLUP_AFTER_SECONDS / 60),
        }
        now = time.time()
        t0 = time.perf_counter()
        rows = asyncio.run(load(az.connection_string, settings["AGGREGATES_TABLE"],
                                synthetic_rows(args.days, args.requests_per_day, now, random.Random(args.seed))))
        print(f"history: {args.days} days x {args.requests_per_day} requests/day, {len(ACCOUNTS)} accounts x "
              f"{len(CATEGORIES)} categories, {len(CODES)} codes -> {rows} aggregate rows "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        results = {}
        try:
            with DevHost(ROOT / "function_app.py", settings, http_port=0, functions=["report"]) as host, \
                    TableRequests(az.table_port) as counter:
                url = f"http://127.0.0.1:{host.http_port}/api/report?code=bench"
                fetch(url + "&since=2000-01-01T00:00:00Z&until=2000-01-01T01:00:00Z")   # cold start: relay, tables
                for label, query in [("24 h", ""), ("7 days", f"&since={iso(now - 7 * 86400)}")]:
                    times, requests, tables, due = [], [], Counter(), []
                    for _ in range(args.repeat):
                        before = Counter(counter.by_table)
                        t = time.perf_counter()
                        doc, size = fetch(url + query)
                        times.append(time.perf_counter() - t)
                        diff = Counter(counter.by_table)
                        diff.subtract(before)
                        requests.append(sum(diff.values()))
                        tables = diff
                        # What a report can promise: one governor read, and per range query one
                        # Table request per 1,000 rows it returns. The open days' rows grow with the
                        # hour the bench runs at, so count them (these requests are not the ask's).
                        rows_read = asyncio.run(rows_of_window(az.connection_string, settings["AGGREGATES_TABLE"],
                                                               doc["since"], doc["until"], time.time()))
                        due.append((sum(rows_read.values()), 1 + sum(pages_due(n) for n in rows_read.values())))
                    # The first ask of a window writes the rollups of its closed days; later asks read them.
                    results[label] = (statistics.median(times[1:] or times), times[0], requests[0],
                                      statistics.median(requests[1:] or requests), len(doc["series"]), size,
                                      dict(+tables), sum(doc["totals"]["requests"].values()), due[-1],
                                      max(r - d for r, (_, d) in list(zip(requests, due))[1:] or zip(requests, due)))
        finally:
            asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)

    print(f"{'window':8} {'median s':>9} {'first s':>8} {'Table requests':>15} {'first':>6} {'series rows':>12} "
          f"{'bytes':>9} {'requests counted':>17} {'rows read':>10} {'due':>4} {'over due':>9}  "
          f"Table requests by table (last ask)")
    for label, (med, first, first_reqs, reqs, series, size, tables, counted, (rows, due), over) in results.items():
        print(f"{label:8} {med:>9.3f} {first:>8.3f} {reqs:>15g} {first_reqs:>6} {series:>12} {size:>9} {counted:>17} "
              f"{rows:>10} {due:>4} {over:>9}  {tables}")
    print("due: 1 governor read + per range query (rollups of closed days, hours of open days, closed days "
          "without a rollup) max(1, ceil(rows / 1000)) Table requests; "
          "'over due' is the most any ask after the first took beyond that")
    day, week = results["24 h"], results["7 days"]
    print(f"ratio 7 days / 24 h: time {week[0] / day[0]:.2f}x, Table requests {week[3] / day[3]:.2f}x")
    ok = week[0] < 1.0 and max(week[2], week[3]) < 200
    print(f"target (7 days: < 1 s and < 200 Table requests): {'met' if ok else 'NOT met'}")
    return 0


def pages_due(rows: int) -> int:
    """Table requests of one range query: one per 1,000 rows, at least one."""
    return max(1, math.ceil(rows / 1000))


async def rows_of_window(conn: str, table: str, since: str, until: str, now: float) -> dict[str, int]:
    """Rows the report's range queries read for [since, until): the rollup rows of its closed
    days and the hour rows of its open days (as `Aggregates.read` splits them)."""
    start = hour_of(datetime.fromisoformat(since).timestamp())
    end = hour_of(datetime.fromisoformat(until).timestamp() - 1) + HOUR
    closed, open_ = split_days(start, end, now, ROLLUP_AFTER_SECONDS)
    out = {}
    async with TableClient.from_connection_string(conn, table) as client:
        async def rows(pks: list[str], op: str) -> list:
            return [e async for e in client.query_entities(
                f"PartitionKey ge @lo and PartitionKey le @hi and RowKey {op} '~'",
                parameters={"lo": pks[0], "hi": pks[-1]}, select=["PartitionKey"])] if pks else []

        rolled = await rows(closed, "ge")
        if closed:
            out["rollups"] = len(rolled)
        if open_:
            out["hours"] = len(await rows(open_, "lt"))
        # Closed days without a rollup (days with no rows never get one): one more query finds
        # which of them hold rows.
        unrolled = sorted(set(closed) - {e["PartitionKey"] for e in rolled})
        if unrolled:
            out["unrolled days"] = len(await rows(unrolled, "lt"))
    return out


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def fetch(url: str) -> tuple[dict, int]:
    with urllib.request.urlopen(url) as response:
        body = response.read()
    return json.loads(body), len(body)


if __name__ == "__main__":
    raise SystemExit(main())
