"""Reply-To (`replyTo`) and the headers the relay adds to every message (`Auto-Submitted`,
`X-Auto-Response-Suppress`): the contract and MIME as pure code, then what reaches the HVE
emulator over TLS through the real send stage and Azurite."""

from __future__ import annotations

import asyncio
from email import message_from_bytes, policy

import pytest

from shared.send.contract import Address, RequestRefused, ValidationPolicy, validate_request
from shared.send.mime import automatic_headers, build_message
from shared.send.stage import Relay
from shared.settings import Settings, SettingsError
from tests.relay_harness import drain, enqueue, relay_settings

POLICY = ValidationPolicy(
    accounts=frozenset({"news@contoso.com"}),
    internal_domains=frozenset({"contoso.com"}),
    external_allowed=False,
    max_recipients=1,
)


def good(**extra):
    return {"to": ["ann@contoso.com"], "subject": "Hello", "text": "Hi Ann", **extra}


def refusal(doc) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        validate_request(doc, POLICY)
    return info.value


def parsed(request, relay_headers=()):
    raw = build_message(request, request_id="r-1", account="news@contoso.com", sender_name="News",
                        message_id_domain="contoso.com", message_id_key=b"k", attachments=[],
                        relay_headers=relay_headers)
    return message_from_bytes(raw, policy=policy.default)


# --- the contract ---------------------------------------------------------------------------------

def test_reply_to_takes_one_address_or_a_list_with_display_names():
    assert validate_request(good(replyTo="help@contoso.com"), POLICY).reply_to == (Address("help@contoso.com"),)
    request = validate_request(good(replyTo=["Help Desk <help@contoso.com>", "sales@contoso.com"]), POLICY)
    assert request.reply_to == (Address("help@contoso.com", "Help Desk"), Address("sales@contoso.com"))
    assert validate_request(good(), POLICY).reply_to == ()


def test_reply_to_counts_in_no_recipient_limit_and_no_domain_rule():
    # The policy allows one recipient and internal domains only: Reply-To is not a recipient.
    request = validate_request(good(replyTo=["a@contoso.com", "b@contoso.com", "someone@gmail.com"]), POLICY)
    assert [r.addr for r in request.recipients] == ["ann@contoso.com"]
    assert len(request.reply_to) == 3


@pytest.mark.parametrize("value,field", [
    (["help@contoso.com", "not an address"], "replyTo[1]"),
    ("x..y@contoso.com", "replyTo[0]"),
    ("<>", "replyTo[0]"),
    ([""], "replyTo[0]"),
    ([42], "replyTo[0]"),
])
def test_a_bad_reply_to_is_refused_naming_the_field_never_the_address(value, field):
    refused = refusal(good(replyTo=value))
    assert refused.reason == "bad-address" and refused.detail.startswith(field)
    assert "contoso" not in refused.detail and "not an address" not in refused.detail


@pytest.mark.parametrize("value", [
    "help@contoso.com\r\nBcc: victim@evil.example",
    "Help\nBcc: victim@evil.example <help@contoso.com>",
    ["ok@contoso.com", "help@contoso.com\x00"],
    "Help\u2028Desk <help@contoso.com>",
])
def test_a_reply_to_that_tries_to_inject_a_header_is_refused(value):
    refused = refusal(good(replyTo=value))
    assert refused.reason == "header-injection" and refused.detail.startswith("replyTo[")


def test_reply_to_must_be_an_address_or_a_list():
    assert refusal(good(replyTo={"addr": "help@contoso.com"})).reason == "schema"


def test_reply_to_is_not_allowed_as_a_custom_header():
    assert refusal(good(headers={"Reply-To": "help@contoso.com"})).reason == "schema"


# --- the message ----------------------------------------------------------------------------------

def test_reply_to_is_written_as_the_reply_to_header_and_stays_out_of_to_and_cc():
    msg = parsed(validate_request(good(replyTo=["Help Desk <help@contoso.com>", "sales@contoso.com"]), POLICY))
    assert [(a.display_name, a.addr_spec) for a in msg["Reply-To"].addresses] == [
        ("Help Desk", "help@contoso.com"), ("", "sales@contoso.com")]
    assert [a.addr_spec for a in msg["To"].addresses] == ["ann@contoso.com"] and msg["Cc"] is None
    assert "Reply-To" not in parsed(validate_request(good(), POLICY))


def settings(**env: str) -> Settings:
    return Settings.from_env({"HVE_ACCOUNTS": "news@contoso.com", **env})


def test_both_automatic_headers_are_on_by_default_and_each_setting_turns_one_off():
    assert automatic_headers(settings()) == (("Auto-Submitted", "auto-generated"), ("X-Auto-Response-Suppress", "All"))
    assert automatic_headers(settings(MAIL_AUTO_SUBMITTED="false")) == (("X-Auto-Response-Suppress", "All"),)
    assert automatic_headers(settings(MAIL_SUPPRESS_AUTO_RESPONSES="false")) == (("Auto-Submitted", "auto-generated"),)
    assert automatic_headers(settings(MAIL_AUTO_SUBMITTED="0", MAIL_SUPPRESS_AUTO_RESPONSES="no")) == ()


def test_a_setting_that_is_not_true_or_false_stops_the_start():
    with pytest.raises(SettingsError, match="MAIL_AUTO_SUBMITTED must be true or false"):
        settings(MAIL_AUTO_SUBMITTED="sometimes")


def test_a_producers_auto_response_suppress_gives_way_to_the_relays_all_and_never_doubles():
    request = validate_request(good(headers={"X-auto-response-suppress": "None", "X-Campaign": "fall"}), POLICY)
    msg = parsed(request, automatic_headers(settings()))
    assert msg.get_all("X-Auto-Response-Suppress") == ["All"]
    assert msg["Auto-Submitted"] == "auto-generated" and msg["X-Campaign"] == "fall"


def test_with_suppression_off_a_producers_auto_response_suppress_passes_as_it_is():
    request = validate_request(good(headers={"X-Auto-Response-Suppress": "OOF, AutoReply"}), POLICY)
    msg = parsed(request, automatic_headers(settings(MAIL_SUPPRESS_AUTO_RESPONSES="false")))
    assert msg.get_all("X-Auto-Response-Suppress") == ["OOF, AutoReply"]


# --- through the send stage to the HVE emulator ---------------------------------------------------

def run(coro):
    return asyncio.run(coro)


def stored(emulator, index=-1):
    return message_from_bytes(emulator.messages()[index].read_bytes(), policy=policy.default)


def send(storage, emulator, doc, **overrides):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, **overrides))
        try:
            await enqueue(relay, doc)
            results = await drain(relay)
            return results, await relay.ledger.get(doc["id"])
        finally:
            await relay.close()

    return run(main())


def test_reply_to_reaches_hve_as_a_header_and_is_not_a_recipient(storage, emulator):
    doc = {"id": "reply-1", "to": ["ann@contoso.com"], "subject": "Hi", "text": "Hello",
           "replyTo": ["Help Desk <help.desk@contoso.com>", "orders@fabrikam.example"]}
    results, entry = send(storage, emulator, doc)
    assert [r.state for r in results] == ["sent"]
    assert (entry.internal_recipients, entry.external_recipients) == (1, 0)
    [accepted] = emulator.accepted()
    assert accepted.recipients == ("ann@contoso.com",)
    assert [a.addr_spec for a in stored(emulator)["Reply-To"].addresses] == [
        "help.desk@contoso.com", "orders@fabrikam.example"]


def test_every_message_reaches_hve_marked_auto_submitted_with_auto_responses_suppressed(storage, emulator):
    results, _ = send(storage, emulator, {"id": "auto-1", "to": ["ann@contoso.com"], "text": "Hello"})
    assert [r.state for r in results] == ["sent"]
    msg = stored(emulator)
    assert msg.get_all("Auto-Submitted") == ["auto-generated"]
    assert msg.get_all("X-Auto-Response-Suppress") == ["All"]


def test_the_settings_keep_both_automatic_headers_off_the_message(storage, emulator):
    results, _ = send(storage, emulator, {"id": "auto-2", "to": ["ann@contoso.com"], "text": "Hello"},
                      MAIL_AUTO_SUBMITTED="false", MAIL_SUPPRESS_AUTO_RESPONSES="false")
    assert [r.state for r in results] == ["sent"]
    msg = stored(emulator)
    assert "Auto-Submitted" not in msg and "X-Auto-Response-Suppress" not in msg


def test_a_producers_auto_response_suppress_reaches_hve_only_as_the_relays_all(storage, emulator):
    doc = {"id": "auto-3", "to": ["ann@contoso.com"], "text": "Hello", "headers": {"X-Auto-Response-Suppress": "None"}}
    send(storage, emulator, doc)
    assert stored(emulator).get_all("X-Auto-Response-Suppress") == ["All"]
