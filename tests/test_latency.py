"""Send latency: the histogram arithmetic (buckets, quantile estimate, merge), the report's latency
section (per bucket, slowest account), and the histogram in the aggregates against real Azurite
(same row and flush as the outcome, shards and rollups of closed days merged)."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import jsonschema
import pytest
from azure.data.tables.aio import TableClient

from shared.reporting import latency as lat
from shared.reporting.aggregates import Aggregates
from shared.reporting.rows import Bucket
from shared.reporting.report import Window, latency_section, shape

T0 = datetime(2026, 11, 30, 22, 0, tzinfo=timezone.utc).timestamp()
N = len(lat.BOUNDS) + 1


def hist(**by_bound: int) -> list[int]:
    """A histogram from counts by upper bound: hist(b5=3, inf=1)."""
    out = [0] * N
    for key, n in by_bound.items():
        out[lat.NAMES.index(f"latency.{key[1:] if key.startswith('b') else key}")] += n
    return out


# ------------------------------------------------------------------ arithmetic (pure)


@pytest.mark.parametrize("seconds, name", [
    (0, "latency.1"), (-3.0, "latency.1"), (float("nan"), "latency.1"), (0.4, "latency.1"), (1.0, "latency.1"),
    (1.0001, "latency.2"), (2, "latency.2"), (4.9, "latency.5"), (30, "latency.30"), (30.5, "latency.60"),
    (3600, "latency.3600"), (3600.5, "latency.inf"), (86400 * 3, "latency.inf"),
])
def test_a_latency_goes_to_the_first_bucket_whose_upper_bound_it_does_not_exceed(seconds, name):
    assert lat.counter_name(seconds) == name


def test_the_quantile_is_the_upper_bound_of_the_bucket_holding_the_nearest_rank():
    # 10 requests: 3 under 5 s, 4 under 10 s, 1 under 30 s, 1 under 60 s, 1 under 300 s.
    h = hist(b5=3, b10=4, b30=1, b60=1, b300=1)
    assert lat.quantile(h, 0.5) == 10.0      # the 5th fastest is in (5, 10]
    assert lat.quantile(h, 0.3) == 5.0       # the 3rd
    assert lat.quantile(h, 0.31) == 10.0     # the 4th
    assert lat.quantile(h, 0.95) == 300.0    # ceil(9.5) = the 10th, the slowest
    assert lat.quantile(h, 0.9) == 60.0      # the 9th
    assert lat.quantile(h, 1.0) == 300.0
    # 20 requests: p95 is the 19th exactly (no float rounding up to the 20th).
    assert lat.quantile(hist(b1=19, b3600=1), 0.95) == 1.0
    assert lat.quantile(hist(b1=18, b3600=2), 0.95) == 3600.0
    # One request: every quantile is its bucket.
    assert lat.quantile(hist(b120=1), 0.5) == lat.quantile(hist(b120=1), 0.95) == 120.0


def test_a_quantile_above_the_last_bound_or_of_nothing_is_none():
    assert lat.quantile([0] * N, 0.5) is None
    assert lat.quantile(hist(inf=1), 0.5) is None
    assert lat.quantile(hist(b1=10, inf=1), 0.95) is None     # the 11th of 11 took over an hour
    assert lat.quantile(hist(b1=10, inf=1), 0.5) == 1.0
    with pytest.raises(ValueError):
        lat.quantile(hist(b1=1), 0)


def test_the_estimate_never_is_below_the_true_quantile_and_at_most_one_bucket_above():
    rng = random.Random(7)
    for _ in range(200):
        values = sorted(rng.choice([rng.uniform(0, 4000), rng.expovariate(1 / 20)]) for _ in range(rng.randint(1, 60)))
        h = [0] * N
        for v in values:
            h[lat.bucket_index(v)] += 1
        for q in (0.5, 0.95):
            true = values[max(1, math.ceil(q * len(values) - 1e-9)) - 1]   # the nearest rank
            est = lat.quantile(h, q)
            i = lat.bucket_index(true)
            if i == len(lat.BOUNDS):
                assert est is None
            else:
                assert est == lat.BOUNDS[i] and est >= true
                assert est - true <= lat.BOUNDS[i] - (lat.BOUNDS[i - 1] if i else 0)


def test_merging_histograms_is_adding_them_and_the_merge_of_parts_is_the_histogram_of_the_whole():
    a, b = hist(b1=2, b5=1), hist(b5=3, inf=1)
    assert lat.merge([a, b]) == hist(b1=2, b5=4, inf=1)
    assert lat.merge([]) == [0] * N
    assert lat.merge([a]) == a and a == hist(b1=2, b5=1)   # the parts are not changed
    with pytest.raises(ValueError):
        lat.merge([a, [1, 2]])
    # Split any list of latencies in any way: the merged parts equal the histogram of all.
    rng = random.Random(3)
    values = [rng.uniform(0, 5000) for _ in range(500)]
    whole = lat.histogram(Counter(lat.counter_name(v) for v in values))
    parts = [lat.histogram(Counter(lat.counter_name(v) for v in values[i:i + 37])) for i in range(0, 500, 37)]
    assert lat.merge(parts) == whole and sum(whole) == 500
    # Counters that are not latency buckets are ignored.
    assert lat.histogram({"requests.sent": 4, "latency.5": 2, "latency.inf": 1}) == hist(b5=2, inf=1)


# ------------------------------------------------------------------ the report's latency section (pure)

H = int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp())


def bucket(hour: int, account: str, category: str = "", **by_bound: int) -> Bucket:
    counts = Counter({f"latency.{k[1:] if k.startswith('b') else k}": n for k, n in by_bound.items()})
    counts["requests.sent"] = sum(by_bound.values())
    return Bucket(H + hour * 3600, account, category, counts)


def test_the_report_gives_p50_p95_per_hour_and_the_slowest_account_by_p95():
    buckets = [bucket(0, "fast@x", "a", b1=8, b2=2), bucket(0, "fast@x", "b", b2=1),   # two categories, merged
               bucket(0, "slow@x", "a", b5=1, b60=1),
               bucket(2, "fast@x", "", b10=1), bucket(2, "other@x", "", b10=1, b1=1),  # tie on p95: then p50...
               Bucket(H + 3600, "idle@x", "", Counter({"requests.refused": 1}))]      # nothing sent that hour
    window = Window(datetime.fromtimestamp(H, timezone.utc), datetime.fromtimestamp(H + 86400, timezone.utc), "hour")
    out = latency_section(buckets, window)
    assert out["bounds"] == list(lat.BOUNDS)
    first, second = out["series"]
    assert first["start"] == "2026-12-01T00:00:00+00:00" and first["count"] == 13
    assert (first["p50"], first["p95"]) == (1.0, 60.0)       # 7th of 13 in (0,1]; 13th in (30,60]
    assert first["slowest"] == {"account": "slow@x", "count": 2, "p50": 5.0, "p95": 60.0}
    assert second["start"] == "2026-12-01T02:00:00+00:00"
    assert second["slowest"]["account"] == "fast@x"          # p95 10 both; p50 10 beats 1
    assert out["totals"]["count"] == 16 and out["totals"]["histogram"] == hist(b1=9, b2=3, b5=1, b10=2, b60=1)
    assert [a["account"] for a in out["accounts"]] == ["slow@x", "fast@x", "other@x"]
    # By day: one bucket, the same totals.
    day = latency_section(buckets, Window(window.since, window.until, "day"))
    assert [s["start"] for s in day["series"]] == ["2026-12-01T00:00:00+00:00"]
    assert day["series"][0]["histogram"] == out["totals"]["histogram"] and day["series"][0]["p95"] == 60.0


def test_the_latency_section_is_part_of_the_report_shape_and_valid_against_the_schema():
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[1] / "shared/schema/report.v1.json").read_text())
    window = Window(datetime.fromtimestamp(H, timezone.utc), datetime.fromtimestamp(H + 86400, timezone.utc), "hour")
    body = shape(iter([bucket(0, "a@x", "", b5=1, inf=1)]), window)    # any iterable, read twice
    assert body["totals"]["requests"]["sent"] == 2
    assert body["latency"]["totals"] == {"count": 2, "histogram": hist(b5=1, inf=1), "p50": 5.0, "p95": None}
    validator = jsonschema.Draft202012Validator(schema["properties"]["latency"] | {"$defs": schema["$defs"]})
    validator.validate(body["latency"])
    empty = shape([], window)["latency"]
    assert empty == {"bounds": list(lat.BOUNDS), "series": [], "accounts": [],
                     "totals": {"count": 0, "histogram": [0] * N, "p50": None, "p95": None}}
    validator.validate(empty)


# ------------------------------------------------------------------ in the aggregates (memory, then Azurite)


def test_a_latency_rides_the_outcomes_row_and_adds_nothing_to_flush():
    agg = Aggregates(table=None, flush_seconds=0)
    agg.outcome(T0, "news@contoso.com", "orders", "sent", internal=1)
    agg.latency(T0, "news@contoso.com", "orders", 7.5)
    agg.outcome(T0 + 1, "news@contoso.com", "orders", "sent", internal=1)
    agg.latency(T0 + 1, "news@contoso.com", "orders", 0.2)
    assert len(agg._buffer) == 1          # one row to merge, as without latency
    (counts, _, _), = agg._buffer.values()
    assert counts == Counter({"requests.sent": 2, "recipients.internal": 2, "latency.10": 1, "latency.1": 1})
    agg.latency(T0, "news@contoso.com", "orders", "not a number")   # type: ignore[arg-type]  # never raises
    assert len(agg._buffer) == 1


def test_latency_respects_the_category_cap():
    agg = Aggregates(table=None, flush_seconds=0, max_categories=2)
    for c in ("a", "b", "c", "d"):
        agg.outcome(T0, "news@contoso.com", c, "sent")
        agg.latency(T0, "news@contoso.com", c, 3)
    assert sorted(k[2] for k in agg._buffer) == ["a", "b", "other"]
    assert agg._buffer[(int(T0), "news@contoso.com", "other")][0]["latency.5"] == 2


def table(conn: str, name: str) -> TableClient:
    return TableClient.from_connection_string(conn, name)


def histograms(buckets) -> dict[tuple[int, str], list[int]]:
    out: dict[tuple[int, str], list[int]] = {}
    for b in buckets:
        key = (b.start, b.account)
        out[key] = lat.merge([out.get(key, [0] * N), lat.histogram(b.counts)])
    return {k: v for k, v in out.items() if sum(v)}


def test_histograms_from_racing_writers_on_shards_and_from_a_closed_days_rollup_equal_what_was_recorded(storage):
    """Six processes record latencies into the same hours (they race, and spread over shards); a
    reader of the open day sums the shards; once the day is closed, its rollup (one row per
    account and category) holds the same histograms, and a late latency makes it stale, not lost."""
    name = f"{storage.table_prefix}lat"
    rng = random.Random(11)
    recorded: list[tuple[float, str, float]] = [
        (T0 - rng.randrange(3) * 3600 + rng.uniform(0, 3599), rng.choice(["news@contoso.com", "alerts@contoso.com"]),
         rng.choice([0.5, 1.5, 4, 8, 25, 45, 100, 250, 500, 1000, 3000, 9000])) for _ in range(240)]
    expected: dict[tuple[int, str], list[int]] = {}
    for at, account, seconds in recorded:
        key = (int(at // 3600) * 3600, account)
        expected.setdefault(key, [0] * N)[lat.bucket_index(seconds)] += 1
    day = datetime.fromtimestamp(T0, timezone.utc).replace(hour=0)
    later = (day + timedelta(days=2)).timestamp()

    async def writer(seed: int, part: list[tuple[float, str, float]]) -> Aggregates:
        async with table(storage.connection_string, name) as t:
            agg = Aggregates(t, flush_seconds=0, shards=4, rng=random.Random(seed), clock=lambda: T0)
            for i, (at, account, seconds) in enumerate(part):
                agg.outcome(at, account, "orders", "sent")
                agg.latency(at, account, "orders", seconds)
                if i % 7 == 6:
                    await agg.flush()
                    await asyncio.sleep(0)
            await agg.flush()
            return agg

    async def main():
        writers = await asyncio.gather(*(writer(s, recorded[s::6]) for s in range(6)))
        async with table(storage.connection_string, name) as t:
            open_day = await Aggregates(t, clock=lambda: T0).read(day, day + timedelta(days=1))
            builder = Aggregates(t, clock=lambda: later)
            built = await builder.read(day, day + timedelta(days=1))
            user = Aggregates(t, clock=lambda: later)
            rolled = await user.read(day, day + timedelta(days=1))
            late = Aggregates(t, flush_seconds=0, clock=lambda: later)
            late.outcome(T0, "news@contoso.com", "orders", "sent")
            late.latency(T0, "news@contoso.com", "orders", 2)
            await late.flush()
            after = await Aggregates(t, clock=lambda: later).read(day, day + timedelta(days=1))
        return writers, open_day, built, rolled, after, builder.stats, user.stats

    writers, open_day, built, rolled, after, builder_stats, user_stats = asyncio.run(main())
    assert sum(w.stats.races for w in writers) > 0            # they really raced (shards were used)
    assert histograms(open_day) == histograms(built) == histograms(rolled) == expected
    assert builder_stats.rollups_written == 1 and user_stats.rollups_used == 1
    late_key = (int(T0), "news@contoso.com")
    want = {**expected, late_key: lat.merge([expected.get(late_key, [0] * N), hist(b2=1)])}
    assert histograms(after) == want


def test_the_ledger_tool_prints_the_latency_after_its_table():
    from shared.reporting.report import render_text

    window = Window(datetime.fromtimestamp(H, timezone.utc), datetime.fromtimestamp(H + 7200, timezone.utc), "hour")
    doc = {**shape([bucket(0, "a@x", "", b5=2, inf=1), bucket(1, "b@x", "c", b1=1)], window),
           "since": "s", "until": "u", "bucket": "hour"}
    lines = render_text(doc).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("latency (s)")))
    assert [line.split() for line in lines[at + 1:]] == [
        ["2026-12-01T00:00:00+00:00", "3", "5", ">3600", "a@x", "(>3600)"],
        ["2026-12-01T01:00:00+00:00", "1", "1", "1", "b@x", "(1)"],
        ["total", "4", "5", ">3600", "a@x", "(>3600)"]]
