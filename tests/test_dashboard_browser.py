"""The operations dashboard in a real browser: Debian's headless Chromium, driven by Playwright, opens
GET /api/dashboard on the function app under the local host after a demo-like run (the demo's sample
batch and faults, plus a request whose category is markup), and the page is checked against
GET /api/report and the ledger. Saves a screenshot (the one in docs/operations.md, docs/dashboard.png, comes from here).

Skips, saying why, where Playwright or Chromium is missing (`tools/setup.sh --tests` installs both);
under CI=true a skip is a failure (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

from shared.send.producer import enqueue_requests
from shared.wiring import close_relays
from shared.settings import Settings
from shared.storage import StorageClients
from tests.fixtures_emulator import ACCOUNTS
from tests.fixtures_storage import Storage
from tools import demo
from tools.devhost import DevHost, _background_loop

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed: run tools/setup.sh --tests")

ROOT = Path(__file__).resolve().parents[1]
# The picture in docs/operations.md is refreshed with DASHBOARD_SCREENSHOT=docs/dashboard.png; by default the
# screenshot goes to .local/ so a test run leaves the work tree clean.
SCREENSHOT = ROOT / os.environ.get("DASHBOARD_SCREENSHOT", ".local/dashboard.png")
HOSTILE = "<script>alert(1)</script>"
KEY = "browser-test-key"
# As the issue asks: headless, no sandbox (root in CI), nothing that phones home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FAST_HOST = {"version": "2.0", "extensions": {"queues": {
    "batchSize": 16, "newBatchThreshold": 8, "maxPollingInterval": "00:00:00.200",
    "visibilityTimeout": "00:00:00", "maxDequeueCount": 5, "messageEncoding": "none"}}}


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=(
    "no Chromium: `tools/setup.sh --tests` installs Debian's chromium (apt-get, as root); "
    "or set CHROMIUM=/path/to/chromium"))


async def _enqueue(settings: Settings, docs: list[dict[str, Any]]) -> None:
    storage = StorageClients(settings)
    try:
        await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container, docs)
    finally:
        await storage.close()


async def _ledger_rows(settings: Settings) -> list[dict[str, Any]]:
    storage = StorageClients(settings)
    try:
        table = await storage.table(settings.ledger_table)
        return [dict(r) async for r in table.query_entities("RowKey eq 'request'")]
    finally:
        await storage.close()


def in_thread(fn: Any, *args: Any) -> Any:
    """Call fn in a thread of its own: Playwright's sync API keeps an event loop running in this one,
    and the storage helpers (like the demo's) start their own with asyncio.run."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=120)


class Run:
    """A demo-like run under the local host, with HTTP on a free port."""

    def __init__(self, host: DevHost, settings: Settings) -> None:
        self.host, self.settings = host, settings
        self.base = f"http://127.0.0.1:{host.http_port}/{host.route_prefix}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base}/{path}", timeout=30) as response:
            return json.loads(response.read())

    def ledger(self) -> list[dict[str, Any]]:
        return in_thread(asyncio.run, _ledger_rows(self.settings))

    def send(self, docs: list[dict[str, Any]]) -> None:
        in_thread(asyncio.run, _enqueue(self.settings, docs))
        in_thread(demo.wait_and_report, self.host, self.settings, time.monotonic(), 60)
        self.wait_for_counts()

    def wait_for_counts(self, timeout: float = 15.0) -> None:
        """Until the report counts every request in the ledger: each worker adds its counts to the
        aggregates every AGGREGATES_FLUSH_SECONDS (0.2 s here), so the report lags by that much."""
        deadline = time.monotonic() + timeout
        while True:
            want = Counter(r["State"] for r in self.ledger())
            got = Counter({k: v for k, v in self.get_json("report")["totals"]["requests"].items() if v})
            if got == want:
                return
            assert time.monotonic() < deadline, f"the report still counts {dict(got)}, the ledger {dict(want)}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def run(azurite, hve_emulator) -> Iterator[Run]:
    storage = Storage(connection_string=azurite.connection_string, suffix=uuid.uuid4().hex[:8])
    values = storage.env(
        HVE_SMTP_HOST="127.0.0.1", HVE_SMTP_PORT=str(hve_emulator.port), HVE_SMTP_CA_FILE=str(hve_emulator.ca_file),
        HVE_ACCOUNTS=",".join(ACCOUNTS), HVE_PASSWORDS=json.dumps(ACCOUNTS), HVE_INTERNAL_DOMAINS="contoso.com",
        RECIPIENT_HASH_KEY="k", RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="1", AGGREGATES_FLUSH_SECONDS="0.2",
        HVE_DAILY_RECIPIENT_BUDGET="1000")
    settings = Settings.from_env(values)
    hve_emulator.reset()
    # The demo's faults: two transient 451s, a dropped connection, a password rotated in Exchange.
    hve_emulator.fail_next(2, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
    hve_emulator.drop_next(1, stage="DATA")
    hve_emulator.set_password("billing@contoso.com", "rotated-in-exchange")
    requests = json.loads((ROOT / "tools/samples/demo-requests.json").read_text())
    hostile = [{"id": f"dash-hostile-{i}", "to": ["ann@contoso.com"], "subject": "markup as a category",
                "text": "x", "category": HOSTILE} for i in range(2)]
    try:
        with DevHost(ROOT / "function_app.py", values, host_json=FAST_HOST, http_port=0,
                     functions=["send_mail", "status", "dashboard", "report"]) as host:
            asyncio.run(demo._enqueue_batch(settings, requests + hostile))
            demo.wait_and_report(host, settings, time.monotonic(), limit=90)
            started = Run(host, settings)
            started.wait_for_counts()
            yield started
    finally:
        asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)
        hve_emulator.reset()


class Browser:
    """One page in a fresh Chromium profile, with everything it logged, failed or opened."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.page.set_default_timeout(10_000)  # a missing element fails in seconds, not half a minute
        self.console: list[str] = []
        self.failed: list[str] = []
        self.dialogs: list[str] = []
        self.reports: list[Any] = []  # Request objects of GET /api/report
        page = self.page
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.on("response", lambda r: self.failed.append(f"{r.url}: HTTP {r.status}") if r.status >= 400 else None)
        page.on("request", lambda r: self.reports.append(r) if "/report" in urllib.parse.urlsplit(r.url).path else None)

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)

    def open(self, url: str, *, refreshes: int = 1) -> None:
        self.page.goto(url)
        self.wait_for_refreshes(refreshes)

    def wait_for_refreshes(self, count: int, timeout: float = 30.0) -> None:
        # Polled from here: page.wait_for_function would need 'unsafe-eval', which the CSP refuses.
        deadline = time.monotonic() + timeout
        while int(self.page.evaluate("document.body.dataset.refreshes") or 0) < count:
            assert time.monotonic() < deadline, f"the page did not finish refresh {count} in {timeout} s"
            self.page.wait_for_timeout(50)

    def field(self, name: str) -> str:
        return self.page.locator(f'[data-field="{name}"]').inner_text().strip()

    def table(self, name: str) -> list[list[str]]:
        return self.page.eval_on_selector_all(
            f'[data-table="{name}"] tbody tr',  # rows of data, not the one-cell "nothing here" row
            "rows => rows.filter(r => r.cells.length > 1).map(r => [...r.cells].map(c => c.textContent))")

    def bars(self, chart: str) -> Counter:
        values: Counter = Counter()
        for key, value in self.page.eval_on_selector_all(
                f'[data-chart="{chart}"] rect.bar', "rs => rs.map(r => [r.dataset.key, Number(r.dataset.value)])"):
            values[key] += value
        return values


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        # A fresh profile each time; Playwright is pointed at Debian's Chromium and downloads none.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 900})
        try:
            yield Browser(context)
        finally:
            context.close()


def seconds(value: float | None, bounds: list[float]) -> str:
    """A latency estimate as the page writes it (page.js `seconds`)."""
    if value is None:
        return "> " + seconds(bounds[-1], bounds)
    if value < 60:
        return f"{value:g} s"
    if value < 3600:
        return f"{round(value / 60, 1):g} min"
    return f"{round(value / 3600, 1):g} h"


def check_latency(browser: "Browser", window: str, report: dict[str, Any]) -> None:
    """The page's latency tiles, table and chart say what the report's latency section says."""
    latency = report["latency"]
    bounds, totals = latency["bounds"], latency["totals"]
    assert browser.field(f"{window}.latency.p50") == seconds(totals["p50"], bounds)
    assert browser.field(f"{window}.latency.p95") == seconds(totals["p95"], bounds)
    assert browser.field(f"{window}.latency.slowest") == latency["accounts"][0]["account"]
    day = report["bucket"] == "day"
    expected = [[r["start"][:10] if day else r["start"][:10] + " " + r["start"][11:16] + " UTC", str(r["count"]),
                 seconds(r["p50"], bounds), seconds(r["p95"], bounds), r["slowest"]["account"],
                 seconds(r["slowest"]["p50"], bounds), seconds(r["slowest"]["p95"], bounds),
                 str(r["slowest"]["count"])] for r in latency["series"]]
    assert browser.table(f"{window}.latency") == expected
    drawn = browser.page.eval_on_selector_all(
        f'[data-chart="{window}.latency"] rect.bar', "rs => rs.map(r => [r.dataset.start, r.dataset.key, r.dataset.value])")
    assert sorted(drawn) == sorted([r["start"], q, "above" if r[q] is None else f"{r[q]:g}"]
                                   for r in latency["series"] for q in ("p50", "p95"))


def ledger_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_state = Counter(r["State"] for r in rows)
    sent = [r for r in rows if r["State"] == "sent"]
    categories: dict[str, Counter] = {}
    for r in rows:
        categories.setdefault(r.get("Category") or "", Counter())[r["State"]] += 1
    return {"by_state": by_state,
            "internal": sum(int(r.get("InternalRecipients") or 0) for r in sent),
            "external": sum(int(r.get("ExternalRecipients") or 0) for r in sent),
            "categories": categories}


def test_dashboard_loads_clean_draws_its_charts_and_shows_the_report_and_the_ledger(run: Run, browser: Browser):
    browser.open(f"{run.base}/dashboard?code={KEY}")
    page = browser.page
    assert page.evaluate("document.body.dataset.state") == "ready", page.locator("#problem").inner_text()
    assert browser.console == [] and browser.failed == [] and browser.dialogs == []

    # The key reached the report in a header, never in the refresh URLs (those land in request logs).
    assert len(browser.reports) >= 2  # the 24 h and the 7 d report (more if a refresh came meanwhile)
    for request in browser.reports:
        assert "code" not in urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)
        assert request.headers.get("x-functions-key") == KEY
    day, week = sorted((r.response().json() for r in browser.reports[:2]), key=lambda r: r["since"], reverse=True)

    # The same questions asked again outside the browser get the same answers.
    query = urllib.parse.urlsplit(browser.reports[0].url).query
    again = run.get_json(f"report?{query}")
    mine = day if again["since"] == day["since"] else week
    assert again["totals"] == mine["totals"]

    ledger = ledger_counts(run.ledger())
    assert ledger["by_state"]["sent"] > 30 and ledger["by_state"]["refused"] > 3  # the demo mix ran
    assert set(ledger["by_state"]) <= {"sent", "refused", "dead"}  # nothing left in flight

    for window, report in (("w24", day), ("w7d", week)):
        totals = report["totals"]
        for outcome in ("sent", "refused", "dead"):
            shown = int(browser.field(f"{window}.requests.{outcome}"))
            assert shown == totals["requests"].get(outcome, 0) == ledger["by_state"][outcome], (window, outcome)
        for kind in ("internal", "external"):
            shown = int(browser.field(f"{window}.recipients.{kind}"))
            assert shown == totals["recipients"].get(kind, 0) == ledger[kind], (window, kind)
        # Left out by the suppression list: the report's count (absent when none), as a tile.
        assert int(browser.field(f"{window}.recipients.suppressed")) == totals["recipients"].get("suppressed", 0)
        assert int(browser.field(f"{window}.deferrals")) == totals["deferrals"]
        assert float(browser.field(f"{window}.cost").lstrip("$")) == pytest.approx(report["budget"]["costPeriod"], abs=1e-6)

        # The charts are drawn, and their bars add up to the totals.
        outcomes, recipients = browser.bars(f"{window}.outcomes"), browser.bars(f"{window}.recipients")
        assert outcomes["sent"] > 0 and recipients["internal"] > 0
        assert dict(outcomes) == {k: v for k, v in totals["requests"].items() if v}
        assert dict(recipients) == {k: v for k, v in totals["recipients"].items() if v and k != "suppressed"}

        # Per category: the page, the report and the ledger agree, the markup category as text.
        shown = {row[0]: [int(n) for n in row[1:4]] for row in browser.table(f"{window}.categories")}
        expected = {("(none)" if name == "" else name): [c["sent"], c["refused"], c["dead"]]
                    for name, c in ledger["categories"].items()}
        assert shown == expected

        errors = [[row[0], row[1], int(row[2])] for row in browser.table(f"{window}.errors")]
        assert errors == [[e["code"], e["account"], e["count"]] for e in report["errors"]]
        assert any(code.startswith("451") for code, _, _ in errors)

        # How long mail takes: every sent request has its latency; the page shows the report's.
        assert report["latency"]["totals"]["count"] == totals["requests"]["sent"] == ledger["by_state"]["sent"]
        check_latency(browser, window, report)

    # The 7 days are 7 UTC days (today included), one bar each, not 168 hourly slivers.
    assert (day["bucket"], week["bucket"]) == ("hour", "day")
    since = datetime.fromisoformat(week["since"])
    assert (since.hour, since.minute) == (0, 0) and datetime.fromisoformat(week["until"]) - since == timedelta(days=7)
    assert page.locator('[data-chart="w7d.outcomes"] rect.bar.sent').count() <= 7
    assert len(browser.table("w7d.latency")) == len(week["latency"]["series"]) <= 7

    # Now: accounts, queues, budget.
    accounts = browser.table("accounts")
    assert [row[0] for row in accounts] == [a["account"] for a in day["status"]["accounts"]]
    assert [int(row[4]) for row in accounts] == [a["used_today"]["messages"] for a in day["status"]["accounts"]]
    assert int(browser.field("queue.depth")) == day["queues"]["mail"]["depth"]
    assert int(browser.field("poison.depth")) == day["queues"]["poison"]["depth"]
    assert int(browser.field("budget.spentToday")) == day["budget"]["spentToday"]

    # No recipient address anywhere: not on the page, not in what the page was sent.
    requests = json.loads((ROOT / "tools/samples/demo-requests.json").read_text())
    recipients = {a.lower() for doc in requests for field in ("to", "cc", "bcc")
                  for a in re.findall(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+", json.dumps(doc.get(field, [])))}
    assert "ann@contoso.com" in recipients and not recipients & {a.lower() for a in ACCOUNTS}
    seen = (page.content() + page.inner_text("body") + json.dumps([day, week])).lower()
    assert [a for a in recipients if a in seen] == []

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 20_000


def test_a_category_made_of_markup_shows_as_text_and_runs_nothing(run: Run, browser: Browser):
    browser.open(f"{run.base}/dashboard?code={KEY}")
    page = browser.page
    cells = page.locator('[data-table="w24.categories"] td.label').all_text_contents()
    assert HOSTILE in cells
    # It is one text node, not an element: the page's own script is the only <script>.
    assert page.locator("script").count() == 1
    assert page.evaluate("""() => [...document.querySelectorAll('td.label')]
        .filter(td => td.textContent.includes('<script>')).every(td => td.childElementCount === 0)""")
    assert browser.dialogs == [] and browser.console == []
    # The strict CSP holds in the browser too: markup put in by hand is refused (Trusted Types).
    blocked = page.evaluate("""() => { try { document.body.innerHTML += '<b>x</b>'; return false; }
                                      catch (e) { return e instanceof TypeError; } }""")
    assert blocked


def test_the_page_refreshes_itself_with_new_numbers_and_keeps_them_when_the_report_fails(run: Run, browser: Browser):
    page = browser.page
    page.clock.install()
    browser.open(f"{run.base}/dashboard?code={KEY}")
    before = int(browser.field("w24.requests.sent"))
    run.send([{"id": "dash-refresh", "to": ["ann@contoso.com"], "subject": "one more", "text": "x", "category": "orders"}])
    page.clock.fast_forward(16_000)
    browser.wait_for_refreshes(2)
    assert int(browser.field("w24.requests.sent")) == before + 1
    assert int(browser.field("w7d.requests.sent")) == before  # the 7-day report comes every 5 min
    page.clock.fast_forward(300_000)
    browser.wait_for_refreshes(3)
    assert int(browser.field("w7d.requests.sent")) == before + 1
    assert browser.console == [] and browser.failed == []

    # The 7-day report fails: the 24-hour window still refreshes, the 7-day one keeps its numbers.
    def fail_week(route: Any) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(route.request.url).query)
        since, until = (datetime.fromisoformat(query[k][0].replace("Z", "+00:00")) for k in ("since", "until"))
        if until - since > timedelta(days=2):
            route.fulfill(status=503, content_type="application/json", body=json.dumps({"error": "storage unavailable"}))
        else:
            route.continue_()

    page.route("**/report?*", fail_week)
    run.send([{"id": "dash-refresh-2", "to": ["ann@contoso.com"], "subject": "and another", "text": "x"}])
    page.clock.fast_forward(300_000)
    browser.wait_for_refreshes(4)
    assert page.evaluate("document.body.dataset.state") == "error"
    assert page.locator("#problem").inner_text() == \
        "Could not refresh last 7 days: GET /report answered 503: storage unavailable"
    assert int(browser.field("w24.requests.sent")) == before + 2
    assert int(browser.field("w7d.requests.sent")) == before + 1

    # Both fail: the last numbers stay, and the page says why.
    page.unroute("**/report?*")
    page.route("**/report?*", lambda route: route.fulfill(status=503, content_type="application/json",
                                                           body=json.dumps({"error": "storage unavailable"})))
    page.clock.fast_forward(16_000)  # a failed 7-day report is asked for again at the next refresh
    browser.wait_for_refreshes(5)
    assert page.locator("#problem").inner_text().count("storage unavailable") == 2
    assert int(browser.field("w24.requests.sent")) == before + 2


def contract_report(now: datetime) -> dict[str, Any]:
    """A report.v1 document with what a demo run cannot produce yet (message-trace statuses) and
    markup in every label a producer or HVE controls."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    iso = lambda t: t.isoformat(timespec="seconds")  # noqa: E731
    account = "<img src=x onerror=alert(2)>"
    counts = {"requests": {"sent": 9, "refused": 1, "dead": 0}, "deferrals": 2,
              "recipients": {"internal": 7, "external": 3, "suppressed": 2}, "codes": {"550 5.7.1": 2},
              "delivery": {"delivered": 6, "failed": 2, "pending": 1, "quarantined": 1}}
    earlier = {**counts, "requests": {"sent": 3, "refused": 0, "dead": 0}, "deferrals": 0, "codes": {},
               "recipients": {"internal": 3, "external": 0}, "delivery": {"delivered": 2, "gettingStatus": 1}}
    total = {**counts, "requests": {"sent": 12, "refused": 1, "dead": 0},
             "recipients": {"internal": 10, "external": 3, "suppressed": 2},
             "delivery": {"delivered": 8, "failed": 2, "pending": 1, "quarantined": 1, "gettingStatus": 1}}
    bounds = [1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
    return {
        "schema": "hve-relay.report.v1", "generatedAt": iso(now), "since": iso(hour - timedelta(hours=23)),
        "until": iso(hour + timedelta(hours=1)), "bucket": "hour",
        "series": [{"start": iso(hour - timedelta(hours=2)), "account": "b@x", "category": "", **earlier},
                   {"start": iso(hour), "account": account, "category": HOSTILE, **counts}],
        "totals": total,
        "errors": [{"code": "550 5.7.1", "account": account, "count": 2, "lastSeen": iso(now)}],
        "latency": {"bounds": bounds, "series": [
            {"start": iso(hour - timedelta(hours=2)), "count": 3, "histogram": [2, 1] + [0] * 10, "p50": 1, "p95": 2,
             "slowest": {"account": "b@x", "count": 3, "p50": 1, "p95": 2}},
            {"start": iso(hour), "count": 9, "histogram": [0, 0, 4, 3, 0, 0, 0, 1, 0, 0, 0, 1], "p50": 10, "p95": None,
             "slowest": {"account": account, "count": 9, "p50": 10, "p95": None}}],
            "totals": {"count": 12, "histogram": [2, 1, 4, 3, 0, 0, 0, 1, 0, 0, 0, 1], "p50": 5, "p95": None},
            "accounts": [{"account": account, "count": 9, "histogram": [0, 0, 4, 3, 0, 0, 0, 1, 0, 0, 0, 1],
                          "p50": 10, "p95": None},
                         {"account": "b@x", "count": 3, "histogram": [2, 1] + [0] * 10, "p50": 1, "p95": 2}]},
        "status": {"at": iso(now), "limits_profile": "ga-2026", "daily_window_ends": iso(hour + timedelta(hours=1)),
                   "tenant": {"recipients_today": 10, "cap": None, "allowance_claimed": None, "remaining": None},
                   "accounts": [{"account": account, "health": "cooling-down",
                                 "last_problem": "<script>alert(4)</script>",
                                 "used_today": {"messages": 10, "internal_recipients": 7, "external_recipients": 3},
                                 "remaining_today": {"external_recipients": 1997, "recipients": 9990},
                                 "next_free_slot": {"internal": None, "internal_reason": None,
                                                    "external": iso(hour + timedelta(hours=1)), "external_reason": "x"},
                                 "cooldown_until": iso(now + timedelta(minutes=5)), "unhealthy_until": None,
                                 "last_granted": None}]},
        "queues": {"mail": {"name": "outbound-mail", "depth": 4, "oldestAgeSeconds": 125.0},
                   "poison": {"name": "outbound-mail-poison", "depth": 1, "oldestAgeSeconds": 7200.0}},
        "budget": {"dailyRecipientBudget": 1000, "spentToday": 10, "pricePerMillionRecipients": 42.0,
                   "currency": "USD", "costToday": 0.00042, "costPeriod": 0.00042},
    }


def test_delivery_rates_show_when_traced_and_every_label_from_outside_stays_text(browser: Browser):
    from shared.reporting.dashboard import page as dashboard_page

    report = contract_report(datetime.now(timezone.utc))
    schema = json.loads((ROOT / "shared/schema/report.v1.json").read_text())
    jsonschema.validate(report, schema)  # the fixture is a document the real route may send
    built = dashboard_page()
    # The page and its report from a name that resolves nowhere: Playwright answers both.
    browser.page.route("http://dashboard.invalid/api/dashboard*",
                       lambda route: route.fulfill(status=200, headers=built.headers, body=built.body))
    browser.page.route("http://dashboard.invalid/api/report*",
                       lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(report)))
    browser.open("http://dashboard.invalid/api/dashboard?code=k")
    page = browser.page
    assert page.evaluate("document.body.dataset.state") == "ready"
    assert browser.console == [] and browser.failed == [] and browser.dialogs == []

    assert browser.field("w24.delivery.rate") == "61.5 %"  # 8 of 13 traced recipients
    # Recipients the suppression list left out: a tile and a column per category, as in the report.
    assert browser.field("w24.recipients.suppressed") == "2"
    assert sorted(row[-1] for row in browser.table("w24.categories")) == ["0", "2"]
    assert browser.table("w24.delivery") == [["delivered", "8", "61.5 %"], ["failed", "2", "15.4 %"],
                                              ["pending", "1", "7.7 %"], ["quarantined", "1", "7.7 %"],
                                              ["gettingStatus", "1", "7.7 %"]]
    # Delivery results beside the send outcomes: tiles and a chart per hour, equal to the report
    # (pending: pending and gettingStatus, still open at the last trace).
    shown = {k: int(browser.field(f"w24.results.{k}")) for k in ("delivered", "failed", "quarantined", "pending")}
    assert shown == {"delivered": 8, "failed": 2, "quarantined": 1, "pending": 2}
    assert page.locator('[data-field="w24.results.other"]').count() == 0      # no spam or recall: no tile
    assert dict(browser.bars("w24.results")) == shown
    per_hour = browser.page.eval_on_selector_all('[data-chart="w24.results"] rect.bar',
                                                 "rs => rs.map(r => r.querySelector('title').textContent)")
    assert len(per_hour) == 6 and sum(t.endswith(": 1 pending") for t in per_hour) == 2    # one per hour
    # Latency: p95 above the last bound shows as such; the slowest account is a label like any other.
    assert browser.field("w24.latency.p95") == "> 1 h" and browser.field("w24.latency.p50") == "5 s"
    assert browser.field("w24.latency.slowest") == "<img src=x onerror=alert(2)>"
    check_latency(browser, "w24", report)
    assert browser.table("w24.errors")[0][:3] == ["550 5.7.1", "<img src=x onerror=alert(2)>", "2"]
    row = browser.table("accounts")[0]
    assert row[0] == "<img src=x onerror=alert(2)>" and row[-1] == "<script>alert(4)</script>"
    assert row[1] == "cooling-down" and row[2].startswith("10 / 10000") and row[3].startswith("3 / 2000")
    assert int(browser.field("queue.depth")) == 4 and int(browser.field("poison.depth")) == 1
    assert browser.field("budget.costToday") == "$0.000420"
    # Only the page's own elements: no <img> or <script> came out of the labels.
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1
    assert page.evaluate("[...document.querySelectorAll('*')].every(e => ![...e.attributes].some(a => a.name.startsWith('on')))")
