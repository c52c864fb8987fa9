"""The send path end to end: queue (Azurite) -> send stage -> HVE emulator over TLS -> ledger."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy

import pytest

from shared.send.contract import content_request_id
from shared.ledger import recipient_hash
from shared.send.mime import message_id
from shared.send.stage import Relay
from tests.relay_harness import drain, enqueue, relay_settings


def run(coro):
    return asyncio.run(coro)


def mail(**extra):
    return {"to": ["Ann Example <ann@contoso.com>"], "subject": "Quarterly update", "text": "Hello Ann", **extra}


async def open_relay(storage, emulator, **overrides) -> Relay:
    return await Relay.create(relay_settings(storage, emulator, **overrides))


def stored(emulator, index=-1):
    return message_from_bytes(emulator.messages()[index].read_bytes(), policy=policy.default)


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_request_is_sent_and_recorded(storage, emulator, encoding):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id=f"req-{encoding}", category="newsletter", cc=["bob@fabrikam-internal.com"]), encoding=encoding)
            results = await drain(relay)
            entry = await relay.ledger.get(f"req-{encoding}")
            return results, entry
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["sent"]
    assert entry.state == "sent" and entry.attempts == 1 and entry.last_code == 250
    assert (entry.category, entry.internal_recipients, entry.external_recipients) == ("newsletter", 2, 0)
    msg = stored(emulator)
    assert msg["From"].addresses[0].addr_spec == entry.account
    assert msg["Message-ID"] == message_id(f"req-{encoding}", "contoso.com", key=b"test-hash-key") == entry.message_id
    assert msg["Subject"] == "Quarterly update"


def test_missing_id_is_derived_from_the_content_not_the_queue_message(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail())
            [handled] = await drain(relay)
            return handled, await relay.ledger.get(handled.request_id)
        finally:
            await relay.close()

    handled, entry = run(main())
    assert handled.state == "sent" and handled.request_id == content_request_id(json.dumps(mail()))
    assert entry.queue_message_id != handled.request_id


def test_claim_check_request_is_read_from_blob(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            big = mail(id="big-1", html="<p>" + "x" * 80_000 + "</p>")
            blob = await container.upload_blob("requests/producer-a/big-1/request.json", json.dumps(big))
            await enqueue(relay, {"id": "big-1", "claimCheck": {"blobUrl": blob.url}})
            return await drain(relay)
        finally:
            await relay.close()

    [handled] = run(main())
    assert handled.state == "sent"
    assert "x" * 1000 in stored(emulator).get_body(("html",)).get_content()


def test_claim_check_outside_the_container_is_refused(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, {"id": "evil-1", "claimCheck": {"blobUrl": "http://169.254.169.254/metadata/x.json"}})
            return await drain(relay), await relay.ledger.get("evil-1")
        finally:
            await relay.close()

    [handled], entry = run(main())
    assert handled.state == "refused" and entry.reason.startswith("claim-check")
    assert emulator.messages() == []


def test_attachments_inline_and_from_blob_arrive(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            blob = await container.upload_blob("requests/producer-a/att-1/report.pdf", b"%PDF-1.7 report")
            await enqueue(relay, mail(id="att-1", attachments=[
                {"name": "notes.txt", "contentType": "text/plain", "contentBase64": base64.b64encode(b"inline notes").decode()},
                {"name": "report.pdf", "contentType": "application/pdf", "blobUrl": blob.url},
            ]))
            return await drain(relay)
        finally:
            await relay.close()

    [handled] = run(main())
    assert handled.state == "sent"
    parts = {a.get_filename(): a.get_content() for a in stored(emulator).iter_attachments()}
    assert parts == {"notes.txt": "inline notes", "report.pdf": b"%PDF-1.7 report"}


@pytest.mark.parametrize("doc,reason", [
    (mail(id="inj-1", subject="Hi\r\nBcc: victim@evil.example"), "header-injection"),
    (mail(id="sendas-1", **{"from": "ceo@contoso.com"}), "send-as"),
    (mail(id="ext-1", cc=["someone@gmail.com"]), "external-not-allowed"),
    (mail(id="big-2", text="y" * 5000), "too-large"),
])
def test_bad_request_is_refused_recorded_and_not_retried(storage, emulator, doc, reason):
    async def main():
        relay = await open_relay(storage, emulator, HVE_LIMITS='{"message_bytes": 4000}')
        try:
            await enqueue(relay, doc)
            return await drain(relay), await relay.ledger.get(doc["id"])
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["refused"]
    assert entry.state == "refused" and entry.reason.startswith(reason)
    assert emulator.messages() == [] and emulator.connections_opened == 0


def test_malformed_json_is_recorded_under_its_queue_id_and_set_aside(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, '{"to": ["ann@contoso.com"], "text": ')
            [handled] = await drain(relay)
            return handled, await relay.ledger.get(handled.request_id)
        finally:
            await relay.close()

    handled, entry = run(main())
    assert handled.state == "refused" and entry.state == "refused"
    assert entry.reason.startswith("malformed: invalid JSON")


def test_duplicate_delivery_sends_once(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            for _ in range(3):
                await enqueue(relay, mail(id="dup-1"))
            return await drain(relay)
        finally:
            await relay.close()

    results = run(main())
    assert sorted(r.state for r in results) == ["duplicate", "duplicate", "sent"]
    assert len(emulator.messages()) == 1


def test_transient_4xx_is_retried_later_then_sent(storage, emulator):
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="transient-1"))
            return await drain(relay), await relay.ledger.get("transient-1")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    assert results[0].code == 451 and results[0].delay_seconds >= 1
    assert entry.state == "sent" and entry.attempts == 2
    assert len(emulator.messages()) == 1


def test_auth_failure_marks_the_account_and_another_account_sends(storage, emulator):
    emulator.set_password("news@contoso.com", "rotated-elsewhere")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="auth-1", account="news@contoso.com"))
            results = await drain(relay)
            states = {s.account: s for s in await relay.governor.states()}
            return results, states, await relay.ledger.get("auth-1")
        finally:
            await relay.close()

    results, states, entry = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    assert results[0].code == 535 and results[0].account == "news@contoso.com"
    assert states["news@contoso.com"].unhealthy_until > 0 and "5.7.3" in states["news@contoso.com"].last_problem
    assert entry.state == "sent" and entry.account != "news@contoso.com"


def test_connection_dropped_mid_session_loses_nothing(storage, emulator):
    emulator.drop_next(1, stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="drop-1"))
            return await drain(relay), await relay.ledger.get("drop-1")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    assert results[0].code == 0 and "connection lost" in results[0].reason
    assert entry.state == "sent" and len(emulator.messages()) == 1


def test_dropped_after_accept_resend_carries_the_same_message_id(storage, emulator):
    emulator.drop_next(1, stage="DATA", after_accept=True)

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="lost-250"))
            return await drain(relay)
        finally:
            await relay.close()

    results = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    ids = {m["Message-ID"] for m in (message_from_bytes(p.read_bytes(), policy=policy.default) for p in emulator.messages())}
    assert len(emulator.messages()) == 2 and ids == {message_id("lost-250", "contoso.com", key=b"test-hash-key")}


def test_gives_up_after_max_attempts_as_dead(storage, emulator):
    emulator.fail_next(5, "451 4.7.0 Temporary server error", stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator, SEND_MAX_ATTEMPTS="2")
        try:
            await enqueue(relay, mail(id="dead-1"))
            return await drain(relay), await relay.ledger.get("dead-1")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["deferred", "dead"]
    assert entry.state == "dead" and "2 attempts" in entry.reason and entry.last_code == 451


def test_sessions_are_reused_across_messages(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator, HVE_ACCOUNTS="news@contoso.com")
        try:
            for i in range(6):
                await enqueue(relay, mail(id=f"reuse-{i}"))
            results = await drain(relay)
            return results, relay.smtp.stats
        finally:
            await relay.close()

    results, stats = run(main())
    assert [r.state for r in results] == ["sent"] * 6
    assert emulator.connections_opened == 1 and emulator.auth_count == 1
    assert stats.sessions_reused == 5


def test_ledger_answers_was_this_address_mailed_without_storing_it(storage, emulator):
    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="who-1", bcc=["secret.person@contoso.com"]))
            await drain(relay)
            found = await relay.ledger.requests_for_address("Secret.Person@contoso.com")
            rows = [dict(r) async for r in (await relay.storage.table(storage.env()["LEDGER_TABLE"])).list_entities()]
            return found, rows
        finally:
            await relay.close()

    found, rows = run(main())
    assert [f["request_id"] for f in found] == ["who-1"]
    assert "secret.person" not in json.dumps(rows, default=str)
    assert recipient_hash(b"test-hash-key", "secret.person@contoso.com") != recipient_hash(b"other", "secret.person@contoso.com")


def test_xoauth2_token_is_refreshed_once_when_expired(storage, make_emulator, tmp_path):
    class Tokens:
        """An azure-identity style credential handing out tokens the emulator knows."""
        def __init__(self):
            self.issued = []

        async def get_token(self, *scopes, **kwargs):
            from azure.core.credentials import AccessToken
            token = ["expired-token", "fresh-token"][min(len(self.issued), 1)]
            self.issued.append(scopes)
            return AccessToken(token, 2 ** 31)

    emu = make_emulator(oauth_tokens={}, accounts={"news@contoso.com": "unused"})
    emu.set_oauth_token("expired-token", "news@contoso.com", expires_at=1.0)
    emu.set_oauth_token("fresh-token", "news@contoso.com")
    credential = Tokens()

    async def main():
        settings = relay_settings(storage, emu, HVE_AUTH="oauth", HVE_ACCOUNTS="news@contoso.com", HVE_PASSWORDS="")
        relay = await Relay.create(settings, token_credential=credential)
        try:
            await enqueue(relay, mail(id="oauth-1"))
            return await drain(relay)
        finally:
            await relay.close()

    results = run(main())
    assert [r.state for r in results] == ["sent"]
    assert credential.issued == [("https://outlook.office365.com/.default",)] * 2
    assert emu.auth_count == 1


def test_many_recipients_go_as_governed_chunks_with_their_own_message_ids(storage, emulator):
    recipients = [f"member{i}@contoso.com" for i in range(5)]

    async def main():
        relay = await open_relay(storage, emulator, HVE_LIMITS='{"recipients_per_message": 2}')
        try:
            await enqueue(relay, mail(id="chunky-1", to=recipients[:3], bcc=recipients[3:]))
            results = await drain(relay)
            return results, await relay.ledger.get("chunky-1"), await relay.ledger.chunks("chunky-1")
        finally:
            await relay.close()

    results, entry, chunks = run(main())
    assert [r.state for r in results] == ["sent"]
    assert (entry.chunks_total, entry.chunks_sent, entry.state) == (3, 3, "sent")
    accepted = emulator.accepted()
    assert [len(a.recipients) for a in accepted] == [2, 2, 1]
    assert sorted(r for a in accepted for r in a.recipients) == sorted(recipients)
    assert len({a.message_id for a in accepted}) == 3
    assert [c["RowKey"] for c in chunks] == ["chunk-0001", "chunk-0002", "chunk-0003"]
    assert all(c["LastCode"] == 250 for c in chunks)


def test_throttling_reply_cools_the_account_and_another_one_sends(storage, emulator):
    emulator.fail_next(1, "450 4.5.104 Message rejected. Excessive message rate from sender", stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail(id="throttled-1", account="alerts@contoso.com"))
            results = await drain(relay)
            return results, {s.account: s for s in await relay.governor.states()}
        finally:
            await relay.close()

    results, states = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    assert results[0].account == "alerts@contoso.com" and results[1].account != "alerts@contoso.com"
    assert states["alerts@contoso.com"].cooldown_until > 0 and "4.5.104" in states["alerts@contoso.com"].last_problem


def test_deferred_copy_carries_the_derived_id_and_the_attempts(storage, emulator):
    emulator.fail_next(1, "451 4.7.0 Temporary server error", stage="DATA")

    async def main():
        relay = await open_relay(storage, emulator)
        try:
            await enqueue(relay, mail())  # no id: the content's hash becomes it
            [first] = [m async for m in relay.queue.receive_messages(visibility_timeout=60)]
            handled = await relay.handle(first.content, first.id, first.dequeue_count)
            await relay.queue.delete_message(first)
            # The copy is invisible for delay_seconds by Azurite's clock: poll for it, with a deadline.
            copies: list[dict] = []
            deadline = time.monotonic() + handled.delay_seconds + 30
            while not copies and time.monotonic() < deadline:
                copies = [json.loads(m.content) async for m in relay.queue.receive_messages(visibility_timeout=60)]
                if not copies:
                    await asyncio.sleep(0.2)
            return first.id, handled, copies
        finally:
            await relay.close()

    _, handled, copies = run(main())
    derived = content_request_id(json.dumps(mail()))
    assert handled.state == "deferred" and handled.request_id == derived
    assert len(copies) == 1 and copies[0]["id"] == derived and copies[0]["attempt"] == 1
    assert copies[0]["to"] == mail()["to"]


def test_usage_report_counts_outcomes_and_recipients_per_day_account_and_category(storage, emulator):
    # The relay's clock starts at noon UTC of a fixed day: the report's day is known before the
    # run, and a run near midnight cannot put the requests on two days.
    noon = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
    offset = noon.timestamp() - time.time()

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_ACCOUNTS="news@contoso.com"),
                                   clock=lambda: time.time() + offset)
        try:
            await enqueue(relay, mail(id="rep-1", category="orders", cc=["bob@contoso.com"]))
            await enqueue(relay, mail(id="rep-2", category="orders"))
            await enqueue(relay, mail(id="rep-3", category="orders", cc=["x@gmail.com"]))  # refused: external
            await drain(relay)
            return await relay.ledger.report(noon - timedelta(days=1))
        finally:
            await relay.close()

    rows = run(main())
    today = noon.date().isoformat()
    sent = next(r for r in rows if r["account"] == "news@contoso.com")
    assert (sent["day"], sent["category"], sent["requests"], sent["outcomes"]) == (today, "orders", 2, {"sent": 2})
    assert (sent["internal_recipients"], sent["external_recipients"]) == (3, 0)
    refused = next(r for r in rows if r["account"] == "-")
    assert refused["outcomes"] == {"refused": 1}
