"""Reading the aggregates: the buckets of a window, a closed UTC day from its rollup.

A day that ended more than AGGREGATES_ROLLUP_AFTER_MINUTES ago is read from one rollup row per
account and category (its hours summed over shards), written the first time a report reads that
day. The marker row (`~~rollup`) guards it: `building` before the hours are read, `done` (with the
number of rollup rows) only if no late writer marked the day `stale` meanwhile
(shared/reporting/aggregates.py does, when it merges into a day that may be rolled up). A rollup
that is not `done` is not used: the day is read hour by hour, and its rollup built again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError

from shared.reporting.rows import HOUR, ROLLUP, ROLLUP_MARK, Bucket, hour_of, name_digest, split_days

log = logging.getLogger("hve_relay.aggregates")

# A string property holds at most 64 KiB (32K UTF-16 characters).
MAX_PROPERTY_CHARS = 30_000


@dataclass
class ReadStats:
    """What reads cost and found, per process (tests, the bench)."""

    rollups_written: int = 0
    rollups_used: int = 0
    rows_read: int = 0  # rows the report's two range queries returned
    pages_read: int = 0  # their Table requests: one per 1,000 rows (at least one per query)


class Rollups:
    """The read side of the aggregates table (`table`: an async TableClient)."""

    def __init__(self, table: Any, stats: ReadStats) -> None:
        self._table = table
        self.stats = stats

    async def read(self, since: datetime, until: datetime, *, now: float, rollup_after: float) -> list[Bucket]:
        """Buckets with an hour start in [since, until), shards summed. A UTC day that ended more
        than `rollup_after` before `now` is read from its rollup (one row per account and category); the
        others from their hour rows (one per hour, account, category and shard). Two range queries
        in all, each one Table request per 1,000 rows it returns (`stats.rows_read`,
        `stats.pages_read`); when a closed day has no valid rollup, one more range query finds
        which of those days hold rows, and each that does gets a one-time build."""
        if until <= since:
            return []
        start, end = hour_of(since.timestamp()), hour_of(until.timestamp() - 1) + HOUR
        if end <= start:
            return []
        closed, open_ = split_days(start, end, now, rollup_after)
        try:
            rolled, hours = await asyncio.gather(self._rollups(closed), self._hour_rows(open_))
            self.stats.rollups_used += sum(1 for r in rolled.values() if r is not None)
            unrolled = await self._days_with_rows([pk for pk, r in rolled.items() if r is None])
            built = await asyncio.gather(*(self._build(pk) for pk in unrolled))
        except ResourceNotFoundError:  # nothing counted yet: the table is created by the first flush
            return []
        records = hours + [rec for r in rolled.values() if r for rec in r] + [rec for b in built for rec in b]
        buckets: dict[tuple[int, str, str], Bucket] = {}
        for data in records:
            hour = int(data["h"]) * HOUR
            if not start <= hour < end:
                continue
            key = (hour, data["a"], data["c"])
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(*key)
            bucket.counts.update(data["n"])
            for code, ts in data["l"].items():
                if ts > bucket.last_seen.get(code, 0.0):
                    bucket.last_seen[code] = ts
        return [buckets[k] for k in sorted(buckets)]

    async def _hour_rows(self, pks: list[str]) -> list[dict[str, Any]]:
        """Hour records {h, a, c, n, l} of the days `pks` (consecutive), shards not yet summed."""
        if not pks:
            return []
        pages = self._table.query_entities(
            "PartitionKey ge @lo and PartitionKey le @hi and RowKey lt @rollup",
            parameters={"lo": pks[0], "hi": pks[-1], "rollup": ROLLUP},
            select=["Data"],
        ).by_page()
        records = []
        async for page in pages:
            self.stats.pages_read += 1
            records += [json.loads(row["Data"]) async for row in page]
        self.stats.rows_read += len(records)
        return records

    async def _days_with_rows(self, pks: list[str]) -> list[str]:
        """Those of the days `pks` that hold any hour row (one range query over them): a day
        without rows gets no rollup, so a window over empty days writes nothing."""
        if not pks:
            return []
        pages = self._table.query_entities(
            "PartitionKey ge @lo and PartitionKey le @hi and RowKey lt @rollup",
            parameters={"lo": min(pks), "hi": max(pks), "rollup": ROLLUP},
            select=["PartitionKey"],
        ).by_page()
        found: set[str] = set()
        async for page in pages:
            self.stats.pages_read += 1
            async for row in page:
                self.stats.rows_read += 1
                found.add(row["PartitionKey"])
        return [pk for pk in pks if pk in found]

    async def _rollups(self, pks: list[str]) -> dict[str, list[dict[str, Any]] | None]:
        """Per day, its rollup as hour records; None unless complete and not marked stale."""
        if not pks:
            return {}
        by_day: dict[str, list[Any]] = {pk: [] for pk in pks}
        pages = self._table.query_entities(
            "PartitionKey ge @lo and PartitionKey le @hi and RowKey ge @rollup",
            parameters={"lo": pks[0], "hi": pks[-1], "rollup": ROLLUP},
            select=["PartitionKey", "RowKey", "Data", "State", "Rows"],
        ).by_page()
        async for page in pages:
            self.stats.pages_read += 1
            async for row in page:
                self.stats.rows_read += 1
                by_day.setdefault(row["PartitionKey"], []).append(row)
        out: dict[str, list[dict[str, Any]] | None] = {}
        for pk, rows in by_day.items():
            marker = next((r for r in rows if r["RowKey"] == ROLLUP_MARK), None)
            parts = [r for r in rows if r["RowKey"] != ROLLUP_MARK]
            if marker is None or marker.get("State") != "done" or marker.get("Rows") != len(parts):
                out[pk] = None
                continue
            records = []
            for row in parts:
                data = json.loads(row["Data"])
                records += [{"h": int(h), "a": data["a"], "c": data["c"], **hn} for h, hn in data["hours"].items()]
            out[pk] = records
        return out

    async def _build(self, pk: str) -> list[dict[str, Any]]:
        """Read a closed day from its hours and write its rollup. The marker says `building`
        before the hours are read; a late writer sets it `stale`, and then `done` fails on its
        ETag: a rollup never hides a count."""
        etag = await self._mark(pk, "building")
        records = await self._hour_rows([pk])
        if etag is not None:
            await self._write_rollup(pk, records, etag)
        return records

    async def _mark(self, pk: str, state: str) -> str | None:
        try:
            meta = await self._table.upsert_entity(
                {"PartitionKey": pk, "RowKey": ROLLUP_MARK, "State": state}, mode="replace"
            )
            return meta.get("etag")
        except Exception as exc:  # noqa: BLE001 - the report is answered from the hours anyway
            log.warning("aggregates: rollup of %s not started (%s)", pk, type(exc).__name__)
            return None

    async def _write_rollup(self, pk: str, records: list[dict[str, Any]], etag: str) -> None:
        """Best effort: one row per (account, category) with its hours summed over shards, then the
        marker `done`, only if no late writer marked the day `stale` since `building`."""
        keys: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        for data in records:
            hour = keys.setdefault((data["a"], data["c"]), {}).setdefault(int(data["h"]), {"n": Counter(), "l": {}})
            hour["n"].update(data["n"])
            for code, ts in data["l"].items():
                hour["l"][code] = max(hour["l"].get(code, 0.0), ts)
        entities = []
        for (account, category), hours in keys.items():
            text = json.dumps(
                {
                    "a": account,
                    "c": category,
                    "hours": {
                        str(h): {"n": {k: v for k, v in x["n"].items() if v}, "l": x["l"]}
                        for h, x in sorted(hours.items())
                    },
                },
                separators=(",", ":"),
            )
            if len(text) > MAX_PROPERTY_CHARS:
                log.info("aggregates: no rollup for %s (a row would exceed the property size)", pk)
                return
            entities.append({"PartitionKey": pk, "RowKey": f"{ROLLUP}{name_digest(account, category)}", "Data": text})
        try:
            for i in range(0, len(entities), 100):
                await self._table.submit_transaction(
                    [("upsert", e, {"mode": "replace"}) for e in entities[i : i + 100]]
                )
            await self._table.update_entity(
                {"PartitionKey": pk, "RowKey": ROLLUP_MARK, "State": "done", "Rows": len(entities)},
                mode="replace",
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            )
            self.stats.rollups_written += 1
        except Exception as exc:  # noqa: BLE001 - the report is answered from the hours anyway
            log.warning("aggregates: rollup of %s not written (%s)", pk, type(exc).__name__)
