"""Contract v1, rule by rule: every refusal with its exact reason and detail (the ledger records
them, and callers read them), every limit at its edge, and what an accepted request becomes."""

from __future__ import annotations

import base64
import json

import pytest

from shared.send.contract import (
    Address,
    Attachment,
    MailRequest,
    RequestRefused,
    ValidationPolicy,
    claim_check_of,
    decode_queue_body,
    parse_address,
    validate_request,
)
from shared.hve.limits import PROFILES
from shared.settings import Settings

POLICY = ValidationPolicy(
    accounts=frozenset({"news@contoso.com", "alerts@contoso.com"}),
    internal_domains=frozenset({"contoso.com", "fabrikam-internal.com"}),
    external_allowed=False,
    max_recipients=3,
)
ID_RULE = "id must be 1-200 characters of letters, digits and . _ : @ = + - (starting with a letter or digit)"


def good(**extra):
    return {"to": ["ann@contoso.com"], "subject": "Hello", "text": "Hi Ann", **extra}


def refusal(call, *args) -> tuple[str, str]:
    with pytest.raises(RequestRefused) as info:
        call(*args)
    refused = info.value
    assert str(refused) == f"{refused.reason}: {refused.detail}"
    return refused.reason, refused.detail


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the queue body -----------------------------------------------------------------------------

@pytest.mark.parametrize("body,detail", [
    (b"", "the queue message is empty"),
    (b" \r\n ", "the queue message is empty"),
    (b"not json!", "the queue message is neither a JSON object nor base64 of one"),
    (b"e30", "the queue message is neither a JSON object nor base64 of one"),   # base64 without padding
    (b"e30=!", "the queue message is neither a JSON object nor base64 of one"),  # base64 of {} and a stray byte
    (b"{\"a\":", "invalid JSON at line 1 column 6: Expecting value"),
    (b"{\xff}", "the queue message is not UTF-8"),
    (base64.b64encode(b"{\xff}"), "the queue message is not UTF-8"),
    (b"W10=", "the request must be a JSON object"),                             # base64 of []
])
def test_unreadable_queue_bodies_are_refused_as_malformed_with_the_exact_detail(body, detail):
    assert refusal(decode_queue_body, body) == ("malformed", detail)


def test_queue_bodies_raw_or_base64_as_bytes_or_text_decode_alike():
    doc = {"to": "a@contoso.com"}
    raw = json.dumps(doc)
    assert decode_queue_body(raw) == decode_queue_body(raw.encode()) == doc
    assert decode_queue_body(b64(raw.encode())) == decode_queue_body(f"  {b64(raw.encode())}\n".encode()) == doc
    assert decode_queue_body(bytearray(raw.encode())) == doc
    assert decode_queue_body(b64(f" {raw} ".encode())) == doc


# --- claim checks -----------------------------------------------------------------------------

def test_a_claim_check_stub_carries_only_its_url_id_and_attempt():
    stub = {"claimCheck": {"blobUrl": "https://x/y.json"}, "id": "r-1", "attempt": 3}
    claim = claim_check_of(stub)
    assert (claim.blob_url, claim.id) == ("https://x/y.json", "r-1")
    assert refusal(claim_check_of, {"claimCheck": {"blobUrl": "https://x/y.json"}}) == (
        "schema", "a claim-check message needs the request's id (its blob is under requests/<producer>/<id>/)")
    assert claim_check_of(good()) is None
    assert refusal(claim_check_of, {**stub, "to": "a@contoso.com", "subject": "s"}) == (
        "schema", "a claim-check message carries only 'claimCheck', 'id' and 'attempt', not ['subject', 'to']")
    rule = ("schema", "claimCheck must be an object with a single string field 'blobUrl'")
    for ref in ("https://x/y.json", {"blobUrl": 7}, {"blobUrl": "https://x", "sas": "k"}, {}, None):
        assert refusal(claim_check_of, {"claimCheck": ref}) == rule
    assert refusal(claim_check_of, {"claimCheck": {"blobUrl": "https://x"}, "id": "-bad"}) == ("schema", ID_RULE)


# --- request ids, addresses -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "-x", ".x", "a b", "a/b", "a" * 201, 7, True])
def test_a_bad_request_id_is_refused_with_the_rule(value):
    assert refusal(validate_request, good(id=value), POLICY) == ("schema", ID_RULE)


@pytest.mark.parametrize("field,value", [
    ("id", "invoice-ann.smith@contoso.com"), ("id", "a@b"), ("id", "x:ann@contoso"),
    ("category", "bob.jones@contoso.com"), ("category", "for bob@contoso.com today"),
])
def test_an_id_or_category_holding_a_mail_address_is_refused_without_repeating_it(field, value):
    reason, detail = refusal(validate_request, good(**{field: value}), POLICY)
    assert reason == "address-shaped" and detail.startswith(f"{field} looks like it holds a mail address")
    assert "@" not in detail and value not in detail


def test_request_ids_at_the_edges_are_accepted():
    for value in ("a", "A" + "b" * 199, "0._:=+-@", "a@", "a@.b"):
        assert validate_request(good(id=value), POLICY).id == value
    assert validate_request(good(), POLICY).id is None


@pytest.mark.parametrize("value,reason,detail", [
    ("", "bad-address", "to[0]: an address must be a non-empty string"),
    ("   ", "bad-address", "to[0]: an address must be a non-empty string"),
    (7, "bad-address", "to[0]: an address must be a non-empty string"),
    ("Ann <ann@contoso.com", "bad-address", "to[0] is not 'addr' or 'Display Name <addr>'"),
    ("ann@contoso.com>", "bad-address", "to[0] is not 'addr' or 'Display Name <addr>'"),
    ("ann@contoso", "bad-address", "to[0] is not a valid mail address"),
    ("Ann <ann.@contoso.com>", "bad-address", "to[0] is not a valid mail address"),
    ("a" * 65 + "@contoso.com", "bad-address", "to[0] is not a valid mail address"),
    ("ann@contoso.com\r\nBcc: x@contoso.com", "header-injection", "to[0] contains a line break or control character"),
])
def test_a_bad_address_is_refused_naming_the_field_never_the_value(value, reason, detail):
    assert refusal(validate_request, good(to=[value]), POLICY) == (reason, detail)


def test_addresses_at_the_length_limits():
    local64 = "a" * 64
    assert parse_address("to", f"{local64}@contoso.com").addr == f"{local64}@contoso.com"
    domain = ".".join(["b" * 60] * 4) + ".com"          # a 248-character domain
    longest = "a" * (254 - len(domain) - 1) + "@" + domain  # 254 characters: the limit
    assert len(longest) == 254 and parse_address("to", longest).addr == longest
    too_long = "a" + longest
    assert refusal(parse_address, "to", too_long) == ("bad-address", "to is not a valid mail address")


def test_display_names_are_kept_unquoted_and_trimmed():
    assert parse_address("to", '  "Example, Ann"  <ann@contoso.com> ') == Address("ann@contoso.com", "Example, Ann")
    assert parse_address("to", "Ann Example<ann@contoso.com>") == Address("ann@contoso.com", "Ann Example")
    assert parse_address("to", '"" <ann@contoso.com>') == Address("ann@contoso.com", "")
    assert parse_address("to", '" <ann@contoso.com>') == Address("ann@contoso.com", '"')
    assert parse_address("to", '"A" <ann@contoso.com>') == Address("ann@contoso.com", "A")
    assert parse_address("to", "ann@contoso.com") == Address("ann@contoso.com", "")
    assert Address("ann@Contoso.COM").domain == "contoso.com"


def test_a_recipient_field_must_be_an_address_or_a_list_of_them():
    assert refusal(validate_request, good(cc={"a": "b"}), POLICY) == ("schema", "cc must be a list of addresses")
    assert validate_request(good(to="ann@contoso.com"), POLICY).to == (Address("ann@contoso.com"),)
    assert refusal(validate_request, good(bcc=["bob@contoso.com", ""]), POLICY) == (
        "bad-address", "bcc[1]: an address must be a non-empty string")


# --- the request ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,reason,detail", [
    ({"urgency": "high", "bogus": 1}, "schema", "unknown fields ['bogus', 'urgency']"),
    ({"priority": "urgent"}, "schema", "priority must be 'high' or 'normal'"),
    ({"attempt": -1}, "schema", "attempt must be a non-negative integer"),
    ({"attempt": "1"}, "schema", "attempt must be a non-negative integer"),
    ({"attempt": True}, "schema", "attempt must be a non-negative integer"),
    ({"attempt": 1.5}, "schema", "attempt must be a non-negative integer"),
    ({"account": "other@contoso.com"}, "unknown-account", "account is not one of the configured HVE accounts"),
    ({"account": 7}, "unknown-account", "account is not one of the configured HVE accounts"),
    ({"from": "ceo@contoso.com"}, "send-as",
     "from is not an HVE account of this relay; HVE sends only as the account itself"),
    ({"sender": "Alerts <ALERTS@contoso.com>", "account": "news@contoso.com"}, "send-as",
     "sender is not an HVE account of this relay; HVE sends only as the account itself"),
    ({"from": "not-an-address"}, "bad-address", "from is not a valid mail address"),
    ({"to": [], "cc": None}, "no-recipients", "at least one recipient in to, cc or bcc is required"),
    ({"to": ["a@contoso.com", "b@contoso.com"], "cc": ["c@contoso.com"], "bcc": ["d@contoso.com"]},
     "too-many-recipients", "4 recipients; the limit per request is 3"),
    ({"cc": ["x@gmail.com", "y@fabrikam.com"]}, "external-not-allowed",
     "2 external recipient(s) (e.g. domain 'gmail.com'); HVE refuses external recipients (550 5.5.105) under this limits profile"),
    ({"subject": 7}, "schema", "subject must be a string"),
    ({"subject": "a\nb"}, "header-injection", "subject contains a line break or control character"),
    ({"subject": "s" * 999}, "schema", "subject is longer than 998 characters"),
    ({"text": None, "html": "  "}, "no-body", "a request needs a non-empty text or html body"),
    ({"text": " \n"}, "no-body", "a request needs a non-empty text or html body"),
    ({"text": ["x"]}, "schema", "text must be a string"),
    ({"category": "a\tb\x7f"}, "header-injection", "category contains a line break or control character"),
    ({"category": "c" * 65}, "schema", "category is longer than 64 characters"),
])
def test_each_rule_refuses_with_its_reason_and_detail(extra, reason, detail):
    assert refusal(validate_request, good(**extra), POLICY) == (reason, detail)


def test_each_limit_holds_exactly_at_its_edge():
    request = validate_request(good(subject="s" * 998, category="c" * 64, attempt=0,
                                    to=["a@contoso.com", "A@contoso.com", "b@contoso.com"], cc=["c@contoso.com"]),
                               POLICY)  # 4 addresses, 3 distinct: the limit counts distinct ones
    assert (len(request.subject), len(request.category), len(request.recipients)) == (998, 64, 4)
    assert validate_request(good(attempt=12, subject="tab\there"), POLICY).subject == "tab\there"
    wide = ValidationPolicy(POLICY.accounts, POLICY.internal_domains, True, None)
    assert len(validate_request(good(to=[f"p{i}@gmail.com" for i in range(60)]), wide).recipients) == 60


def test_an_accepted_request_is_typed_field_by_field():
    doc = {
        "id": "r-1", "to": ["Ann <ann@contoso.com>"], "cc": "bob@fabrikam-internal.com", "bcc": ["eve@contoso.com"],
        "subject": "Hello", "text": "Hi", "html": "<p>Hi</p>", "account": " News@Contoso.com ",
        "from": "news@contoso.com", "category": "orders", "headers": {"X-Campaign": "q3"}, "attempt": 2,
        "attachments": [{"name": "a.txt", "contentType": "Text/Plain", "contentBase64": b64(b"hello")},
                        {"name": "b.bin", "blobUrl": "https://store/c/b.bin"}],
    }
    assert validate_request(doc, POLICY) == MailRequest(
        id="r-1", to=(Address("ann@contoso.com", "Ann"),), cc=(Address("bob@fabrikam-internal.com"),),
        bcc=(Address("eve@contoso.com"),), subject="Hello", text="Hi", html="<p>Hi</p>",
        attachments=(Attachment("a.txt", "text/plain", content=b"hello"),
                     Attachment("b.bin", "application/octet-stream", blob_url="https://store/c/b.bin")),
        account="news@contoso.com", category="orders", headers=(("X-Campaign", "q3"),))
    minimal = validate_request({"to": "ann@contoso.com", "html": "<p>x</p>"}, POLICY)
    assert (minimal.subject, minimal.text, minimal.category, minimal.account, minimal.attachments, minimal.headers) == (
        "", None, "", None, (), ())


def test_from_is_accepted_when_it_names_an_account_of_the_relay():
    assert validate_request(good(**{"from": "News <NEWS@contoso.com>"}), POLICY).account is None
    assert validate_request(good(sender="alerts@contoso.com", account="alerts@contoso.com"), POLICY).account == "alerts@contoso.com"


# --- attachments ------------------------------------------------------------------------------

@pytest.mark.parametrize("attachments,reason,detail", [
    ({"name": "a"}, "schema", "attachments must be a list"),
    (["a.txt"], "schema", "attachments[0] must be an object"),
    ([{"name": "a", "contentBase64": "", "size": 1, "x": 2}], "schema", "attachments[0] has unknown fields ['size', 'x']"),
    ([{"contentBase64": ""}], "bad-attachment", "attachments[0].name must be a non-empty file name"),
    ([{"name": " ", "contentBase64": ""}], "bad-attachment", "attachments[0].name must be a non-empty file name"),
    ([{"name": 7, "contentBase64": ""}], "bad-attachment", "attachments[0].name must be a non-empty file name"),
    ([{"name": "n" * 256, "contentBase64": ""}], "bad-attachment", "attachments[0].name must be a non-empty file name"),
    ([{"name": "a\r\nb", "contentBase64": ""}], "header-injection", "attachments[0].name contains a line break or control character"),
    ([{"name": "../etc", "contentBase64": ""}], "bad-attachment",
     "attachments[0].name must not contain quotes, slashes or control characters"),
    ([{"name": 'a"b', "contentBase64": ""}], "bad-attachment",
     "attachments[0].name must not contain quotes, slashes or control characters"),
    ([{"name": "a", "contentType": "text", "contentBase64": ""}], "bad-attachment",
     "attachments[0].contentType must look like 'type/subtype'"),
    ([{"name": "a", "contentType": 7, "contentBase64": ""}], "bad-attachment",
     "attachments[0].contentType must look like 'type/subtype'"),
    ([{"name": "a"}], "bad-attachment", "attachments[0] needs exactly one of contentBase64 or blobUrl"),
    ([{"name": "a", "contentBase64": "", "blobUrl": "https://x"}], "bad-attachment",
     "attachments[0] needs exactly one of contentBase64 or blobUrl"),
    ([{"name": "a", "contentBase64": 7}], "bad-attachment", "attachments[0].contentBase64 must be a string"),
    ([{"name": "a", "contentBase64": "!!"}], "bad-attachment", "attachments[0].contentBase64 is not valid base64"),
    ([{"name": "a", "contentBase64": "aGVsbG8"}], "bad-attachment", "attachments[0].contentBase64 is not valid base64"),
    ([{"name": "a", "blobUrl": "file:///etc/passwd"}], "bad-attachment", "attachments[0].blobUrl must be an http(s) URL"),
    ([{"name": "a", "blobUrl": "HTTPS://x"}], "bad-attachment", "attachments[0].blobUrl must be an http(s) URL"),
    ([{"name": "a", "blobUrl": 7}], "bad-attachment", "attachments[0].blobUrl must be an http(s) URL"),
    ([{"name": "ok", "contentBase64": ""}, {"name": "b"}], "bad-attachment",
     "attachments[1] needs exactly one of contentBase64 or blobUrl"),
])
def test_each_attachment_rule_refuses_with_its_reason_and_detail(attachments, reason, detail):
    assert refusal(validate_request, good(attachments=attachments), POLICY) == (reason, detail)


def test_attachments_at_the_edges_are_accepted():
    request = validate_request(good(id="r-1", attachments=[
        {"name": "n" * 255, "contentBase64": ""},
        {"name": "a", "blobUrl": "http://127.0.0.1:10000/c/a"},
        {"name": "b", "contentType": "Application/PDF", "blobUrl": "https://x/b"},
    ]), POLICY)
    assert request.attachments == (
        Attachment("n" * 255, "application/octet-stream", content=b""),
        Attachment("a", "application/octet-stream", blob_url="http://127.0.0.1:10000/c/a"),
        Attachment("b", "application/pdf", blob_url="https://x/b"),
    )


# --- custom headers ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers,reason,detail", [
    (["X-A"], "schema", "headers must be an object of X- header names to string values"),
    ({f"X-H{i}": "v" for i in range(21)}, "schema", "at most 20 custom headers"),
    ({"X-A\r\nBcc": "v"}, "header-injection", "headers name 'X-A\\r\\nBcc' contains a line break or control character"),
    ({"From": "ceo@contoso.com"}, "send-as", "the From header is set by the relay to the HVE account"),
    ({"SENDER": "ceo@contoso.com"}, "send-as", "the SENDER header is set by the relay to the HVE account"),
    ({"Reply-To": "a@contoso.com"}, "schema", "header 'Reply-To' is not allowed: only custom X- headers may be set"),
    ({"X-HVE-Relay-Request-Id": "1"}, "schema", "header 'X-HVE-Relay-Request-Id' is not allowed: only custom X- headers may be set"),
    ({"X-A": 7}, "schema", "header X-A must have a string value"),
    ({"X-A": "v\nBcc: x"}, "header-injection", "headers.X-A contains a line break or control character"),
])
def test_each_header_rule_refuses_with_its_reason_and_detail(headers, reason, detail):
    assert refusal(validate_request, good(headers=headers), POLICY) == (reason, detail)


def test_twenty_custom_headers_are_accepted_in_order():
    headers = {f"X-H{i}": f"v{i}" for i in range(20)}
    assert validate_request(good(headers=headers), POLICY).headers == tuple(headers.items())


# --- the policy from settings -----------------------------------------------------------------

def test_the_policy_takes_accounts_domains_and_limits_from_settings():
    settings = Settings.from_env({"HVE_ACCOUNTS": "news@contoso.com,alerts@mail.fabrikam.com",
                                  "HVE_INTERNAL_DOMAINS": "Contoso.com,partner.example",
                                  "MAX_RECIPIENTS_PER_REQUEST": "7"})
    policy = ValidationPolicy.from_settings(settings, PROFILES["preview-2024"])
    assert policy == ValidationPolicy(
        accounts=frozenset({"news@contoso.com", "alerts@mail.fabrikam.com"}),
        internal_domains=frozenset({"contoso.com", "partner.example", "mail.fabrikam.com"}),
        external_allowed=True, max_recipients=7)
    assert ValidationPolicy.from_settings(settings, PROFILES["ga-2026"]).external_allowed is False
