"""POST /api/send's intake (shared/send/intake.py) against real Azurite and the HVE emulator: the
request goes onto the real queue and the real send stage sends it. Idempotency by id, the claim
check, refusals, the size limit, and a claim left behind by a POST that died."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import Any

import jsonschema
import pytest

from shared.ledger import RECEIVED, LedgerEntry
from shared.send.contract import content_digest, content_request_id
from shared.send.intake import Answer, intake_for
from shared.send.mime import message_id
from shared.send.retry import MAX_VISIBILITY_SECONDS
from shared.send.stage import Relay
from tests.relay_harness import drain, enqueue, relay_settings
from tests.schemas import ERROR_SCHEMA, SEND_SCHEMA
from tests.test_no_addresses import leaks


def mail(request_id: str | None = "order-1", to: Any = ("ann@contoso.com",), **extra: Any) -> dict[str, Any]:
    doc = {"to": list(to), "subject": "Your order", "text": "Hello", **extra}
    if request_id is not None:
        doc["id"] = request_id
    return doc


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def queue_depth(relay: Relay) -> int:
    return len(await relay.queue.peek_messages(max_messages=32))


def run(coro_fn, storage, emulator, **settings: str):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, **settings))
        try:
            return await coro_fn(relay)
        finally:
            await relay.close()

    return asyncio.run(main())


def accepted(answer: Answer, request_id: str) -> None:
    assert answer.status == 202, answer
    jsonschema.validate(answer.body, SEND_SCHEMA)
    assert answer.body == {"id": request_id, "status": f"/api/requests/{request_id}"}
    assert answer.headers["Location"] == answer.body["status"]


def test_an_accepted_post_is_one_queue_message_that_the_send_stage_sends(storage, emulator):
    async def go(relay: Relay):
        answer = await intake_for(relay).submit(body(mail("order-1")))
        row = await relay.ledger.get("order-1")
        depth = await queue_depth(relay)
        handled = await drain(relay)
        return answer, row, depth, handled, await relay.ledger.get("order-1")

    answer, row, depth, handled, final = run(go, storage, emulator)
    accepted(answer, "order-1")
    # Claimed in the ledger (received, with its digest) and on the queue, noted in the row.
    assert row.state == RECEIVED and row.content_digest and row.queue_message_id and depth == 1
    assert [h.state for h in handled] == ["sent"] and final.state == "sent" and final.attempts == 1
    assert final.first_received == row.first_received
    assert [a.message_id for a in emulator.accepted()] == [message_id("order-1", "contoso.com", key=b"test-hash-key")]


def test_the_same_body_again_is_202_under_the_same_id_and_no_second_queue_message(storage, emulator):
    async def go(relay: Relay):
        intake = intake_for(relay)
        first = await intake.submit(body(mail("again-1")))
        # The same content with its keys in another order is the same request.
        doc = mail("again-1")
        second = await intake.submit(json.dumps(dict(reversed(list(doc.items())))).encode())
        depth = await queue_depth(relay)
        await drain(relay)
        after_sent = await intake.submit(body(mail("again-1")))
        return first, second, depth, after_sent, await queue_depth(relay)

    first, second, depth, after_sent, depth_after = run(go, storage, emulator)
    for answer in (first, second, after_sent):
        accepted(answer, "again-1")
    assert depth == 1 and depth_after == 0
    assert len(emulator.accepted()) == 1


def test_a_different_body_under_a_taken_id_is_409_and_the_first_request_goes_on(storage, emulator):
    async def go(relay: Relay):
        intake = intake_for(relay)
        first = await intake.submit(body(mail("taken-1")))
        other = await intake.submit(body(mail("taken-1", subject="Something else")))
        depth = await queue_depth(relay)
        await drain(relay)
        return first, other, depth, await relay.ledger.get("taken-1")

    first, other, depth, row = run(go, storage, emulator)
    accepted(first, "taken-1")
    assert other.status == 409
    jsonschema.validate(other.body, ERROR_SCHEMA)
    assert other.body["error"] == "id-conflict" and other.body["reasons"][0]["reason"] == "id-conflict"
    assert depth == 1 and row.state == "sent" and len(emulator.accepted()) == 1


def test_concurrent_identical_posts_enqueue_once_and_all_get_the_same_id(storage, emulator):
    async def go(relay: Relay):
        intakes = [intake_for(relay) for _ in range(6)]  # as if six instances answered at once
        answers = await asyncio.gather(*(i.submit(body(mail("race-1"))) for i in intakes))
        depth = await queue_depth(relay)
        await drain(relay)
        return answers, depth

    answers, depth = run(go, storage, emulator)
    for answer in answers:
        accepted(answer, "race-1")
    assert depth == 1
    assert len(emulator.accepted()) == 1


def test_concurrent_identical_big_posts_leave_one_claim_check_blob(storage, emulator):
    """Every POST uploads its copy before the claim; the losers delete theirs."""
    big = mail("race-big", attachments=[{"name": "a.bin", "contentType": "application/octet-stream",
                                         "contentBase64": base64.b64encode(b"x" * 80_000).decode()}])

    async def go(relay: Relay):
        answers = await asyncio.gather(*(intake_for(relay).submit(body(big)) for _ in range(4)))
        container = relay.storage.container(relay.settings.claim_check_container)
        names = [b.name async for b in container.list_blobs(name_starts_with="requests/")]
        return answers, names, await queue_depth(relay)

    answers, names, depth = run(go, storage, emulator)
    for answer in answers:
        accepted(answer, "race-big")
    assert depth == 1 and len(names) == 1 and names[0].startswith("requests/http/race-big/")


def test_a_request_without_an_id_gets_the_queue_paths_content_id_and_a_retry_gets_the_same(storage, emulator):
    raw = body(mail(None))

    async def go(relay: Relay):
        intake = intake_for(relay)
        first, again = await intake.submit(raw), await intake.submit(raw)
        depth = await queue_depth(relay)
        handled = await drain(relay)
        return first, again, depth, handled

    first, again, depth, handled = run(go, storage, emulator)
    expected = content_request_id(raw)
    accepted(first, expected)
    accepted(again, expected)
    # The relay's own id namespace: the copy carries the proof, so the send stage does not refuse it.
    assert depth == 1 and [(h.request_id, h.state) for h in handled] == [(expected, "sent")]


def test_a_request_over_a_queue_message_goes_by_claim_check_under_the_http_producer(storage, emulator):
    attachment = base64.b64encode(bytes(range(256)) * 400).decode()  # ~136 KB of base64
    doc = mail("big-1", attachments=[{"name": "data.bin", "contentType": "application/octet-stream",
                                      "contentBase64": attachment}])

    async def go(relay: Relay):
        answer = await intake_for(relay).submit(body(doc))
        [message] = await relay.queue.peek_messages()
        row = await relay.ledger.get("big-1")
        handled = await drain(relay)
        container = relay.storage.container(relay.settings.claim_check_container)
        left = [b.name async for b in container.list_blobs(name_starts_with="requests/")]
        return answer, json.loads(message.content), row, handled, left

    answer, stub, row, handled, left = run(go, storage, emulator)
    accepted(answer, "big-1")
    assert set(stub) == {"id", "claimCheck"} and stub["id"] == "big-1"
    assert f"/{storage.container_name}/requests/http/big-1/" in stub["claimCheck"]["blobUrl"]
    assert row.claim_blob == stub["claimCheck"]["blobUrl"]
    assert [h.state for h in handled] == ["sent"]
    [sent] = emulator.accepted()
    assert b"data.bin" in sent.path.read_bytes()
    assert left == []  # the relay deleted the claim check once the request was final


def test_refusals_are_the_queue_paths_reasons_naming_fields_never_values(storage, emulator):
    needle = "carol.private@contoso.com"
    cases = {
        "bad-address": mail("r-1", to=["ann@contoso.com", "bob..x@contoso.com"]),
        "no-recipients": mail("r-2", to=[]),
        "no-body": mail("r-3", text=""),
        "external-not-allowed": mail("r-4", to=["ext.person@gmail-like.example"]),
        "send-as": mail("r-5", **{"from": needle}),
        "unknown-account": mail("r-6", account=needle),
        "address-shaped": mail(needle),
        "reserved-id": mail("c-" + "0" * 32),
        "header-injection": mail("r-7", subject="hi\r\nBcc: " + needle),
        "bad-attachment": mail("r-8", attachments=[{"name": "a", "contentBase64": "not base64!"}]),
        "schema": {**mail("r-10"), needle: "x"},
        "bad-send-at": mail("r-11", sendAt="2026-03-10 13:00"),
        "send-at-too-far": mail("r-12", sendAt="2999-01-01T00:00:00Z"),
        "malformed": b'{"to": ["' + needle.encode() + b'"], "text": ',
    }

    async def go(relay: Relay):
        intake = intake_for(relay)
        # Another request's blob (producer-a's, under another id): refused before anything is read.
        url = relay.storage.container(relay.settings.claim_check_container).url
        cases["blob-not-owned"] = mail("r-9", attachments=[
            {"name": "a.pdf", "blobUrl": f"{url}/requests/producer-a/other-id/x/a.pdf"}])
        out = {}
        for reason, doc in cases.items():
            out[reason] = await intake.submit(doc if isinstance(doc, bytes) else body(doc))
        return out, await queue_depth(relay)

    answers, depth = run(go, storage, emulator)
    assert depth == 0
    for reason, answer in answers.items():
        assert answer.status == 400, (reason, answer)
        jsonschema.validate(answer.body, ERROR_SCHEMA)
        assert answer.body["error"] == "refused"
        assert [r["reason"] for r in answer.body["reasons"]] == [reason]
        assert leaks(json.dumps(answer.body)) == [], (reason, answer.body)
    assert answers["bad-address"].body["reasons"][0]["detail"].startswith("to[1]")


def test_a_body_over_the_limit_is_413_and_a_declared_length_over_it_is_refused_unread(storage, emulator):
    async def go(relay: Relay):
        intake = intake_for(relay, max_body_bytes=4096)
        declared = await intake.submit(b"this is not even JSON", content_length="5000")
        actual = await intake.submit(body(mail("large-1", text="x" * 5000)))
        just_under = await intake.submit(body(mail("large-2", text="x" * 3000)))
        return declared, actual, just_under, await queue_depth(relay)

    declared, actual, just_under, depth = run(go, storage, emulator)
    for answer in (declared, actual):
        assert answer.status == 413
        jsonschema.validate(answer.body, ERROR_SCHEMA)
        assert answer.body["error"] == "too-large" and "HTTP_SEND_MAX_BYTES" in answer.body["reasons"][0]["detail"]
    accepted(just_under, "large-2")
    assert depth == 1


def test_a_claim_left_by_a_post_that_died_before_the_queue_is_taken_over_after_the_lease(storage, emulator):
    """A POST that claimed the id and died before the queue left a `received` row without a queue
    message. An identical POST within the lease is told to come back (503); after it, it enqueues."""
    clock = Clock()
    doc = mail("orphan-1")

    async def go(relay: Relay):
        key = relay.settings.recipient_hash_key
        at = datetime.fromtimestamp(clock.now, UTC)
        await relay.ledger.save(LedgerEntry("orphan-1", RECEIVED, at, at, chunks_total=0,
                                            content_digest=content_digest(key, doc)))
        intake = intake_for(relay, clock=clock, sleep=no_sleep, lease_seconds=30.0, wait_seconds=0.5)
        clock.now += 29
        early = await intake.submit(body(doc))
        early_depth = await queue_depth(relay)
        clock.now += 1
        late = await intake.submit(body(doc))
        depth = await queue_depth(relay)
        again = await intake.submit(body(doc))
        await drain(relay)
        return early, early_depth, late, depth, again, await queue_depth(relay)

    early, early_depth, late, depth, again, depth_after = run(go, storage, emulator)
    assert early.status == 503 and early.body["error"] == "busy" and early.headers["Retry-After"] == "30"
    jsonschema.validate(early.body, ERROR_SCHEMA)
    assert early_depth == 0
    accepted(late, "orphan-1")
    accepted(again, "orphan-1")
    assert depth == 1 and depth_after == 0 and len(emulator.accepted()) == 1


def test_a_failed_queue_write_gives_the_id_back_so_a_retry_is_new(storage, emulator):
    async def go(relay: Relay):
        # A queue that does not exist (storage refuses the write): the claim is withdrawn.
        missing = relay.storage.queues.get_queue_client(f"{relay.settings.mail_queue}-missing")
        failed = await intake_for(relay, queue=missing).submit(body(mail("retry-1")))
        row = await relay.ledger.get("retry-1")
        retried = await intake_for(relay).submit(body(mail("retry-1")))
        return failed, row, retried, await queue_depth(relay)

    failed, row, retried, depth = run(go, storage, emulator)
    assert failed.status == 503 and failed.body["error"] == "unavailable"
    jsonschema.validate(failed.body, ERROR_SCHEMA)
    assert row is None
    accepted(retried, "retry-1")
    assert depth == 1


def test_a_queue_producer_and_an_http_client_share_one_namespace_of_ids(storage, emulator):
    queued = mail("shared-1")

    async def go(relay: Relay):
        await enqueue(relay, queued)
        await drain(relay)
        intake = intake_for(relay)
        other = await intake.submit(body(mail("shared-1", subject="Another mail")))
        same = await intake.submit(body(queued))
        return other, same, await queue_depth(relay)

    other, same, depth = run(go, storage, emulator)
    assert other.status == 409
    accepted(same, "shared-1")
    assert depth == 0 and len(emulator.accepted()) == 1


def test_the_http_producer_name_is_the_relays_own():
    from shared.send.blobs import HTTP_PRODUCER, RELAY_PRODUCERS
    from shared.settings import RESERVED_PRODUCERS, Settings, SettingsError

    assert HTTP_PRODUCER in RELAY_PRODUCERS and RESERVED_PRODUCERS == {HTTP_PRODUCER}
    with pytest.raises(SettingsError, match="relay's own producer name"):
        Settings.from_env({"BLOB_PRODUCERS": "shop,http"})


def test_an_http_request_is_sent_on_the_governed_path_too(storage, emulator):
    """Under preview-2024 every transaction goes through the governor's acquire; the intake's
    `received` row is read there instead of created by the send stage."""

    async def go(relay: Relay):
        answer = await intake_for(relay).submit(body(mail("governed-1")))
        handled = await drain(relay)
        return answer, handled, await relay.ledger.get("governed-1")

    answer, handled, row = run(go, storage, emulator, HVE_LIMITS_PROFILE="preview-2024")
    accepted(answer, "governed-1")
    assert [h.state for h in handled] == ["sent"] and row.state == "sent" and row.attempts == 1


# --- replyTo and sendAt over HTTP ------------------------------------------------------------------


class RecordingQueue:
    """The real queue client, noting the visibility delay of every message put on it."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.delays: list[Any] = []

    async def send_message(self, content: str, **kwargs: Any) -> Any:
        self.delays.append(kwargs.get("visibility_timeout"))
        return await self.queue.send_message(content, **kwargs)


async def on_queue(relay: Relay) -> tuple[int, int]:
    """(messages on the queue, of which visible now)."""
    total = (await relay.queue.get_queue_properties()).approximate_message_count
    return total, await queue_depth(relay)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def test_a_post_with_send_at_is_queued_hidden_until_then_and_sent_with_its_reply_to(storage, emulator):
    """The intake puts a request whose sendAt is ahead on the queue hidden for the time left, so
    the send stage does not even read it before it is due; replyTo goes through as on the queue path."""
    doc = mail("later-http-1", replyTo=["Help Desk <help.desk@contoso.com>"])

    async def go(relay: Relay):
        queue = RecordingQueue(relay.queue)
        doc["sendAt"] = iso(time.time() + 3.5)
        answer = await intake_for(relay, queue=queue).submit(body(doc))
        posted = time.monotonic()
        row = await relay.ledger.get("later-http-1")
        hidden = await on_queue(relay)
        while not (await on_queue(relay))[1] and time.monotonic() < posted + 30:
            await asyncio.sleep(0.1)
        back_after = time.monotonic() - posted
        handled = await drain(relay)
        return answer, queue.delays, row, hidden, back_after, handled, await relay.ledger.get("later-http-1")

    answer, delays, row, hidden, back_after, handled, final = run(go, storage, emulator)
    accepted(answer, "later-http-1")
    assert delays in ([3], [4])                # the time left, whole seconds rounded up, no jitter
    assert row.state == RECEIVED and row.send_at == datetime.fromisoformat(doc["sendAt"]).timestamp()
    assert hidden == (1, 0)                    # on the queue, invisible
    assert back_after >= delays[0] - 1.0       # Azurite kept it hidden for its visibility delay
    assert [h.state for h in handled] == ["sent"] and final.state == "sent" and final.attempts == 1
    [accepted_mail] = emulator.accepted()
    assert accepted_mail.recipients == ("ann@contoso.com",)  # Reply-To is no recipient
    sent = message_from_bytes(accepted_mail.path.read_bytes(), policy=policy.default)
    assert [a.addr_spec for a in sent["Reply-To"].addresses] == ["help.desk@contoso.com"]


def test_a_post_with_send_at_days_ahead_is_hidden_at_most_the_queues_7_days(storage, emulator):
    clock = Clock(start=float(int(time.time())))

    async def go(relay: Relay):
        queue = RecordingQueue(relay.queue)
        intake = intake_for(relay, queue=queue, clock=clock)
        answers = [
            await intake.submit(body(mail("days-1", sendAt=iso(clock.now + 2 * 86400)))),
            await intake.submit(body(mail("week-1", sendAt=iso(clock.now + 7 * 86400)))),
            await intake.submit(body(mail("past-1", sendAt=iso(clock.now - 600)))),
        ]
        visible = [json.loads(m.content)["id"] for m in await relay.queue.peek_messages(max_messages=32)]
        return answers, queue.delays, await on_queue(relay), visible

    answers, delays, (total, _), visible = run(go, storage, emulator)
    for answer, request_id in zip(answers, ["days-1", "week-1", "past-1"], strict=True):
        accepted(answer, request_id)
    # 2 days: the time left; 7 days: the queue's longest (the send stage holds it for the last
    # minute); in the past: at once.
    assert delays == [2 * 86400, MAX_VISIBILITY_SECONDS, None]
    assert total == 3 and visible == ["past-1"]


def test_send_at_over_http_is_refused_as_on_the_queue_path_and_nothing_is_queued(storage, emulator):
    clock = Clock(start=float(int(time.time())))

    async def go(relay: Relay):
        intake = intake_for(relay, clock=clock)
        too_far = await intake.submit(body(mail("far-1", sendAt=iso(clock.now + 7 * 86400 + 60))))
        no_zone = await intake.submit(body(mail("zone-1", sendAt="2026-03-10T13:00:00")))
        return too_far, no_zone, await on_queue(relay), await relay.ledger.get("far-1")

    too_far, no_zone, depth, row = run(go, storage, emulator)
    for answer, reason in ((too_far, "send-at-too-far"), (no_zone, "bad-send-at")):
        assert answer.status == 400
        jsonschema.validate(answer.body, ERROR_SCHEMA)
        assert [r["reason"] for r in answer.body["reasons"]] == [reason]
    assert depth == (0, 0) and row is None
