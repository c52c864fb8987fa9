"""Contract v1: decoding queue bodies and validating requests (pure, fast)."""

import base64
import json
from pathlib import Path

import jsonschema
import pytest

from shared.send.contract import (
    RequestRefused,
    ValidationPolicy,
    claim_check_of,
    decode_queue_body,
    parse_address,
    validate_request,
)

POLICY = ValidationPolicy(
    accounts=frozenset({"news@contoso.com", "alerts@contoso.com"}),
    internal_domains=frozenset({"contoso.com", "fabrikam-internal.com"}),
    external_allowed=False,
    max_recipients=50,
)
PREVIEW = ValidationPolicy(POLICY.accounts, POLICY.internal_domains, True, 50)
SCHEMA = json.loads((Path(__file__).parents[1] / "shared/schema/mail-request.v1.json").read_text())


def good(**extra):
    return {"to": ["Ann Example <ann@contoso.com>"], "subject": "Hello", "text": "Hi Ann", **extra}


def refused(doc, policy=POLICY):
    with pytest.raises(RequestRefused) as info:
        validate_request(doc, policy)
    return info.value.reason


def test_raw_json_body_is_decoded():
    assert decode_queue_body(b'{"to": "a@contoso.com"}') == {"to": "a@contoso.com"}


def test_base64_body_is_decoded_like_an_output_binding_writes_it():
    raw = json.dumps(good()).encode()
    assert decode_queue_body(base64.b64encode(raw)) == good()


def test_malformed_json_is_refused_with_position():
    with pytest.raises(RequestRefused) as info:
        decode_queue_body(b'{"to": ')
    assert info.value.reason == "malformed" and "line 1" in info.value.detail


@pytest.mark.parametrize("body", [b"", b"   ", b"not json at all!", b"[1, 2]", base64.b64encode(b"[1]"), b"\xff\xfe{"])
def test_unreadable_bodies_are_refused_not_crashed(body):
    with pytest.raises(RequestRefused):
        decode_queue_body(body)


def test_valid_request_is_typed():
    req = validate_request(good(cc="bob@fabrikam-internal.com", bcc=["cs@contoso.com"], category="welcome"), POLICY)
    assert [a.addr for a in req.recipients] == ["ann@contoso.com", "bob@fabrikam-internal.com", "cs@contoso.com"]
    assert req.to[0].display_name == "Ann Example"
    assert req.category == "welcome"


@pytest.mark.parametrize("addr", ["plain", "a@b", "a@@contoso.com", "a b@contoso.com", "<>", "Ann <ann@contoso>", "ann@-contoso.com", "x" * 65 + "@contoso.com"])
def test_bad_address_syntax_is_refused(addr):
    assert refused(good(to=[addr])) == "bad-address"


def test_quoted_display_name_is_unquoted():
    assert parse_address("to", '"Doe, Jane" <jane@contoso.com>').display_name == "Doe, Jane"


@pytest.mark.parametrize("field,value", [
    ("subject", "Hi\r\nBcc: victim@evil.example"),
    ("subject", "Hi\nX-Injected: 1"),
    ("to", ["Ann\r\nBcc: x@evil.example <ann@contoso.com>"]),
    ("headers", {"X-Tag": "a\r\nBcc: x@evil.example"}),
    ("category", "cat\nBcc: x"),
])
def test_header_injection_is_refused(field, value):
    assert refused(good(**{field: value})) == "header-injection"


def test_header_injection_in_attachment_name_is_refused():
    doc = good(attachments=[{"name": "a\r\nContent-Type: text/html", "contentBase64": "aGk="}])
    assert refused(doc) == "header-injection"


@pytest.mark.parametrize("field", ["from", "sender"])
def test_send_as_another_address_is_refused(field):
    assert refused(good(**{field: "ceo@contoso.com"})) == "send-as"


def test_from_equal_to_an_hve_account_is_tolerated():
    assert validate_request(good(**{"from": "News <news@contoso.com>"}), POLICY).to


def test_from_header_through_custom_headers_is_refused():
    assert refused(good(headers={"From": "ceo@contoso.com"})) == "send-as"


def test_only_x_headers_may_be_set():
    assert refused(good(headers={"Reply-To": "x@contoso.com"})) == "schema"
    assert validate_request(good(headers={"X-Campaign": "fall"}), POLICY).headers == (("X-Campaign", "fall"),)


def test_recipients_over_the_per_request_cap_are_refused():
    doc = good(to=[f"u{i}@contoso.com" for i in range(51)])
    assert refused(doc) == "too-many-recipients"


def test_no_recipient_is_refused():
    assert refused({"subject": "x", "text": "y"}) == "no-recipients"


@pytest.mark.parametrize("body", [{}, {"text": "  "}, {"html": ""}])
def test_no_body_is_refused(body):
    assert refused({"to": ["a@contoso.com"], **body}) == "no-body"


def test_external_recipient_is_refused_under_ga_2026():
    assert refused(good(cc=["someone@gmail.com"])) == "external-not-allowed"


def test_external_recipient_is_allowed_under_preview_2024():
    assert validate_request(good(cc=["someone@gmail.com"]), PREVIEW).cc[0].domain == "gmail.com"


def test_unknown_preferred_account_is_refused():
    assert refused(good(account="other@contoso.com")) == "unknown-account"


def test_unknown_field_is_refused_so_typos_are_not_silently_ignored():
    assert refused(good(subjct="typo")) == "schema"


@pytest.mark.parametrize("bad_id", ["", "has space", "a/b", "x" * 201, 42])
def test_bad_request_id_is_refused(bad_id):
    assert refused(good(id=bad_id)) == "schema"


def test_attachment_needs_exactly_one_source():
    assert refused(good(attachments=[{"name": "a.txt"}])) == "bad-attachment"
    assert refused(good(attachments=[{"name": "a.txt", "contentBase64": "aGk=", "blobUrl": "https://x/y"}])) == "bad-attachment"
    assert refused(good(attachments=[{"name": "a.txt", "contentBase64": "***"}])) == "bad-attachment"


def test_claim_check_stub_is_recognised():
    stub = {"id": "big-1", "claimCheck": {"blobUrl": "http://127.0.0.1/devstoreaccount1/mail-payloads/big-1.json"}}
    check = claim_check_of(stub)
    assert check.id == "big-1" and check.blob_url.endswith("big-1.json")
    assert claim_check_of(good()) is None
    with pytest.raises(RequestRefused):
        claim_check_of({"claimCheck": {"blobUrl": "x"}, "to": ["a@contoso.com"]})


# The schema producers read and the validator the relay runs must agree.
AGREE_VALID = [good(), good(priority="high"), good(priority="normal"), good(html="<p>x</p>", text=None) | {"text": "t"}, good(attachments=[{"name": "a.pdf", "contentType": "application/pdf", "contentBase64": "aGk="}]),
               {"id": "x1", "claimCheck": {"blobUrl": "https://acct.blob.core.windows.net/mail-payloads/x1.json"}}]
AGREE_INVALID = [good(subjct="typo"), good(priority="urgent"), good(priority="HIGH"), good(priority=1), {"to": ["a@contoso.com"], "subject": "no body"}, good(headers={"Reply-To": "x@contoso.com"}),
                 good(id="has space"), {"claimCheck": {"blobUrl": "x"}, "to": "a@contoso.com"},
                 good(id="invoice-ann.smith@contoso.com"), good(category="bob.jones@contoso.com"),
                 {"claimCheck": {"blobUrl": "https://acct.blob.core.windows.net/mail-payloads/requests/p/x/y.json"}}]


@pytest.mark.parametrize("doc", AGREE_VALID)
def test_schema_accepts_what_the_validator_accepts(doc):
    jsonschema.validate(doc, SCHEMA)
    if "claimCheck" in doc:
        assert claim_check_of(doc)
    else:
        validate_request(doc, POLICY)


@pytest.mark.parametrize("doc", AGREE_INVALID)
def test_schema_rejects_what_the_validator_rejects(doc):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    with pytest.raises(RequestRefused):
        if "claimCheck" in doc:
            claim_check_of(doc)
        else:
            validate_request(doc, POLICY)


# --- properties: whatever a producer sends, the relay refuses it or builds exactly what was asked ---

from email import message_from_bytes, policy as email_policy  # noqa: E402

from hypothesis import given, strategies as st  # noqa: E402

from shared.send.mime import build_message  # noqa: E402

ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)


@given(subject=ANY_TEXT, name=ANY_TEXT, tag=ANY_TEXT, category=ANY_TEXT)
def test_no_input_can_add_a_header(subject, name, tag, category):
    doc = {"to": [f"{name} <ann@contoso.com>"], "subject": subject, "text": "body",
           "headers": {"X-Tag": tag}, "category": category}
    try:
        request = validate_request(doc, POLICY)
    except RequestRefused:
        return
    raw = build_message(request, request_id="p-1", account="news@contoso.com", sender_name="News",
                        message_id_domain="contoso.com", message_id_key=b"k", attachments=[])
    msg = message_from_bytes(raw, policy=email_policy.default)
    assert sorted(k.lower() for k in msg.keys()) == sorted(
        ["from", "to", "subject", "date", "message-id", "mime-version", "x-tag", "content-type",
         "content-transfer-encoding"])
    # Values survive (up to whitespace folding, which is not injection).
    assert msg["Subject"].split() == subject.split()
    assert msg["X-Tag"].split() == tag.split()
    assert [a.addr_spec for a in msg["To"].addresses] == ["ann@contoso.com"]


@given(st.recursive(st.none() | st.booleans() | st.integers() | ANY_TEXT,
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4),
                    max_leaves=20))
def test_any_json_value_is_accepted_or_refused_never_crashes(value):
    doc = value if isinstance(value, dict) else {"to": value, "text": value, "subject": value}
    try:
        validate_request(doc, POLICY)
    except RequestRefused:
        pass
