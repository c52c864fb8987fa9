"""Wiring: the one place that builds settings -> clients -> stages, once per process, and the entry
points the triggers in function_app.py call. Stages never import this module (tests/test_architecture.py).

Stages other than send are imported when their trigger first runs, to keep cold start short.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from shared import telemetry
from shared.send.stage import Handled, Relay
from shared.settings import SETTINGS, Settings

# --- one Relay per event loop (the Python worker keeps one loop for the process) -----------------

_exit_hook = None
_relays: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, asyncio.Task]] = weakref.WeakKeyDictionary()


async def get_relay() -> Relay:
    """The process's Relay, built on first use (cold start pays for it once). A different set of
    app settings (a local host restarted with new ones) gets its own Relay."""
    loop = asyncio.get_running_loop()
    key = tuple(os.environ.get(spec.name) for spec in SETTINGS)
    global _exit_hook
    if not _exit_hook:
        _exit_hook = atexit.register(_close_at_exit)
    per_loop = _relays.setdefault(loop, {})
    task = per_loop.get(key)
    if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
        settings = Settings.from_env()
        telemetry.configure(settings)
        task = per_loop[key] = loop.create_task(Relay.create(settings))
    return await task


async def close_relays() -> None:
    """Close the Relays of the running loop (a local host shutting down; Azure just ends the process)."""
    per_loop = _relays.pop(asyncio.get_running_loop(), {})
    for task in per_loop.values():
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().close()


def _close_at_exit() -> None:
    """A local host exiting with its loop still running (a daemon thread): close the sessions
    cleanly instead of leaving them to the garbage collector. In Azure the process just ends."""
    for loop in list(_relays.keys()):
        if loop.is_running() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(close_relays(), loop).result(timeout=5)
            except Exception:  # best effort at interpreter exit
                pass


# --- the priority lane: the same stage on another queue -------------------------------------------

BULK, PRIORITY = "bulk", "priority"
# The priority lane's Relay, per bulk Relay (so a new set of settings gets a new lane too).
_priority_lanes: weakref.WeakKeyDictionary[Relay, Relay] = weakref.WeakKeyDictionary()


async def get_lane(lane: str = BULK) -> Relay:
    """The send stage for one lane. The priority lane is the process's Relay on MAIL_QUEUE_PRIORITY:
    the stage puts deferred copies (and pacers) back on `relay.queue`, so the lane has its own queue
    and, with it, its own backlog readings and pacer chain; everything else is the bulk Relay's own
    objects: governor, scheduler (health reads, budget blocks), SMTP pool, ledger, aggregates,
    suppression list, counters. Only the bulk Relay is closed (`close_relays`): the lane owns nothing of its own."""
    relay = await get_relay()
    if lane == BULK:
        return relay
    if lane != PRIORITY:
        raise ValueError(f"unknown lane {lane!r}")
    priority = _priority_lanes.get(relay)
    if priority is None:
        queue = await relay.storage.queue(relay.settings.priority_queue)
        await relay.preparer.suppression_list()  # opened now, to be the lane's too
        priority = _priority_lanes.setdefault(relay, _on_queue(relay, queue))
    return priority


def _on_queue(relay: Relay, queue: Any) -> Relay:
    lane = Relay(
        relay.settings,
        storage=relay.storage,
        smtp=relay.smtp,
        governor=relay.governor,
        ledger=relay.ledger,
        queue=queue,
        payloads=relay.payloads,
        limits=relay.limits,
        clock=relay.clock,
        rng=relay.rng,
        aggregates=relay.aggregates,
    )
    # One scheduler per process: its health view and the daily budget's block are the process's.
    lane.scheduler = relay.scheduler
    lane.preparer.suppressions = relay.preparer.suppressions  # one suppression list (and snapshot) per process
    lane.instruments, lane.stats, lane.sleep = relay.instruments, relay.stats, relay.sleep
    lane.events = relay.events  # one set of events targets per process, closed with the bulk Relay
    return lane


# --- entry points of the triggers ------------------------------------------------------------------


@contextmanager
def invocation(context: Any) -> Iterator[None]:
    """Around every trigger: the invocation's spans and logs are children of the host's invocation
    span (`context.trace_context`, W3C traceparent), so host and app telemetry share one trace."""
    with telemetry.invocation(getattr(context, "trace_context", None)):
        yield


async def handle_queue_message(body: bytes, queue_message_id: str, dequeue_count: int, lane: str = BULK) -> Handled:
    """`send_mail` (lane "bulk", MAIL_QUEUE) and `send_mail_priority` (lane "priority",
    MAIL_QUEUE_PRIORITY): one mail request from the lane's queue."""
    relay = await get_lane(lane)
    return await relay.handle(body, queue_message_id, dequeue_count)


async def status_json() -> str:
    """The governor's live view of the accounts, as JSON (the `status` HTTP function)."""
    from shared.reporting.status import delivery_last_24h, last_24h_since, status_report, to_json, usage_from_buckets

    relay = await get_relay()
    now = relay.clock()
    states, tenant = await relay.governor.read()
    delivery = None
    aggregates = relay.aggregates
    usage = relay.governor.config.plain and aggregates is not None
    traced = relay.settings.delivery_enabled and aggregates is not None
    if aggregates is not None and (usage or traced):
        # One read of the aggregates serves both: the last 24 hours hold the daily window so far.
        buckets = await aggregates.read(last_24h_since(now), datetime.fromtimestamp(now + 1, UTC))
        if usage:
            # The governor counts nothing on the plain path: today's use is in the aggregates.
            states = usage_from_buckets(states, buckets, relay.governor.config, now)
        if traced:
            delivery = await delivery_last_24h(aggregates, now, buckets)
    return to_json(
        status_report(states, tenant, relay.governor.config, relay.settings.limits_profile, now, delivery=delivery)
    )


async def report_response(params: Mapping[str, str]) -> tuple[int, str]:
    """(HTTP status, JSON body) of `GET /api/report` in this worker process."""
    from shared.reporting.report import ReportRequestError, build_report, parse_window

    relay = await get_relay()
    now = relay.clock()
    try:
        window = parse_window(params, now, relay.settings.report_max_days, relay.settings.ledger_retention)
    except ReportRequestError as exc:
        return 400, json.dumps({"error": str(exc)})
    assert relay.aggregates is not None  # Relay.create always builds them
    report = await build_report(
        window=window,
        aggregates=relay.aggregates,
        governor=relay.governor,
        mail_queue=relay.queue,
        poison_queue=await relay.storage.queue(relay.settings.poison_queue),
        settings=relay.settings,
        now=now,
    )
    return 200, json.dumps(report, separators=(",", ":"))


async def send_response(body: bytes, content_length: str | None) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, JSON body, headers) of `POST /api/send`: one request onto the mail queue, or the
    priority queue for `"priority": "high"`."""
    from shared.send.intake import intake_for

    relay = await get_relay()
    intake = intake_for(relay, priority_queue=(await get_lane(PRIORITY)).queue)
    answer = await intake.submit(body, content_length)
    return answer.status, json.dumps(answer.body, separators=(",", ":")), dict(answer.headers)


async def request_status_response(request_id: str) -> tuple[int, str]:
    """(HTTP status, JSON body) of `GET /api/requests/{id}`: one request's state from the ledger."""
    from shared.delivery.trace import DeliveryStore
    from shared.reporting.request_status import request_view
    from shared.send.contract import RequestRefused, parse_request_id

    not_found = 404, json.dumps({"error": "not-found", "message": "no request with this id"})
    try:
        if parse_request_id(request_id) is None:
            return not_found
    except RequestRefused:
        return not_found  # never echoed: an id that is not one may hold anything
    relay = await get_relay()
    entry = await relay.ledger.get(request_id)
    if entry is None:
        return not_found
    delivery = DeliveryStore(
        await relay.storage.table(relay.settings.delivery_table), relay.settings.recipient_hash_key
    )
    summary = await delivery.summary(request_id)
    return 200, json.dumps(request_view(entry, summary), separators=(",", ":"))


async def suppression_response(action: str, body: bytes) -> tuple[int, str]:
    """(HTTP status, JSON body) of `POST /api/suppressions/check` and `/remove` (body `{"address": ...}`)."""
    from shared.send.suppression import admin_answer

    relay = await get_relay()
    status, doc = await admin_answer(await relay.preparer.suppression_list(), action, body)
    return status, json.dumps(doc, separators=(",", ":"))


def dashboard_page() -> Any:
    """The operations dashboard page (body and headers)."""
    from shared.reporting.dashboard import page

    return page()


async def welcome_timer(past_due: bool = False) -> Any:
    """`welcome_new_users`: one scan when WELCOME_ENABLED is true."""
    from shared.welcome.scan import handle_timer

    return await handle_timer(past_due=past_due)


async def retention_timer() -> Any:
    """`purge_expired`: one bounded pass over the app's tables."""
    from shared.retention import handle_timer

    return await handle_timer()


async def delivery_timer(past_due: bool = False) -> Any:
    """`confirm_delivery`: one reconciliation when DELIVERY_TRACE_ENABLED is true."""
    from shared.delivery.trace import handle_timer

    return await handle_timer(past_due=past_due)


async def health_timer() -> Any:
    """`sample_health`: queue depths, the oldest message's age and account health as OpenTelemetry
    gauges for the alert rules (infra/modules/alerts.bicep), exported before the timer returns."""
    from shared.reporting.health import sample
    from shared.telemetry import flush_metrics

    relay = await get_relay()
    result = await sample(
        governor=relay.governor,
        mail_queue=relay.queue,
        poison_queue=await relay.storage.queue(relay.settings.poison_queue),
        instruments=relay.instruments,
        now=relay.clock(),
    )
    await asyncio.to_thread(flush_metrics)
    return result
