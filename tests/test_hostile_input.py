"""No payload can crash the send stage: whatever bytes arrive end as a recorded outcome."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings

from shared.send.contract import RequestRefused, ValidationPolicy, claim_check_of, decode_queue_body, validate_request
from shared.send.mime import build_message
from shared.send.stage import Relay
from tests.hostile import QUEUE_BODIES
from tests.relay_harness import relay_settings

POLICY = ValidationPolicy(
    accounts=frozenset({"news@contoso.com", "alerts@contoso.com"}),
    internal_domains=frozenset({"contoso.com", "fabrikam-internal.com"}),
    external_allowed=False,
    max_recipients=50,
)


def good(**extra):
    return {"to": ["Ann Example <ann@contoso.com>"], "subject": "Hello", "text": "Hi Ann", **extra}


def as_bytes(doc) -> bytes:
    # ensure_ascii keeps a lone surrogate as the JSON escape \ud800, exactly as a producer would send it.
    return json.dumps(doc).encode()


# Hostile payloads: each used to raise instead of being refused.
HOSTILE = {
    "nested-5000": (b'{"to": "a@contoso.com", "text": "x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed"),
    "bare-nest-5000": (b"[" * 5000, "malformed"),
    "int-5000-digits": (b'{"to": "a@contoso.com", "text": "x", "attempt": ' + b"9" * 5000 + b"}", "malformed"),
    "surrogate-subject": (as_bytes(good(subject="Hi \ud800")), "bad-encoding"),
    "surrogate-text": (as_bytes(good(text="Hi \ud800 there")), "bad-encoding"),
    "surrogate-display-name": (as_bytes(good(to=["Ann \ud800 <ann@contoso.com>"])), "bad-encoding"),
    "surrogate-attachment-name": (as_bytes(good(attachments=[
        {"name": "r\ud800.txt", "contentType": "text/plain", "contentBase64": "aGk="}])), "bad-encoding"),
    "surrogate-category": (as_bytes(good(category="news\udfff")), "bad-encoding"),
    "surrogate-x-header": (as_bytes(good(headers={"X-Tag": "\ud800"})), "bad-encoding"),
    "surrogate-field-name": (as_bytes(good(**{"\ud800": 1})), "bad-encoding"),
}


def policy_outcome(body: bytes | str) -> str:
    """What the pure stages make of a body: 'built', 'claim-check', or the refusal reason."""
    try:
        doc = decode_queue_body(body)
        if claim_check_of(doc) is not None:
            return "claim-check"
        request = validate_request(doc, POLICY)
        build_message(request, request_id="p-1", account="news@contoso.com", sender_name="News",
                      message_id_domain="contoso.com", message_id_key=b"k",
                      attachments=[(a.name, a.content_type, a.content or b"") for a in request.attachments])
        return "built"
    except RequestRefused as refusal:
        return refusal.reason


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_payload_is_refused_with_a_stable_reason(name):
    body, reason = HOSTILE[name]
    assert policy_outcome(body) == reason


def test_a_str_body_with_a_lone_surrogate_is_refused():
    # The SDKs hand queue content over as str; one that is not Unicode text is refused, not raised.
    assert policy_outcome('{"to": "a@contoso.com", "text": "\ud800"}') == "malformed"


@settings(max_examples=settings.default.max_examples * 2, suppress_health_check=[HealthCheck.too_slow])
@given(QUEUE_BODIES)
def test_any_bytes_are_built_or_refused_by_the_pure_stages(body):
    policy_outcome(body)  # anything but RequestRefused escaping is the failure


def test_hostile_payloads_are_recorded_as_refused_in_the_ledger(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            out = {}
            for name, (body, _) in HOSTILE.items():
                handled = await relay.handle(body, f"q-{name}")
                out[name] = (handled, await relay.ledger.get(handled.request_id))
            return out
        finally:
            await relay.close()

    for name, (handled, entry) in asyncio.run(main()).items():
        reason = HOSTILE[name][1]
        assert handled.state == "refused" and handled.reason.startswith(reason), name
        assert entry is not None and entry.state == "refused" and entry.reason.startswith(reason), name
    assert emulator.messages() == []


def test_any_bytes_given_to_the_send_stage_end_as_a_recorded_outcome(storage, emulator):
    """The property at the bytes level, against Azurite and the emulator. CI runs a derandomized
    slice; HYPOTHESIS_PROFILE=explore searches a hundred times wider."""
    loop = asyncio.new_event_loop()
    relay = loop.run_until_complete(Relay.create(relay_settings(storage, emulator)))
    outcomes: dict[str, int] = {}

    @settings(max_examples=max(60, settings.default.max_examples // 5),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(QUEUE_BODIES)
    def property_(body):
        queue_id = f"q-{uuid.uuid4().hex}"
        handled = loop.run_until_complete(relay.handle(body, queue_id))
        entry = loop.run_until_complete(relay.ledger.get(handled.request_id))
        assert entry is not None, handled
        if handled.state in ("sent", "refused", "dead"):
            assert entry.state == handled.state, (handled, entry)
        outcomes[handled.state] = outcomes.get(handled.state, 0) + 1

    try:
        property_()
    finally:
        loop.run_until_complete(relay.close())
        loop.close()
    assert outcomes.get("refused", 0) > 0
