"""The pure part of delivery confirmation: the trace filters Graph accepts, the windows a run reads,
the request budget, Message-ID matching, and exact status deltas."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.send.mime import message_id
from shared.delivery.policy import (MAX_LOOKBACK, MAX_SPAN, AccountCursor, FilterRefused, RecipientStatus, RequestBudget,
                                 TraceConfig, TraceRow, after_span, check_window, count_delta, counts, delivery_rates,
                                 merge_status, normal_status, only_sent, parse_message_id, parse_time, plan_spans, retry_at,
                                 row_problem, sent_ranges, trace_filter, visit_order, narrower, wider, MIN_SPAN)

NOW = datetime(2026, 12, 2, 3, 0, 0, 500000, tzinfo=timezone.utc)
CFG = TraceConfig()


def test_a_trace_filter_names_the_sender_and_both_date_bounds():
    text = trace_filter("news@contoso.com", NOW - timedelta(hours=1), NOW - timedelta(minutes=1), NOW)
    assert text == ("senderAddress eq 'news@contoso.com' and receivedDateTime ge 2026-12-02T02:00:00Z "
                    "and receivedDateTime le 2026-12-02T02:59:00Z")
    # A quote in an address cannot end the OData string early.
    assert "'o''brien@contoso.com'" in trace_filter("o'brien@contoso.com", NOW - timedelta(hours=1), NOW, NOW)


@pytest.mark.parametrize("start,end,why", [
    (NOW - timedelta(days=10, seconds=1), NOW, "10 days"),
    (NOW - timedelta(days=91), NOW - timedelta(days=85), "90 days"),
    (NOW - timedelta(hours=1), NOW + timedelta(seconds=1), "after now"),
    (NOW, NOW, "not before"),
    (NOW, NOW - timedelta(hours=1), "not before"),
])
def test_a_filter_graph_would_refuse_is_refused_before_sending(start, end, why):
    with pytest.raises(FilterRefused, match=why):
        trace_filter("news@contoso.com", start, end, NOW)


def test_the_edges_graph_accepts_are_accepted():
    check_window(NOW - MAX_SPAN, NOW, NOW)
    check_window(NOW - MAX_LOOKBACK, NOW - MAX_LOOKBACK + MAX_SPAN, NOW)
    with pytest.raises(FilterRefused):
        trace_filter("not-an-address", NOW - timedelta(hours=1), NOW, NOW)


cursors = st.builds(
    AccountCursor, st.just("news@contoso.com"),
    st.one_of(st.none(), st.timedeltas(timedelta(0), timedelta(days=200)).map(lambda d: NOW - d)),
    st.one_of(st.none(), st.timedeltas(timedelta(0), timedelta(days=200)).map(lambda d: NOW - d)),
)
configs = st.builds(TraceConfig, overlap=st.timedeltas(timedelta(0), timedelta(days=2)),
                    max_age=st.timedeltas(timedelta(minutes=1), timedelta(days=89, hours=23)),
                    span=st.timedeltas(timedelta(seconds=1), MAX_SPAN).filter(lambda d: d >= timedelta(minutes=5)),
                    end_lag=st.timedeltas(timedelta(0), timedelta(minutes=5)))


@given(cursors, configs, st.timedeltas(timedelta(0), timedelta(days=30)))
def test_every_planned_window_is_one_graph_accepts_and_they_tile_without_gaps(cursor, cfg, later):
    now = NOW + later
    spans = plan_spans(cursor, now, cfg)
    for start, end in spans:
        trace_filter("news@contoso.com", start, end, now)   # raises if Graph would refuse it
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start == end
    if spans and cursor.watermark is not None:
        wanted = cursor.watermark - cfg.overlap
        if cursor.recheck_from is not None:
            wanted = min(wanted, cursor.recheck_from)
        # Never later than asked, unless the max age (or Graph's 90 days) cuts it.
        assert spans[0][0] <= max(wanted, now - cfg.max_age) + timedelta(seconds=1)


def test_a_first_run_looks_back_the_max_age_and_later_runs_the_overlap():
    first = plan_spans(AccountCursor("a@x.com"), NOW, CFG)
    assert first[0][0] >= NOW - CFG.max_age and first[0][0] - (NOW - CFG.max_age) < timedelta(seconds=1)
    assert first[-1][1] == (NOW - CFG.end_lag).replace(microsecond=0)
    assert all(end - start <= CFG.span for start, end in first)
    later = plan_spans(AccountCursor("a@x.com", watermark=NOW - timedelta(minutes=10)), NOW, CFG)
    [(start, end)] = later
    assert start == (NOW - timedelta(minutes=40)).replace(microsecond=0)   # watermark - overlap, down to the second
    assert end == (NOW - CFG.end_lag).replace(microsecond=0)


def test_an_open_recipient_pulls_the_next_window_back_until_it_is_older_than_the_max_age():
    cursor = AccountCursor("a@x.com", watermark=NOW - timedelta(minutes=10), recheck_from=NOW - timedelta(days=1))
    assert plan_spans(cursor, NOW, CFG)[0][0] <= NOW - timedelta(days=1) + timedelta(seconds=1)
    old = AccountCursor("a@x.com", watermark=NOW - timedelta(minutes=10), recheck_from=NOW - timedelta(days=5))
    assert plan_spans(old, NOW, CFG)[0][0] >= NOW - CFG.max_age


def test_a_stopped_run_keeps_everything_after_the_last_finished_span_for_the_next():
    cursor = AccountCursor("a@x.com", watermark=NOW, recheck_from=None)
    stopped = after_span(cursor, NOW - timedelta(days=2), None, finished=False)
    assert stopped.watermark == NOW and stopped.recheck_from == NOW - timedelta(days=2)
    stopped = after_span(cursor, NOW - timedelta(days=2), NOW - timedelta(days=2, hours=3), finished=False)
    assert stopped.recheck_from == NOW - timedelta(days=2, hours=3)
    done = after_span(cursor, NOW + timedelta(minutes=10), None, finished=True)
    assert done.watermark == NOW + timedelta(minutes=10) and done.recheck_from is None


def test_the_budget_allows_n_requests_in_any_five_minutes():
    budget = RequestBudget(3, [0.0, 100.0])
    assert budget.take(200.0) and not budget.take(250.0)
    assert budget.free_at(250.0) == 300.0
    assert budget.take(300.5) and not budget.take(301.0)
    assert budget.available(401.0) == 1   # 100.0 left the window; 200 and 300.5 remain


def test_only_our_message_ids_match_with_their_chunk():
    base = message_id("order-1042", "contoso.com", key=b"k")
    digest = base[1:41]
    assert parse_message_id(base) == (digest, 0, "contoso.com")
    assert parse_message_id(message_id("order-1042", "Contoso.com", 3, key=b"k")) == (digest, 3, "contoso.com")
    for other in ["<CAF=abc@mail.gmail.com>", "", None, "<" + "g" * 40 + "@x.com>", base.replace("@", "@@")]:
        assert parse_message_id(other) is None


def test_statuses_are_graphs_values_whatever_the_case():
    assert normal_status("FilteredAsSpam") == "filteredAsSpam"
    assert normal_status("Delivered") == "delivered"
    assert normal_status("somethingNew") == "unknownFutureValue"
    assert parse_time("2026-12-02T02:59:00.1234567Z") == datetime(2026, 12, 2, 2, 59, 0, 123456, tzinfo=timezone.utc)


def test_reading_the_same_rows_again_gives_no_delta():
    row = TraceRow("t", "d" * 40, 0, "contoso.com", "h1", "pending", NOW)
    first = merge_status(None, row)
    again = merge_status(first, row)
    assert again == first
    before = counts([first.status])
    assert count_delta(before, counts([again.status])) == {}
    delivered = merge_status(again, TraceRow("t", "d" * 40, 0, "contoso.com", "h1", "delivered", NOW))
    assert count_delta(before, counts([delivered.status])) == {"pending": -1, "delivered": 1}


def test_a_follow_up_transaction_wins_over_an_earlier_one_for_the_same_recipient():
    follow_up = merge_status(None, TraceRow("t2", "d" * 40, 2, "c", "h", "delivered", NOW))
    earlier = merge_status(follow_up, TraceRow("t1", "d" * 40, 0, "c", "h", "failed", NOW - timedelta(hours=1)))
    assert earlier.status == "delivered" and earlier.chunk == 2
    kept = RecipientStatus("failed", 0, NOW, "Fail: mailbox unavailable")
    assert merge_status(kept, TraceRow("t", "d" * 40, 0, "c", "h", "failed", NOW)).reason == kept.reason


@given(st.lists(st.sampled_from(["delivered", "failed", "pending", "quarantined"]), max_size=20),
       st.lists(st.sampled_from(["delivered", "failed", "pending", "quarantined"]), max_size=20))
def test_deltas_add_up_to_the_new_counts(old, new):
    before, after = counts(old), counts(new)
    delta = count_delta(before, after)
    assert {k: before.get(k, 0) + delta.get(k, 0) for k in set(before) | set(after) if before.get(k, 0) + delta.get(k, 0)} == after
    assert 0 not in delta.values()


def test_rates_are_shares_of_traced_recipients():
    rates = delivery_rates({"delivered": 6, "expanded": 1, "failed": 1, "quarantined": 1, "pending": 1})
    assert rates == {"traced": 10, "delivered": 0.7, "failed": 0.1, "quarantined": 0.1, "filteredAsSpam": 0.0, "open": 0.1}
    assert delivery_rates({})["delivered"] is None


def test_a_config_graph_could_never_serve_is_refused():
    for bad in (dict(span=timedelta(days=11)), dict(max_age=timedelta(days=90)), dict(page_size=5001)):
        with pytest.raises(ValueError):
            TraceConfig(**bad)


def test_retry_after_is_capped_and_never_overflows():
    assert retry_at(NOW, 1e11) == NOW + timedelta(hours=1)
    assert retry_at(NOW, 1e15) == NOW + timedelta(hours=1)
    assert retry_at(NOW, float("inf"), cap=timedelta(minutes=5)) == NOW + timedelta(minutes=5)
    assert retry_at(NOW, 30) == NOW + timedelta(seconds=30) and retry_at(NOW, None) == NOW + timedelta(seconds=60)


def test_a_row_with_a_field_of_the_wrong_type_is_named_not_raised():
    good = {"id": "t", "messageId": "<a@b>", "recipientAddress": "x@contoso.com", "status": "delivered",
            "receivedDateTime": "2026-12-02T02:59:00Z", "senderAddress": "news@contoso.com"}
    assert row_problem(good) is None
    assert row_problem({**good, "messageId": 12345}) == "messageId is not a string"
    assert row_problem({**good, "recipientAddress": None}) == "recipientAddress is not a string"
    assert row_problem({**good, "status": ["delivered"]}) == "status is not a string"
    assert row_problem({**good, "receivedDateTime": "2026-13-45T99:00:00Z"}) == "receivedDateTime is not a date-time"


def test_accounts_least_recently_finished_go_first():
    accounts = [f"a{i}@x.com" for i in range(4)]
    cursors = {a: AccountCursor(a) for a in accounts}
    assert visit_order(accounts, cursors) == accounts
    cursors["a0@x.com"] = AccountCursor("a0@x.com", finished=NOW)
    cursors["a1@x.com"] = AccountCursor("a1@x.com", finished=NOW - timedelta(minutes=10))
    assert visit_order(accounts, cursors) == ["a2@x.com", "a3@x.com", "a1@x.com", "a0@x.com"]


def test_only_windows_around_hours_with_mail_are_read():
    hour = int(datetime(2026, 12, 2, 1, tzinfo=timezone.utc).timestamp())
    first = plan_spans(AccountCursor("a@x.com"), NOW, CFG)      # 12 windows back to now - P3D
    assert len(first) == 12
    spans = only_sent(first, sent_ranges([hour], CFG.send_margin))
    assert spans == [(datetime(2026, 12, 2, 0, 50, tzinfo=timezone.utc), datetime(2026, 12, 2, 2, 10, tzinfo=timezone.utc))]
    assert only_sent(first, []) == []


def test_windows_cut_to_hours_with_mail_stay_within_the_span():
    # An account that sent every hour of the last 3 days: its first run still reads PT6H windows
    # (progress saved after each), never one 3-day window; with a max age of 30 days, never a
    # window longer than Graph's 10 days (which would be refused, and the run stop there each time).
    for cfg in (CFG, TraceConfig(max_age=timedelta(days=30), span=MAX_SPAN)):
        spans = plan_spans(AccountCursor("a@x.com"), NOW, cfg)
        hours = [int((NOW - timedelta(hours=h)).timestamp()) // 3600 * 3600 for h in range(0, 24 * 31)]
        windows = only_sent(spans, sent_ranges(hours, cfg.send_margin))
        assert windows == spans
        for start, end in windows:
            check_window(start, end, NOW)
            assert end - start <= cfg.span
    # Pieces of neighbouring windows are still joined while the result is no longer than the span.
    hour = int(datetime(2026, 12, 2, 1, tzinfo=timezone.utc).timestamp())
    spans = [(NOW - timedelta(hours=3), NOW - timedelta(hours=2)), (NOW - timedelta(hours=2), NOW - timedelta(minutes=1))]
    assert only_sent(spans, sent_ranges([hour], CFG.send_margin)) == [
        (datetime(2026, 12, 2, 0, 50, tzinfo=timezone.utc), datetime(2026, 12, 2, 2, 10, tzinfo=timezone.utc))]


def test_the_overlap_is_re_read_only_where_rows_could_have_been_missing_when_read():
    from dataclasses import replace

    # Read a minute after its end (a run every 10 minutes): the overlap before it is read again.
    steady = AccountCursor("a@x.com", watermark=NOW - timedelta(minutes=10), finished=NOW - timedelta(minutes=9))
    assert plan_spans(steady, NOW, CFG)[0][0] == (NOW - timedelta(minutes=39)).replace(microsecond=0)
    # A window of a backlog read hours after its end: every row in it was there; go on from its end.
    backlog = AccountCursor("a@x.com", watermark=NOW - timedelta(hours=5), finished=NOW - timedelta(minutes=10))
    assert plan_spans(backlog, NOW, CFG)[0][0] == (NOW - timedelta(hours=5)).replace(microsecond=0)
    # A backlog read one 20-minute window a run (what the budget leaves): each run moves on by a
    # whole window. Re-reading the 30-minute overlap before each window, it moved back 10 minutes a run.
    cfg = TraceConfig(span=timedelta(minutes=20))
    cursor = AccountCursor("a@x.com", watermark=NOW - timedelta(days=1), finished=NOW - timedelta(days=1))
    now = NOW
    for _ in range(10):
        start, end = plan_spans(cursor, now, cfg)[0]
        cursor = replace(after_span(cursor, end, None, finished=False), finished=now)
        now += timedelta(minutes=10)
    # (The first window re-reads the overlap: that watermark was read right at its end.)
    assert cursor.watermark == (NOW - timedelta(days=1, minutes=30) + timedelta(minutes=20 * 10)).replace(microsecond=0)


def test_a_window_a_whole_budget_could_not_read_is_halved_and_widens_again_when_light():
    cursor = AccountCursor("a@x.com", watermark=NOW)
    narrow = narrower(cursor, NOW - timedelta(hours=6), NOW)
    assert narrow.span == timedelta(hours=3) and narrow.watermark == NOW
    assert narrower(narrow, NOW - timedelta(hours=1), NOW).span == timedelta(minutes=30)
    assert narrower(narrow, NOW - timedelta(seconds=30), NOW).span == MIN_SPAN
    spans = plan_spans(AccountCursor("a@x.com", watermark=NOW - timedelta(hours=2), span=timedelta(minutes=30)), NOW, CFG)
    assert len(spans) == 5 and all(end - start <= timedelta(minutes=30) for start, end in spans)
    assert wider(narrow, 40, CFG).span == timedelta(hours=3)          # 40 of 60 pages: kept
    assert wider(narrow, 15, CFG).span is None                         # back to DELIVERY_TRACE_SPAN
    assert wider(AccountCursor("a@x.com", span=timedelta(hours=1)), 15, CFG).span == timedelta(hours=2)
