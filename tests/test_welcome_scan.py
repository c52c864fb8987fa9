"""The welcome scan end to end: the Graph stand-in over real HTTP, Azurite (state table, queue),
the real send stage and the HVE emulator. Nothing on the path is mocked; time is a fake clock the
scan reads, and the stand-in's users carry creation times on that clock."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy

import pytest

from shared.graph import GraphClient, StaticToken
from shared.send.stage import Relay
from shared.welcome.scan import handle_timer, run_scan
from shared.welcome.policy import PENDING, SKIP, WELCOME, TemplateError
from shared.welcome.state import WelcomeState
from shared.settings import SettingsError
from shared.storage import StorageClients
from tests.fixtures_graph import graph_env, graph_standin  # noqa: F401  (fixture)
from tests.relay_harness import drain, relay_settings
from tools import welcome as welcome_cli

T0 = datetime.now(timezone.utc).replace(microsecond=0)
MINUTE = timedelta(minutes=1)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now.timestamp()

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def run(coro):
    return asyncio.run(coro)


def settings_for(storage, emulator, standin, **more):
    return relay_settings(storage, emulator, **{**graph_env(standin), "WELCOME_STATE_TABLE": f"{storage.table_prefix}welcome",
                                                **more})


async def queue_count(settings) -> int:
    storage = StorageClients(settings)
    try:
        queue = await storage.queue(settings.mail_queue)
        return (await queue.get_queue_properties()).approximate_message_count
    finally:
        await storage.close()


async def send_all(settings):
    relay = await Relay.create(settings)
    try:
        return await drain(relay)
    finally:
        await relay.close()


async def state_rows(settings):
    storage = StorageClients(settings)
    try:
        state = await WelcomeState.open(storage, settings.welcome_state_table)
        return await state.watermark(), await state.rows(datetime(2000, 1, 1, tzinfo=timezone.utc))
    finally:
        await storage.close()


def welcomed(emulator) -> Counter:
    """To address of every accepted message (each welcome has one To)."""
    out: Counter = Counter()
    for path in emulator.messages():
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        out.update(a.addr_spec for a in msg["To"].addresses)
    return out


def member(standin, name: str, created: datetime, **more):
    local = name.lower().split()[0]
    fields = dict(displayName=name, givenName=name.split()[0], userPrincipalName=f"{local}@contoso.com",
                  mail=f"{local}@contoso.com", createdDateTime=created)
    fields.update(more)
    return standin.add_user(**fields)


def test_a_scan_welcomes_new_members_once_and_the_mail_arrives(storage, emulator, graph_standin):
    clock = Clock()
    ann = member(graph_standin, "Ann Example", T0 - 2 * MINUTE)
    member(graph_standin, "Bob Sample", T0 - timedelta(days=2))
    chris = member(graph_standin, "Chris Markup", T0 - 30 * MINUTE,
                   displayName='<b onmouseover="steal()">Chris</b> & Co', givenName="<i>Chris</i>")
    erin = member(graph_standin, "Erin Guest", T0 - MINUTE, userType="Guest", mail="erin@fabrikam.com",
                  userPrincipalName="erin_fabrikam.com#EXT#@contoso.onmicrosoft.com")
    member(graph_standin, "Front Desk", T0 - timedelta(days=4), accountEnabled=False)  # a shared mailbox
    member(graph_standin, "Gus Veteran", T0 - timedelta(days=30))                      # not new
    settings = settings_for(storage, emulator, graph_standin, WELCOME_BCC="servicedesk@contoso.com",
                            WELCOME_FAQ_URL="https://intranet.contoso.com/faq?x=1&y=2",
                            WELCOME_SUPPORT_ADDRESS="help@contoso.com")

    report = run(run_scan(settings, clock=clock))
    assert sorted(d.user.mail for d in report.of(WELCOME)) == ["ann@contoso.com", "bob@contoso.com", "chris@contoso.com"]
    reasons = {d.user.display_name: (d.outcome, d.reason) for d in report.decisions if d.outcome != WELCOME}
    assert reasons == {
        "Erin Guest": (SKIP, "guest account (userType Guest)"),
        "Front Desk": (SKIP, "account disabled (still, 3 days after creation)"),
    }
    assert report.window.since == T0 - timedelta(days=7) and report.watermark == T0
    assert run(queue_count(settings)) == 3

    results = run(send_all(settings))
    assert sorted(r.state for r in results) == ["sent"] * 3
    assert welcomed(emulator) == Counter({"ann@contoso.com": 1, "bob@contoso.com": 1, "chris@contoso.com": 1})
    envelopes = {m.message_id: m.recipients for m in emulator.accepted()}
    assert all("servicedesk@contoso.com" in rcpts for rcpts in envelopes.values())

    chris_mail = next(message_from_bytes(p.read_bytes(), policy=policy.default) for p in emulator.messages()
                      if b"chris@contoso.com" in p.read_bytes())
    body = chris_mail.get_body(("html",)).get_content()
    assert "<b onmouseover" not in body and "<i>Chris" not in body
    assert "&lt;b onmouseover=&quot;steal()&quot;&gt;Chris&lt;/b&gt; &amp; Co" in body
    assert 'href="https://intranet.contoso.com/faq?x=1&amp;y=2"' in body and 'href="mailto:help@contoso.com"' in body
    assert "Bcc" not in chris_mail and chris_mail["Subject"] == "Welcome, <i>Chris</i>: your Microsoft 365 account is ready"

    # The next run (15 minutes later) finds nothing new: no second welcome anywhere.
    clock.advance(15 * MINUTE)
    again = run(run_scan(settings, clock=clock))
    assert again.decisions == [] and {u.id for u, _ in again.already} == {ann["id"], chris["id"], erin["id"]}
    assert again.window.since == T0 - 60 * MINUTE  # the watermark less the 1-hour overlap
    watermark, rows = run(state_rows(settings))
    assert watermark == clock.now
    assert Counter(r.state for r in rows.values()) == Counter({"enqueued": 3, "skipped": 2})
    assert all("@" not in r.reason for r in rows.values())  # no addresses in the state table
    assert run(queue_count(settings)) == 0


def test_a_user_whose_mail_appears_two_scans_later_is_welcomed_then(storage, emulator, graph_standin):
    clock = Clock()
    dana = member(graph_standin, "Dana Pending", T0 - 5 * MINUTE, mail=None)
    settings = settings_for(storage, emulator, graph_standin)

    outcomes = []
    for scan in range(4):
        if scan == 2:
            graph_standin.update_user(dana["id"], mail="dana@contoso.com")
        report = run(run_scan(settings, clock=clock))
        outcomes.append([(d.outcome, d.reason) for d in report.decisions])
        clock.advance(15 * MINUTE)

    assert outcomes == [
        [(PENDING, "no mailbox yet (mail is empty)")],
        [(PENDING, "no mailbox yet (mail is empty)")],
        [(WELCOME, "")],
        [],
    ]
    run(send_all(settings))
    assert welcomed(emulator) == Counter({"dana@contoso.com": 1})
    _, rows = run(state_rows(settings))
    assert rows[dana["id"]].state == "enqueued" and rows[dana["id"]].first_seen == T0


def test_pending_users_are_skipped_with_the_reason_after_the_configured_days(storage, emulator, graph_standin):
    clock = Clock()
    late = member(graph_standin, "Larry Late", T0 - MINUTE, mail=None)
    gone = member(graph_standin, "Gina Gone", T0 - MINUTE, mail=None)
    settings = settings_for(storage, emulator, graph_standin, WELCOME_PENDING_DAYS="1")

    first = run(run_scan(settings, clock=clock))
    assert [d.outcome for d in first.decisions] == [PENDING, PENDING]
    assert {d.retry_until for d in first.decisions} == {T0 - MINUTE + timedelta(days=1)}

    graph_standin.remove_user(gone["id"])
    clock.advance(timedelta(hours=25))
    second = run(run_scan(settings, clock=clock))
    assert [(d.user.id, d.outcome, d.reason) for d in second.decisions] == [
        (late["id"], SKIP, "no mailbox yet (mail is empty) (still, 1 day after creation)")]
    assert [(r.user_id, r.state) for r in second.expired] == [(gone["id"], "skipped")]

    # A mailbox that turns up after the deadline does not bring the user back.
    graph_standin.update_user(late["id"], mail="larry@contoso.com")
    clock.advance(15 * MINUTE)
    third = run(run_scan(settings, clock=clock))
    assert third.of(WELCOME) == [] and run(queue_count(settings)) == 0
    _, rows = run(state_rows(settings))
    assert {r.state for r in rows.values()} == {"skipped"}
    assert rows[late["id"]].reason.startswith("no mailbox yet")


def test_many_overlapping_runs_welcome_each_user_exactly_once(storage, emulator, graph_standin):
    """Three hours of 15-minute scans with a 1-hour overlap, while users keep arriving: some
    show up in Graph up to 40 minutes after their createdDateTime (replication lag), some get their
    mailbox a few scans late, a dry run is mixed in. Every member is welcomed exactly once and the
    queue never carries a second request for anyone."""
    clock = Clock()
    settings = settings_for(storage, emulator, graph_standin)
    expected: set[str] = set()
    mailbox_later: dict[int, list[str]] = {}
    enqueued_total = 0
    for scan in range(12):
        for k in range(3):
            n = scan * 3 + k
            lag = timedelta(minutes=(n * 7) % 41)          # 0..40 minutes, inside the overlap
            name = f"User{n:02d} Example"
            if n % 5 == 0:
                created = member(graph_standin, name, clock.now - lag, mail=None)
                mailbox_later.setdefault(scan + 1 + n % 3, []).append(created["id"])
            else:
                member(graph_standin, name, clock.now - lag)
            expected.add(f"user{n:02d}@contoso.com")
        member(graph_standin, f"Guest{scan:02d} Visitor", clock.now - MINUTE, userType="Guest", mail=f"g{scan}@fabrikam.com")
        for user_id in mailbox_later.pop(scan, []):
            local = graph_standin.user(user_id)["userPrincipalName"].split("@")[0]
            graph_standin.update_user(user_id, mail=f"{local}@contoso.com")
        if scan == 5:
            dry = run(run_scan(settings, clock=clock, dry_run=True))
            assert dry.dry_run and dry.watermark is not None
        report = run(run_scan(settings, clock=clock))
        enqueued_total += len(report.of(WELCOME))
        clock.advance(15 * MINUTE)
    for user_id in [i for ids in mailbox_later.values() for i in ids]:  # mailboxes due after the last scan
        local = graph_standin.user(user_id)["userPrincipalName"].split("@")[0]
        graph_standin.update_user(user_id, mail=f"{local}@contoso.com")
    enqueued_total += len(run(run_scan(settings, clock=clock)).of(WELCOME))

    assert enqueued_total == len(expected) == 36
    assert run(queue_count(settings)) == 36
    results = run(send_all(settings))
    assert Counter(r.state for r in results) == Counter({"sent": 36})
    assert welcomed(emulator) == Counter({addr: 1 for addr in expected})
    # Windows were bounded by the overlap, not the whole lookback, after the first scan.
    users_queries = [r for r in graph_standin.requests if r.path == "/v1.0/users"]
    assert len(users_queries) == 14


@pytest.mark.parametrize("crash_at", ["watermark", "enqueued", "recorded"])
def test_a_crash_between_enqueue_and_watermark_welcomes_no_one_twice_and_misses_no_one(
        storage, emulator, graph_standin, crash_at):
    clock = Clock()
    for n in range(4):
        member(graph_standin, f"Crash{n} User", T0 - (n + 1) * MINUTE)
    settings = settings_for(storage, emulator, graph_standin)
    calls = []

    def crash(stage: str, user_id: str) -> None:
        calls.append(stage)
        # Crash on the second user's enqueue/record, or just before the watermark moves.
        if stage == crash_at and (stage == "watermark" or calls.count(stage) == 2):
            raise RuntimeError(f"host died at {stage}")

    with pytest.raises(RuntimeError, match="host died"):
        run(run_scan(settings, clock=clock, checkpoint=crash))
    watermark, _ = run(state_rows(settings))
    assert watermark is None  # the watermark did not move

    # New users arrive; the timer fires again 15 minutes later and this time nothing crashes.
    clock.advance(15 * MINUTE)
    member(graph_standin, "After Crash", clock.now - MINUTE)
    rerun = run(run_scan(settings, clock=clock))
    watermark, rows = run(state_rows(settings))
    assert watermark == clock.now and {r.state for r in rows.values()} == {"enqueued"} and len(rows) == 5
    # Only a crash after the request was queued but before its row was written re-enqueues it.
    assert run(queue_count(settings)) == (6 if crash_at == "enqueued" else 5)
    assert len(rerun.of(WELCOME)) == {"watermark": 1, "enqueued": 4, "recorded": 3}[crash_at]

    results = run(send_all(settings))
    assert Counter(r.state for r in results) == Counter({"sent": 5, **({"duplicate": 1} if crash_at == "enqueued" else {})})
    assert welcomed(emulator) == Counter({f"crash{n}@contoso.com": 1 for n in range(4)} | {"after@contoso.com": 1})


def test_group_restriction_welcomes_members_and_waits_for_the_others(storage, emulator, graph_standin):
    clock = Clock()
    inside = member(graph_standin, "Inna Inside", T0 - MINUTE)
    nested = member(graph_standin, "Nestor Nested", T0 - MINUTE)
    outside = member(graph_standin, "Otto Outside", T0 - MINUTE)
    graph_standin.set_group("staff", [inside["id"], "staff-sub"])
    graph_standin.set_group("staff-sub", [nested["id"]])
    settings = settings_for(storage, emulator, graph_standin, WELCOME_GROUP_ID="staff")

    first = run(run_scan(settings, clock=clock))
    assert sorted(d.user.display_name for d in first.of(WELCOME)) == ["Inna Inside", "Nestor Nested"]
    assert [(d.user.id, d.reason) for d in first.of(PENDING)] == [(outside["id"], "not a member of group staff")]

    graph_standin.add_group_members("staff", outside["id"])  # dynamic membership caught up
    clock.advance(15 * MINUTE)
    second = run(run_scan(settings, clock=clock))
    assert [d.user.id for d in second.of(WELCOME)] == [outside["id"]]

    # With no candidate left, the membership is not read at all.
    graph_standin.clear_log()
    clock.advance(15 * MINUTE)
    run(run_scan(settings, clock=clock))
    assert [r.path for r in graph_standin.requests] == ["/v1.0/users"]


def test_scan_pages_and_rides_out_throttling(storage, emulator, graph_standin):
    clock = Clock()
    graph_standin.page_limit = 4
    for n in range(10):
        member(graph_standin, f"Page{n} User", T0 - n * MINUTE)
    graph_standin.fail_next(429, count=1, retry_after=2, path="/v1.0/users")
    graph_standin.fail_next(503, count=1, path="/v1.0/users")
    settings = settings_for(storage, emulator, graph_standin)
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def main():
        graph = GraphClient(graph_standin.base_url, StaticToken(graph_standin.token), sleep=record)
        try:
            return await run_scan(settings, clock=clock, graph=graph)
        finally:
            await graph.close()

    report = run(main())
    assert len(report.of(WELCOME)) == 10 and report.users_read == 10 and report.graph_requests == 5
    assert [r.status for r in graph_standin.requests] == [429, 503, 200, 200, 200]
    assert sleeps[0] == 2.0 and 1.0 <= sleeps[1] <= 2.0  # Retry-After, then backoff (2nd attempt)


def test_a_throttled_out_scan_leaves_the_watermark_and_enqueues_nothing(storage, emulator, graph_standin):
    member(graph_standin, "Tom Throttled", T0 - MINUTE)
    graph_standin.fail_next(429, count=1, retry_after=3600)
    settings = settings_for(storage, emulator, graph_standin)
    with pytest.raises(Exception, match="3600"):
        run(run_scan(settings, clock=Clock()))
    assert run(state_rows(settings))[0] is None and run(queue_count(settings)) == 0


def test_dry_run_explains_and_writes_nothing(storage, emulator, graph_standin, monkeypatch, capsys):
    member(graph_standin, "Ann Example", T0 - MINUTE)
    member(graph_standin, "Dana Pending", T0 - MINUTE, mail=None)
    member(graph_standin, "Erin Guest", T0 - MINUTE, userType="Guest", mail="erin@fabrikam.com")
    member(graph_standin, "Xavier External", T0 - MINUTE, mail="xavier@gmail.com")
    for key, value in {**storage.env(), **graph_env(graph_standin), "WELCOME_STATE_TABLE": f"{storage.table_prefix}welcome",
                       "HVE_ACCOUNTS": "news@contoso.com", "HVE_INTERNAL_DOMAINS": "contoso.com"}.items():
        monkeypatch.setenv(key, value)

    assert welcome_cli.main(["--dry-run", "--settings", "/nonexistent/local.settings.json"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "would welcome (1):\n  Ann Example <ann@contoso.com>" in out
    assert "no mailbox yet (mail is empty); re-checked until" in out
    assert "guest account (userType Guest)" in out
    assert "external-not-allowed" in out  # the contract would refuse it: held, not enqueued

    assert welcome_cli.main(["--dry-run", "--json", "--settings", "/nonexistent"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert Counter(d["outcome"] for d in doc["decisions"]) == Counter({"welcome": 1, "pending": 2, "skip": 1})

    async def nothing_written():
        storage_clients = StorageClients(settings_for(storage, emulator, graph_standin))
        try:
            tables = [t.name async for t in storage_clients.tables.list_tables()]
            queues = [q.name async for q in storage_clients.queues.list_queues()]
            return tables, queues
        finally:
            await storage_clients.close()

    tables, queues = run(nothing_written())
    assert f"{storage.table_prefix}welcome" not in tables and storage.queue_name not in queues

    # Without --dry-run the same command runs one scan.
    assert welcome_cli.main(["--settings", "/nonexistent"]) == 0
    assert "welcomed (1):" in capsys.readouterr().out
    assert run(queue_count(settings_for(storage, emulator, graph_standin))) == 1


def test_templates_from_a_folder_or_blobs_override_the_built_in_ones(storage, emulator, graph_standin, tmp_path):
    member(graph_standin, "Ann Example", T0 - MINUTE)
    files = {"welcome.subject.txt": "Hi {{first_name}}", "welcome.txt": "Text for {{display_name}}",
             "welcome.html": "<p>HTML for {{display_name}} at <a href=\"{{outlook_url}}\">OWA</a></p>"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    folder = settings_for(storage, emulator, graph_standin, WELCOME_TEMPLATES=str(tmp_path),
                          WELCOME_OUTLOOK_URL="https://owa.contoso.com/")
    run(run_scan(folder, clock=Clock()))
    run(send_all(folder))
    msg = message_from_bytes(emulator.messages()[0].read_bytes(), policy=policy.default)
    assert msg["Subject"] == "Hi Ann"
    assert msg.get_body(("html",)).get_content().strip() == '<p>HTML for Ann Example at <a href="https://owa.contoso.com/">OWA</a></p>'

    async def upload(container_name: str, names):
        clients = StorageClients(folder)
        try:
            container = clients.container(container_name)
            await container.create_container()
            for name in names:
                await container.upload_blob(f"welcome/v2/{name}", files[name].replace("Hi", "Hello"))
        finally:
            await clients.close()

    container = f"{storage.table_prefix}-tpl"
    run(upload(container, list(files)))
    blob = settings_for(storage, emulator, graph_standin, WELCOME_TEMPLATES=f"blob:{container}/welcome/v2",
                        WELCOME_STATE_TABLE=f"{storage.table_prefix}welcome2")
    report = run(run_scan(blob, clock=Clock(), dry_run=True))
    assert len(report.of(WELCOME)) == 1

    # A template set with a file missing fails the scan before anything is enqueued.
    (tmp_path / "welcome.html").unlink()
    member(graph_standin, "Bob Sample", T0 - MINUTE)
    with pytest.raises(TemplateError, match="welcome.html"):
        run(run_scan(folder, clock=Clock()))
    assert run(queue_count(folder)) == 0


def test_timer_entry_point_is_gated_by_welcome_enabled(storage, emulator, graph_standin, monkeypatch):
    member(graph_standin, "Ann Example", datetime.now(timezone.utc) - MINUTE)
    env = {**storage.env(), **graph_env(graph_standin), "WELCOME_STATE_TABLE": f"{storage.table_prefix}welcome",
           "HVE_ACCOUNTS": "news@contoso.com", "HVE_INTERNAL_DOMAINS": "contoso.com"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WELCOME_ENABLED", "false")
    assert run(handle_timer()) is None and graph_standin.requests == []
    monkeypatch.setenv("WELCOME_ENABLED", "true")
    report = run(handle_timer())
    assert report is not None and len(report.of(WELCOME)) == 1


def test_function_app_declares_the_timer_at_the_welcome_schedule():
    # A private copy of the module: FunctionApp.get_functions() may run only once per app object,
    # and the local host may already have indexed the shared `function_app`.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_welcome_function_app", Path(__file__).parents[1] / "function_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [fn] = [f for f in module.app.get_functions() if f.get_function_name() == "welcome_new_users"]
    [trigger] = [b for b in fn.get_bindings() if b.type == "timerTrigger"]
    assert trigger.schedule == "%WELCOME_SCHEDULE%"
    assert "WELCOME_ENABLED" in (fn.get_user_function().__doc__ or "")


@pytest.mark.parametrize("bcc,why", [
    ("not an address", "WELCOME_BCC"),
    ("desk@contoso.com\r\nBcc: victim@contoso.com", "WELCOME_BCC"),
    ("desk@gmail.com", "outside HVE_INTERNAL_DOMAINS"),
])
def test_a_bad_welcome_bcc_fails_the_scan_before_graph_is_asked_or_anything_enqueued(storage, emulator, graph_standin, bcc, why):
    member(graph_standin, "Ann Example", T0 - MINUTE)
    settings = settings_for(storage, emulator, graph_standin, WELCOME_BCC=bcc)
    with pytest.raises(SettingsError, match=why):
        run(run_scan(settings, clock=Clock()))
    assert graph_standin.requests == []
    assert run(queue_count(settings)) == 0


def test_a_template_blob_missing_fails_the_scan_naming_it_and_enqueues_nothing(storage, emulator, graph_standin):
    member(graph_standin, "Ann Example", T0 - MINUTE)
    container = f"{storage.table_prefix}-tpl"
    settings = settings_for(storage, emulator, graph_standin, WELCOME_TEMPLATES=f"blob:{container}/set")

    async def upload_all_but_html():
        clients = StorageClients(settings)
        try:
            blobs = clients.container(container)
            await blobs.create_container()
            await blobs.upload_blob("set/welcome.subject.txt", "Hi {{first_name}}")
            await blobs.upload_blob("set/welcome.txt", "Text for {{display_name}}")
        finally:
            await clients.close()

    run(upload_all_but_html())
    with pytest.raises(TemplateError, match=r"blob 'set/welcome.html' not found"):
        run(run_scan(settings, clock=Clock()))
    assert run(queue_count(settings)) == 0
