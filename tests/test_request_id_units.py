"""Pure rules behind request identity and queue copies (the end-to-end proofs are elsewhere)."""

from __future__ import annotations

import base64
import json

from shared.contract import (QUEUE_MESSAGE_BUDGET, content_request_id, fits_on_queue, mime_base64_size, parse_request_id,
                             queue_text)


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
