"""No recipient address reaches the ledger, the recipient index, the logs or the spans: a demo-like
run with refused addresses and HVE replies that quote recipients, then a scan of everything stored."""

from __future__ import annotations

import asyncio
import json
import logging


from shared.ledger import recipient_hash
from shared.send.replies import mask_addresses
from shared.send.stage import Relay
from shared.telemetry import Instruments
from tests import test_telemetry
from tests.relay_harness import drain, enqueue, relay_settings

# Distinctive local parts, so a hit in a scan is this test's address and nothing else.
SENT_TO = ["Ann Privatename <ann.privatename@contoso.com>", "bob.hidden@fabrikam-internal.com"]
CC = "cc.quietperson@contoso.com"
BCC = "bcc.invisible@contoso.com"
BAD = "bob..x@contoso.com"
EXTERNAL = "ext.person@gmail-like.example"
REFUSED_BY_HVE = "carol.private@contoso.com"
DEFERRED_FOR = "dana.retry@contoso.com"
RCPT_REFUSED = "erin.unknown@contoso.com"
SEND_AS = "fred.spoof@contoso.com"
# Reply-To is not a recipient: not hashed into the index either, and never in clear.
REPLY_TO = ["Rita Replies <rita.replies@contoso.com>", "remote.replier@gmail-like.example"]
BAD_REPLY_TO = "rex..broken@contoso.com"
ADDRESSES = [a.split("<")[-1].rstrip(">") for a in SENT_TO + REPLY_TO] + [
    CC, BCC, BAD, EXTERNAL, REFUSED_BY_HVE, DEFERRED_FOR, RCPT_REFUSED, SEND_AS, BAD_REPLY_TO]
# The needles: each full address, and each local part (an address masked badly leaves it behind).
NEEDLES = sorted({a.lower() for a in ADDRESSES} | {a.split("@")[0].lower() for a in ADDRESSES} | {"privatename"})


def mail(request_id: str, to, **extra):
    return {"id": request_id, "to": to, "subject": "Quarterly update", "text": "Hello", **extra}


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [needle for needle in NEEDLES if needle in lowered]


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The emulator and its SMTP server library stand in for HVE: their logs are HVE's, not ours.
        if record.name.startswith(("hve_emulator", "mail.log")):
            return
        self.lines.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}")


def test_mask_addresses_keeps_the_domain_and_hides_the_local_part():
    assert mask_addresses("550 5.1.1 <carol.private@contoso.com>: User unknown") == "550 5.1.1 <***@contoso.com>: User unknown"
    assert mask_addresses("'bob..x@contoso.com', \"a b\"@x.org o'brien@sub.example.co.uk") == \
        "'***@contoso.com', ***@x.org ***@sub.example.co.uk"
    assert mask_addresses("451 4.7.0 Temporary server error") == "451 4.7.0 Temporary server error"


def test_a_demo_run_leaves_no_address_in_ledger_index_logs_or_spans(storage, emulator):
    test_telemetry.SPANS.clear()
    # HVE quotes the recipient in its replies: a permanent 550, a transient 451, a refused RCPT.
    emulator.fail_next(1, f"550 5.1.1 <{REFUSED_BY_HVE}>: Recipient address rejected: User unknown", stage="DATA")
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS='{"recipients_per_message": 2}'))
        # Spans go to test_telemetry's in-memory exporter whatever the process-wide provider is.
        relay.instruments = Instruments(test_telemetry.TRACER_PROVIDER, test_telemetry.METER_PROVIDER)
        try:
            # One at a time, so each fault meets the request it is meant for.
            await enqueue(relay, mail("refused-by-hve", [REFUSED_BY_HVE]))
            await drain(relay)
            emulator.fail_next(1, f"451 4.7.0 <{DEFERRED_FOR}> mailbox busy, try again later", stage="DATA")
            await enqueue(relay, mail("deferred-then-sent", [DEFERRED_FOR]))
            await drain(relay)
            emulator.fail_next(1, f"550 5.1.1 <{RCPT_REFUSED}>: Recipient address rejected", stage="RCPT")
            await enqueue(relay, mail("one-rcpt-refused", [RCPT_REFUSED, "bob.hidden@fabrikam-internal.com"]))
            await drain(relay)
            for doc in [
                mail("sent-chunked", SENT_TO, cc=[CC], bcc=[BCC], category="newsletter", replyTo=REPLY_TO),
                mail("bad-address", ["ann.privatename@contoso.com", BAD]),
                mail("bad-reply-to", ["ann.privatename@contoso.com"], replyTo=[REPLY_TO[0], BAD_REPLY_TO]),
                mail("external", [EXTERNAL]),
                mail("send-as", ["ann.privatename@contoso.com"], **{"from": SEND_AS}),
                mail("unknown-account", ["ann.privatename@contoso.com"], account=SEND_AS),
            ]:
                await enqueue(relay, doc)
            await enqueue(relay, b'{"to": ["' + BAD.encode() + b'"], "text": ')  # unreadable: recorded by queue id
            handled = await drain(relay)
            ledger = [dict(r) async for r in (await relay.storage.table(storage.env()["LEDGER_TABLE"])).list_entities()]
            index = [dict(r) async for r in (await relay.storage.table(storage.env()["RECIPIENT_INDEX_TABLE"])).list_entities()]
            return handled, ledger, index
        finally:
            await relay.close()

    try:
        handled, ledger, index = asyncio.run(main())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    rows = {r["PartitionKey"]: r for r in ledger if r["RowKey"] == "request"}
    # The run did what it should, so the scan below covers refusals and HVE's replies.
    assert rows["refused-by-hve"]["State"] == "refused" and "5.1.1" in rows["refused-by-hve"]["Reason"]
    assert rows["deferred-then-sent"]["State"] == "sent" and rows["deferred-then-sent"]["Attempts"] == 2
    assert rows["sent-chunked"]["State"] == "sent" and rows["sent-chunked"]["ChunksTotal"] == 2
    assert rows["bad-address"]["Reason"].startswith("bad-address: to[1]")
    assert rows["bad-reply-to"]["Reason"].startswith("bad-address: replyTo[1]")
    # "Was this address mailed?" is about recipients: Reply-To addresses are not indexed, even hashed.
    assert {recipient_hash(b"test-hash-key", a.split("<")[-1].rstrip(">")) for a in REPLY_TO}.isdisjoint(
        {r["PartitionKey"] for r in index} | {r["RowKey"] for r in index})
    assert rows["external"]["Reason"].startswith("external-not-allowed")
    assert rows["send-as"]["Reason"].startswith("send-as") and rows["unknown-account"]["Reason"].startswith("unknown-account")
    assert any(r["State"] == "refused" and r["Reason"].startswith("malformed") for r in rows.values())
    assert len(index) >= 6 and handler.lines
    spans = [dict(s.attributes) for s in test_telemetry.SPANS.get_finished_spans()]
    assert len(spans) >= len(handled)

    assert leaks(json.dumps(ledger, default=str)) == []
    assert leaks(json.dumps(index, default=str)) == []
    assert [line for line in handler.lines if leaks(line)] == []
    assert leaks(json.dumps(spans, default=str)) == []
    assert [s.attributes for s in test_telemetry.SPANS.get_finished_spans() for e in s.events if leaks(str(e.attributes))] == []


def test_mask_addresses_hides_local_parts_whatever_their_case_or_their_domains_case():
    assert mask_addresses("550 5.1.1 <Carol.Private@Contoso.COM>: User unknown") == \
        "550 5.1.1 <***@Contoso.COM>: User unknown"
    assert mask_addresses("RCPT TO:<CAROL.PRIVATE@CONTOSO.COM> refused; cc Dana.Retry@Sub.Contoso.Com.") == \
        "RCPT TO:<***@CONTOSO.COM> refused; cc ***@Sub.Contoso.Com."
    assert mask_addresses('"Carol Private"@Contoso.COM, O\'Brien@Example.CO.UK') == "***@Contoso.COM, ***@Example.CO.UK"
    assert mask_addresses("Carol.Private@[10.0.0.1] and Carol.Private@Müller.COM") == "***@[10.0.0.1] and ***@Müller.COM"


# Mixed-case addresses: HVE quotes recipients as the client wrote them, producers write them any way.
MIXED_REFUSED = "Carol.Mixedcase@Contoso.COM"
MIXED_DEFERRED = "Dana.Uppercase@CONTOSO.COM"
MIXED_RCPT = "Erin.Camelcase@Contoso.Com"
MIXED_BAD = "Bob..Badcase@Contoso.COM"
MIXED_EXTERNAL = "Ext.Titlecase@Gmail-Like.EXAMPLE"
MIXED_SEND_AS = "Fred.Spoofcase@Contoso.COM"
MIXED_OK = "Gina.Fine@Fabrikam-Internal.COM"
MIXED = [MIXED_REFUSED, MIXED_DEFERRED, MIXED_RCPT, MIXED_BAD, MIXED_EXTERNAL, MIXED_SEND_AS, MIXED_OK]
MIXED_NEEDLES = sorted({a.lower() for a in MIXED} | {a.split("@")[0].lower() for a in MIXED})


def test_mixed_case_addresses_quoted_by_hve_or_a_refusal_leave_no_trace_in_ledger_logs_aggregates_or_spans(storage, emulator):
    test_telemetry.SPANS.clear()
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    env = storage.env()

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0"))
        relay.instruments = Instruments(test_telemetry.TRACER_PROVIDER, test_telemetry.METER_PROVIDER)
        try:
            emulator.fail_next(1, f"550 5.1.1 <{MIXED_REFUSED}>: Recipient address rejected: User unknown", stage="DATA")
            await enqueue(relay, mail("mixed-refused", [MIXED_REFUSED]))
            await drain(relay)
            emulator.fail_next(1, f"451 4.7.0 <{MIXED_DEFERRED}> mailbox busy, try again later", stage="DATA")
            await enqueue(relay, mail("mixed-deferred", [MIXED_DEFERRED]))
            await drain(relay)
            emulator.fail_next(1, f"550 5.1.1 <{MIXED_RCPT}>: Recipient address rejected", stage="RCPT")
            await enqueue(relay, mail("mixed-rcpt", [MIXED_RCPT, MIXED_OK]))
            await drain(relay)
            for doc in [mail("mixed-bad", [MIXED_OK, MIXED_BAD]), mail("mixed-external", [MIXED_EXTERNAL]),
                        mail("mixed-send-as", [MIXED_OK], **{"from": MIXED_SEND_AS}),
                        mail("mixed-account", [MIXED_OK], account=MIXED_SEND_AS)]:
                await enqueue(relay, doc)
            await drain(relay)
            await relay.aggregates.flush()
            tables = {}
            for name in ("LEDGER_TABLE", "RECIPIENT_INDEX_TABLE", "AGGREGATES_TABLE"):
                tables[name] = [dict(r) async for r in (await relay.storage.table(env[name])).list_entities()]
            return tables
        finally:
            await relay.close()

    try:
        tables = asyncio.run(main())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    def mixed_leaks(text: str) -> list[str]:
        lowered = text.lower()
        return [needle for needle in MIXED_NEEDLES if needle in lowered]

    rows = {r["PartitionKey"]: r for r in tables["LEDGER_TABLE"] if r["RowKey"] == "request"}
    # The run did what it should: HVE's replies and the refusals quoting the addresses happened.
    assert rows["mixed-refused"]["State"] == "refused" and "***@Contoso.COM" in rows["mixed-refused"]["Reason"]
    assert rows["mixed-deferred"]["State"] == "sent" and rows["mixed-deferred"]["Attempts"] == 2
    assert rows["mixed-rcpt"]["State"] == "sent" and rows["mixed-rcpt"]["RefusedRecipients"] == "0"
    assert rows["mixed-bad"]["State"] == rows["mixed-external"]["State"] == "refused"
    assert rows["mixed-send-as"]["State"] == rows["mixed-account"]["State"] == "refused"
    assert tables["AGGREGATES_TABLE"] and handler.lines
    spans = [dict(s.attributes) for s in test_telemetry.SPANS.get_finished_spans()]
    for name, found in tables.items():
        assert mixed_leaks(json.dumps(found, default=str)) == [], name
    assert [line for line in handler.lines if mixed_leaks(line)] == []
    assert mixed_leaks(json.dumps(spans, default=str)) == []


# Addresses a producer put where the relay keeps text in clear: the request id and the category.
IN_ID = "ann.smith@contoso.com"
IN_CATEGORY = "bob.jones@contoso.com"


def test_an_address_shaped_id_or_category_is_refused_and_kept_out_of_ledger_keys_logs_and_aggregates(storage, emulator):
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0"))
        try:
            await enqueue(relay, mail(f"invoice-{IN_ID}", ["ann@contoso.com"]))
            await enqueue(relay, mail("invoice-1042", ["ann@contoso.com"], category=IN_CATEGORY))
            await enqueue(relay, {"to": ["ann@contoso.com"], "text": "no id", "category": f"for {IN_CATEGORY}"},
                          encoding="base64")
            await enqueue(relay, {"id": f"big-{IN_ID}", "claimCheck": {"blobUrl": f"{relay.payloads._prefix}x.json"}})
            handled = await drain(relay)
            await relay.aggregates.flush()
            tables = {}
            for name in ("LEDGER_TABLE", "RECIPIENT_INDEX_TABLE", "AGGREGATES_TABLE"):
                table = await relay.storage.table(storage.env()[name])
                tables[name] = [dict(r) async for r in table.list_entities()]
            return handled, tables
        finally:
            await relay.close()

    try:
        handled, tables = asyncio.run(main())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    assert sorted(h.state for h in handled) == ["refused"] * 4, handled
    reasons = sorted(h.reason.split(":")[0] for h in handled)
    assert reasons == ["address-shaped"] * 4, handled
    rows = [r for r in tables["LEDGER_TABLE"] if r["RowKey"] == "request"]
    assert sorted(r["Reason"].split(":")[0] for r in rows) == ["address-shaped"] * 4
    assert {r["State"] for r in rows} == {"refused"} and emulator.accepted() == []
    assert tables["AGGREGATES_TABLE"], "the refusals are counted"
    needles = [IN_ID, IN_CATEGORY, "ann.smith", "bob.jones"]
    for name, stored in tables.items():
        text = json.dumps(stored, default=str).lower()
        assert [n for n in needles if n in text] == [], name
    assert handler.lines and [line for line in handler.lines if any(n in line.lower() for n in needles)] == []
