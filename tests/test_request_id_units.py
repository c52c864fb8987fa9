"""Pure rules behind request identity and queue copies (the end-to-end proofs are elsewhere)."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from shared.send.contract import (CONTENT_ID_PREFIX, QUEUE_MESSAGE_BUDGET, RELAY_ID_PREFIXES, RequestRefused, check_id_claim,
                             content_digest, content_request_id, decode_queue_body, fits_on_queue, id_proof, is_relay_id,
                             mime_base64_size, parse_request_id, queue_text)
from shared.welcome.policy import REQUEST_ID_PREFIX as WELCOME_PREFIX


def test_a_derived_id_is_the_same_for_raw_and_base64_copies_and_a_valid_request_id():
    body = json.dumps({"to": ["ann@contoso.com"], "text": "x"})
    derived = content_request_id(body)
    assert derived == content_request_id(base64.b64encode(body.encode()).decode()) == content_request_id(f"  {body}\n".encode())
    assert parse_request_id(derived) == derived and derived.startswith("c-") and len(derived) == 34
    assert content_request_id(body.replace('"x"', '"y"')) != derived


def test_a_derived_id_of_text_with_a_lone_surrogate_does_not_raise():
    assert content_request_id('{"text": "\ud800"}').startswith("c-")


def test_queue_copies_keep_multibyte_text_as_utf8_and_fall_back_to_escapes_for_lone_surrogates():
    assert queue_text({"text": "Привет"}) == '{"text":"Привет"}'
    assert queue_text({"text": "\ud800"}) == '{"text":"\\ud800"}'


def test_what_fits_on_the_queue_counts_utf8_bytes_and_base64_growth():
    assert fits_on_queue("я" * (QUEUE_MESSAGE_BUDGET // 2))
    assert not fits_on_queue("я" * (QUEUE_MESSAGE_BUDGET // 2 + 1))
    assert fits_on_queue("a" * 3000) and not fits_on_queue("a" * (QUEUE_MESSAGE_BUDGET - 10), base64_encoded=True)


def test_the_base64_estimate_matches_what_mime_writes():
    from email.message import EmailMessage
    from email.policy import SMTP

    for size in (0, 1, 57, 58, 1000, 100_000):
        msg = EmailMessage(policy=SMTP)
        msg.add_attachment(b"\x00" * size, maintype="application", subtype="octet-stream")
        part = msg.get_payload(0) if msg.is_multipart() else msg
        encoded = part.get_payload().encode().replace(b"\n", b"\r\n")  # on the wire: CRLF line ends
        assert mime_base64_size(size) >= len(encoded) and mime_base64_size(size) - len(encoded) <= 2


def test_the_content_id_is_over_the_exact_json_text_not_a_reserialized_object():
    # The same object written with its keys in another order (or other spacing) is other text:
    # another request. Re-serializing before hashing would merge them.
    one = '{"to": ["ann@contoso.com"], "subject": "alert", "text": "disk full"}'
    other = '{"subject": "alert", "to": ["ann@contoso.com"], "text": "disk full"}'
    assert json.loads(one) == json.loads(other)
    assert content_request_id(one) == "c-" + hashlib.sha256(one.encode()).hexdigest()[:32]
    assert content_request_id(other) == "c-" + hashlib.sha256(other.encode()).hexdigest()[:32]
    assert content_request_id(one) != content_request_id(other)
    assert content_request_id(one) != content_request_id(one.replace(", ", ","))


def test_the_content_digest_is_keyed_and_ignores_the_relays_bookkeeping_and_the_encoding():
    doc = {"to": ["ann@contoso.com"], "subject": "s", "text": "Привет"}
    digest = content_digest(b"k", doc)
    # A relay copy (id, attempt, proof added; keys reordered; non-ASCII as UTF-8) is the same content...
    copy = json.loads(queue_text({"attempt": 3, "idProof": "x", **doc, "id": "c-1"}))
    assert content_digest(b"k", copy) == digest
    assert content_digest(b"k", decode_queue_body(base64.b64encode(json.dumps(doc).encode()))) == digest
    # ...another text, or another key, is not.
    assert content_digest(b"k", {**doc, "text": "Привет!"}) != digest
    assert content_digest(b"other", doc) != digest
    assert re.fullmatch(r"[0-9a-f]{32}", digest) and "Привет" not in digest


def test_only_the_relay_can_give_an_id_in_its_own_namespaces():
    for request_id in ("c-" + "0" * 32, "C-" + "AB" * 16, "welcome-1b2c", "Welcome-1b2c"):
        assert is_relay_id(request_id)
        with pytest.raises(RequestRefused) as refused:
            check_id_claim({"id": request_id}, request_id, b"k")
        assert refused.value.reason == "reserved-id"
        with pytest.raises(RequestRefused):
            check_id_claim({"id": request_id, "idProof": id_proof(b"other", request_id)}, request_id, b"k")
        check_id_claim({"id": request_id, "idProof": id_proof(b"k", request_id)}, request_id, b"k")
    # A producer's own ids that merely look alike stay usable: customer `c-1042`, `cc-…`, `welcomed-1`.
    for request_id in ("order-1042", "cc-1", "welcomed-1", "abc-1", "c-1042", "c-" + "0" * 31, "c-" + "0" * 33):
        assert not is_relay_id(request_id)
        check_id_claim({"id": request_id}, request_id, b"k")
    assert WELCOME_PREFIX in RELAY_ID_PREFIXES and CONTENT_ID_PREFIX in RELAY_ID_PREFIXES
