"""The local demo: Azurite + HVE emulator + the function app under the local host, a sample batch
of mail requests, progress while they flow, a summary read from the ledger, then one mail through
POST /api/send and its GET /api/requests/<id> answer, the welcome scan and delivery confirmation,
a recipient HVE refuses for good (suppressed on the next request) and a priority request
overtaking a bulk backlog.

    python -m tools.demo [--requests tools/samples/demo-requests.json] [--keep] [--http-port 7071]

Everything listens on 127.0.0.1 only and stops at the end (Ctrl-C stops it early). With --keep it
prints the dashboard's URL and stays up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from shared.ledger import Ledger
from shared.send.producer import enqueue_requests
from shared.settings import Settings
from shared.storage import StorageClients
from shared.welcome.scan import run_scan
from shared.wiring import close_relays, get_relay
from tools.azurite import Azurite
from tools.devhost import DevHost, _background_loop
from tools.graph_standin import GraphStandIn
from tools.hve_emulator import EmulatorConfig, HveEmulator

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".local"
ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw", "billing@contoso.com": "billing-pw"}
# The one mail the demo sends through the HTTP door (POST /api/send), as docs/producers.md does.
HTTP_REQUEST = {"id": "demo-http-1", "to": ["Ann Example <ann@contoso.com>"], "subject": "Hello over HTTP",
                "category": "http", "text": "Hello Ann,\n\nthis one came through POST /api/send.\n"}
FINAL_STATES = ("sent", "refused", "dead")
# The suppression list: HVE refuses GONE for good at RCPT (550 5.1.1); the next request to GONE and
# OTHER leaves GONE out and sends to OTHER. The demo prints only their local parts ("olaf@").
GONE, OTHER = "Olaf Example <olaf@contoso.com>", "Bob Example <bob@contoso.com>"
# The priority lane: a bulk backlog on the mail queue, then one "priority": "high" POST /api/send.
BACKLOG = 300
URGENT = "Kim Example <kim@contoso.com>"
READERS = ["ann", "bob", "carla", "erin", "farid", "gita", "ines", "jon"]


def say(text: str) -> None:
    print(text, flush=True)


def demo_settings(connection_string: str, emulator: HveEmulator, graph: GraphStandIn) -> dict[str, str]:
    example = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    return {
        **example,
        "AzureWebJobsStorage": connection_string,
        "HVE_SMTP_PORT": str(emulator.port),
        "HVE_SMTP_CA_FILE": str(emulator.ca_file),
        "HVE_PASSWORDS": json.dumps(ACCOUNTS),
        "GRAPH_BASE_URL": graph.base_url,
        "GRAPH_DEV_TOKEN": graph.token,
    }


async def _ledger_view(settings: Settings) -> tuple[dict, int]:
    storage = StorageClients(settings)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                        settings.recipient_hash_key)
        summary = await ledger.summary()
        props = await (await storage.queue(settings.mail_queue)).get_queue_properties()
        return summary, props.approximate_message_count
    finally:
        await storage.close()


async def _enqueue_batch(settings: Settings, requests: list[dict]) -> None:
    storage = StorageClients(settings)
    try:
        # Most as a producer's SDK writes them, one the way a Functions output binding does (base64),
        # one bigger than a queue message (claim check through blob storage), one that is not JSON.
        await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container, requests[:1], encode_base64=True)
        await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container, requests[1:])
        big = {"id": "demo-claim-check", "to": ["ann@contoso.com"], "subject": "Annual report (large)",
               "html": "<h1>Annual report</h1>" + "<p>" + "Lorem ipsum dolor sit amet. " * 3000 + "</p>"}
        await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container, [big])
        await (await storage.queue(settings.mail_queue)).send_message('{"to": ["ann@contoso.com"], "subject": "truncated')
    finally:
        await storage.close()


def wait_and_report(host: DevHost, settings: Settings, started: float, limit: float = 180) -> dict:
    """Print progress until the queue is empty and the host idle; return the ledger summary."""
    last = ""
    while True:
        summary, queued = asyncio.run(_ledger_view(settings))
        by_state = summary["by_state"]
        line = "  ".join(f"{k} {by_state.get(k, 0)}" for k in ("sent", "deferred", "refused", "dead")) + f"  on queue {queued}"
        if line != last:
            say(f"  {time.monotonic() - started:5.1f}s  {line}")
            last = line
        if queued == 0:
            try:
                host.wait_until_idle(timeout=0.5)
                return summary
            except TimeoutError:
                pass
        if time.monotonic() - started > limit:
            say(f"  (stopping the wait after {limit:.0f} s)")
            return summary
        time.sleep(0.5)


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens there (a stable URL for the operator), else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def dashboard_url(host: DevHost) -> str:
    # The local host, like `func start`, checks no function key; `code=` is there so the URL has
    # the shape it has in Azure (?code=<function key>) and the page's key handling runs.
    return f"http://127.0.0.1:{host.http_port}/{host.route_prefix}/dashboard?code=local"


def http_call(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON answer) of one call to the local host, with a function key as in Azure (the local
    host, like `func start`, checks none)."""
    call = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8") if body is not None else None, method="POST" if body else "GET",
        headers={"Content-Type": "application/json", "x-functions-key": "local"})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 4xx/5xx: the body says why
        return exc.code, json.loads(exc.read() or b"{}")


def wait_final(status_url: str, limit: float = 60) -> tuple[int, dict, list[str]]:
    """GET the status URL until the request is final (or `limit` s): the last (status, answer) and
    the states seen on the way."""
    started, seen, view, status = time.monotonic(), [], {}, 0
    while True:
        status, view = http_call(status_url)
        state = view.get("state", "")
        if status == 200 and (not seen or seen[-1] != state):
            seen.append(state)
        if state in FINAL_STATES:
            break
        if time.monotonic() - started > limit:
            say(f"  (stopping the wait after {limit:.0f} s)")
            break
        time.sleep(0.2)
    return status, view, seen


def http_send(host: DevHost, limit: float = 60) -> dict:
    """One mail through POST /api/send on the local host, its status URL, and the GET /api/requests/<id>
    answer once the request is final (sent). Returns that answer."""
    say("\n== Over HTTP (POST /api/send on the local host) ==")
    base = f"http://127.0.0.1:{host.http_port}"
    url = f"{base}/{host.route_prefix}/send"
    status, accepted = http_call(url, HTTP_REQUEST)
    say(f"POST {url}  ->  {status} {json.dumps(accepted)}")
    if status != 202:
        return accepted
    status_url = base + accepted["status"]
    say(f"status URL  {status_url}")
    started = time.monotonic()
    status, view, seen = wait_final(status_url, limit)
    say(f"GET  {status_url}  ->  {status} {json.dumps(view)}")
    say(f"  states seen: {' -> '.join(seen)} ({time.monotonic() - started:.1f} s)")
    return view


def welcome_scan(settings: Settings, host: DevHost, graph: GraphStandIn) -> None:
    say("\n== Welcome scan (Microsoft Graph stand-in) ==")
    report = asyncio.run(run_scan(settings))
    say(report.summary())
    for decision in report.decisions:
        say(f"  {decision.outcome:8} {decision.user.display_name or decision.user.id}"
            + (f"  ({decision.reason})" if decision.reason else ""))
    wait_and_report(host, settings, time.monotonic())
    # A user whose mailbox was not ready gets it; the next scan welcomes only that user.
    pending = [d.user for d in report.decisions if d.outcome == "pending" and "mailbox" in d.reason]
    if pending:
        user = pending[0]
        graph.update_user(user.id, mail=user.user_principal_name)
        say(f"mailbox ready for {user.display_name}; scanning again")
        report = asyncio.run(run_scan(settings))
        say(report.summary())
        wait_and_report(host, settings, time.monotonic())


async def _flush_counts() -> None:
    await (await get_relay()).aggregates.flush()


def delivery_reconciliation(values: dict[str, str], emulator: HveEmulator, graph: GraphStandIn) -> None:
    """Message trace (Graph stand-in) fed from what the emulator accepted, some recipients failing,
    quarantined or still pending; one reconciliation; the per-recipient outcome, by status."""
    from shared.delivery.trace import DeliveryStore, reconcile
    from tools.ledger import render_show
    from tools.ledger import run as ledger_run

    say("\n== Delivery confirmation (message trace, Graph stand-in) ==")
    graph.set_outcome("hugo@contoso.com", "failed")
    graph.set_outcome("archive@contoso.com", "quarantined")
    graph.set_outcome("jon@contoso.com", [["pending", 0], ["delivered", 600]])
    fed = graph.feed_from(emulator)
    say(f"trace rows for {fed} accepted messages (hugo@ fails, archive@ is quarantined, jon@ still pending)")
    # The rows are seconds old: read up to now (in Azure a run ends a minute back, DELIVERY_TRACE_END_LAG).
    settings = Settings.from_env({**values, "DELIVERY_TRACE_END_LAG": "PT0S"})
    # The trace reads only the hours each account sent in, from the hourly aggregates; the worker
    # writes them every AGGREGATES_FLUSH_SECONDS (10). In Azure the run reads up to a minute back,
    # long flushed; the demo's mail is seconds old, so the worker's flush is done now instead.
    asyncio.run_coroutine_threadsafe(_flush_counts(), _background_loop()).result(timeout=30)
    time.sleep(1.1)
    tally = asyncio.run(reconcile(settings))
    say(tally.summary())

    async def totals() -> dict[str, int]:
        storage = StorageClients(settings)
        try:
            store = DeliveryStore(await storage.table(settings.delivery_table), settings.recipient_hash_key)
            counts: dict[str, int] = {}
            for summary in await store.summaries_since(datetime.now(UTC) - timedelta(days=1)):
                for status, n in summary["delivery"].items():
                    counts[status] = counts.get(status, 0) + n
            return counts
        finally:
            await storage.close()

    counts = asyncio.run(totals())
    say("recipients by delivery status:  " + "  ".join(
        f"{status} {counts.get(status, 0)}" for status in ("delivered", "failed", "quarantined", "pending")))
    shown = asyncio.run(ledger_run(settings, "show", "demo-007", None))   # Hugo: failed, reason masked
    say("python -m tools.ledger show demo-007:")
    say("  " + render_show(shown).replace("\n", "\n  "))


def _address(name_addr: str) -> str:
    return name_addr.split("<")[-1].rstrip(">").lower()


def _local(name_addr: str) -> str:
    """What the demo prints of an address: its local part ("olaf@"), as in its other lines."""
    return _address(name_addr).split("@")[0] + "@"


def suppression(host: DevHost, emulator: HveEmulator, limit: float = 60) -> dict:
    """A recipient HVE refuses for good at RCPT goes on the suppression list; the next request to it
    and another recipient is sent to the other one only (`suppressed 1`). Returns that request's
    GET /api/requests/<id> answer."""
    say("\n== Suppression list (docs/suppression.md) ==")
    base = f"http://127.0.0.1:{host.http_port}/{host.route_prefix}"
    # The host is idle: the next RCPT is this request's. HVE quotes the recipient, as Exchange does.
    emulator.fail_next(1, f"550 5.1.1 <{_address(GONE)}>: Recipient address rejected: User unknown", stage="RCPT")
    view: dict = {}
    for rid, to in (("demo-gone-1", [GONE]), ("demo-gone-2", [GONE, OTHER])):
        before = len(emulator.accepted())
        status, accepted = http_call(f"{base}/send", {"id": rid, "to": to, "subject": "Your statement", "category": "http",
                                                      "text": "Hello,\n\nyour statement is ready.\n"})
        if status != 202:
            say(f"POST /{host.route_prefix}/send {rid}  ->  {status} {json.dumps(accepted)}")
            return accepted
        _, view, _ = wait_final(f"http://127.0.0.1:{host.http_port}{accepted['status']}", limit)
        went = sorted({_local(r) for m in emulator.accepted()[before:] for r in m.recipients})
        say(f"{rid}  to {', '.join(_local(a) for a in to):12}  ->  {view.get('state')}  suppressed {view.get('suppressed')}"
            f"  last code {view.get('last_code')}  HVE accepted: {', '.join(went) or 'none'}")
        if rid == "demo-gone-1":  # the address goes in the body, never in a URL, and is not echoed
            status, answer = http_call(f"{base}/suppressions/check", {"address": _address(GONE)})
            say(f"POST /{host.route_prefix}/suppressions/check ({_local(GONE)})  ->  {status} {json.dumps(answer)}")
    return view


async def _enqueue_backlog(settings: Settings, requests: list[dict]) -> None:
    storage = StorageClients(settings)
    try:
        queue = await storage.queue(settings.mail_queue)
        lanes = 16  # a producer writing in parallel: the backlog is on the queue within a second or two

        async def lane(part: list[dict]) -> None:
            for request in part:
                await queue.send_message(json.dumps(request, separators=(",", ":")), time_to_live=-1)

        await asyncio.gather(*(lane(requests[i::lanes]) for i in range(lanes)))
    finally:
        await storage.close()


def priority_lane(host: DevHost, settings: Settings, emulator: HveEmulator, backlog: int = BACKLOG,
                  limit: float = 120) -> dict:
    """A bulk backlog on the mail queue, then one POST /api/send with "priority": "high": when the
    emulator accepted it and how many bulk requests were still queued then. Returns what it measured."""
    say("\n== Priority lane (\"priority\": \"high\" on POST /api/send) ==")
    bulk = [{"id": f"demo-bulk-{i:03d}", "to": [f"{name.title()} Example <{name}@contoso.com>"],
             "subject": f"Newsletter {i}", "category": "newsletter", "text": "This week's news.\n"}
            for i, name in ((i, READERS[i % len(READERS)]) for i in range(backlog))]
    before = len(emulator.accepted())
    started = time.monotonic()
    asyncio.run(_enqueue_backlog(settings, bulk))
    queued_in = time.monotonic() - started
    url = f"http://127.0.0.1:{host.http_port}/{host.route_prefix}/send"
    posted = time.monotonic()
    status, _ = http_call(url, {"id": "demo-priority-1", "to": [URGENT], "subject": "Your sign-in code",
                                "category": "http", "priority": "high", "text": "Your code is 123456.\n"})
    say(f"enqueued    {backlog} bulk requests on '{settings.mail_queue}' in {queued_in:.1f} s, then "
        f"POST /{host.route_prefix}/send with \"priority\": \"high\"  ->  {status}")
    result: dict = {"sent_after": None, "still_queued": None}
    if status != 202:
        return result
    urgent = _address(URGENT)
    while time.monotonic() - posted < limit:
        accepted_now = emulator.accepted()[before:]
        if any(urgent in (r.lower() for r in m.recipients) for m in accepted_now):
            # Every bulk request HVE has not accepted yet is still on the mail queue (waiting or leased).
            bulk_sent = len(accepted_now) - 1
            result = {"sent_after": time.monotonic() - posted, "still_queued": backlog - bulk_sent}
            say(f"priority request sent {result['sent_after']:.1f} s after its POST, {result['still_queued']} bulk requests "
                f"still queued ({bulk_sent} of {backlog} sent before it)")
            break
        time.sleep(0.02)
    else:
        say(f"  (the priority request was not sent within {limit:.0f} s)")
    while len(emulator.accepted()) - before < backlog + 1 and time.monotonic() - posted < limit:
        time.sleep(0.2)
    try:
        host.wait_until_idle(timeout=10)
    except TimeoutError:
        pass
    bulk_sent = len(emulator.accepted()[before:]) - (1 if result["sent_after"] is not None else 0)
    say(f"backlog drained: {bulk_sent} of {backlog} bulk requests sent {time.monotonic() - started:.1f} s after the first was queued")
    return result


def run(requests_file: Path, keep_running: bool, http_port: int = 7071) -> int:
    requests = json.loads(requests_file.read_text())
    STATE.mkdir(exist_ok=True)
    say("== hve-relay local demo ==")
    with Azurite() as azurite, HveEmulator(EmulatorConfig(
        accounts=dict(ACCOUNTS), internal_domains={"contoso.com"}, profile="ga-2026",
        state_dir=STATE / "hve-emulator",
    )) as emulator, GraphStandIn() as graph:
        graph.load(ROOT / "tools/samples/graph-users.json")
        say(f"Azurite      queues/tables/blobs on 127.0.0.1 (ports {azurite.queue_port}/{azurite.table_port}/{azurite.blob_port})")
        say(f"HVE emulator smtp://127.0.0.1:{emulator.port} STARTTLS, CA {emulator.ca_file.relative_to(ROOT)}")
        say(f"Graph       stand-in at {graph.base_url} (sample users)")
        values = demo_settings(azurite.connection_string, emulator, graph)
        settings = Settings.from_env(values)
        # Show the failure paths too: two transient 4xx replies, one dropped connection, and an
        # account whose password was rotated without telling the relay.
        emulator.fail_next(2, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
        emulator.drop_next(1, stage="DATA")
        emulator.set_password("billing@contoso.com", "rotated-in-exchange")
        say("faults      2 x 451 4.7.0, 1 dropped connection, billing@contoso.com password rotated")

        with DevHost(ROOT / "function_app.py", values, http_port=free_port(http_port)) as host:
            say(f"local host  running {', '.join(host.functions)} (host.json: batchSize "
                f"{host.queue_options.batch_size}, maxDequeueCount {host.queue_options.max_dequeue_count})")
            asyncio.run(_enqueue_batch(settings, requests))
            total = len(requests) + 2
            say(f"enqueued    {total} requests on '{settings.mail_queue}' (raw, base64, claim check, one malformed)")
            wait_and_report(host, settings, time.monotonic())
            summary, _ = asyncio.run(_ledger_view(settings))
            stats = emulator.stats()
            say("\n== Summary (from the ledger) ==")
            for state, count in sorted(summary["by_state"].items()):
                say(f"  {state:9} {count}")
            say(f"  ({summary['retried']} sent after a retry: transient reply, dropped connection or an account problem)")
            if summary["reasons"]:
                say("  reasons:")
                for reason, count in sorted(summary["reasons"].items()):
                    say(f"    {count} x {reason}")
            say(f"HVE emulator accepted {stats['accepted_messages']} messages over {stats['connections_opened']} "
                f"TLS connection(s) with {stats['auth_count']} AUTH(s); replies {stats['replies']}")
            say(f"Stored messages: {emulator.messages_dir.relative_to(ROOT)}/")
            http_view = http_send(host)
            accepted_before = len(emulator.accepted())
            welcome_scan(settings, host, graph)
            say(f"welcome mails accepted by the emulator: {len(emulator.accepted()) - accepted_before}")
            delivery_reconciliation(values, emulator, graph)
            suppression(host, emulator)
            priority_lane(host, settings, emulator)
            if keep_running:
                say("\nStill running (Ctrl-C to stop). Enqueue more with: python -m tools.enqueue --to ann@contoso.com --subject Hi --text Hello")
                say(f"  AzureWebJobsStorage={azurite.connection_string}")
                say(f"  dashboard   {dashboard_url(host)}")
                say(f"  status      http://127.0.0.1:{host.http_port}/{host.route_prefix}/status")
                say(f"  send        curl -X POST http://127.0.0.1:{host.http_port}/{host.route_prefix}/send "
                    "-H 'Content-Type: application/json' -d '{\"to\": [\"ann@contoso.com\"], \"subject\": \"Hi\", \"text\": \"Hello\"}'")
                signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl-C
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            # The relay keeps its SMTP sessions and storage clients for the life of the worker; close them.
            asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)
    sent = summary["by_state"].get("sent", 0)
    return 0 if sent > 0 and http_view.get("state") == "sent" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=Path, default=ROOT / "tools/samples/demo-requests.json")
    parser.add_argument("--keep", "--keep-running", dest="keep_running", action="store_true",
                        help="leave the stack up after the batch, print the dashboard URL, stop on Ctrl-C")
    parser.add_argument("--http-port", type=int, default=7071, help="HTTP port of the local host (another free one if taken)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args.requests, args.keep_running, args.http_port)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
