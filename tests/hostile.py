"""Hypothesis strategies for hostile queue bodies: any bytes, and contract-shaped JSON whose strings
carry lone surrogates, line breaks, huge numbers and deep nesting (the shapes that used to crash)."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

MAX_QUEUE_BYTES = 64 * 1024

# st.characters() almost never draws a surrogate or a line break; these make them common.
_SPICY = ["\ud800", "\udfff", "\udc80", "\r\n", "\n", "\x00", "\u2028", "\x85", '"', "\\", "<", ">", "@", ",", ";",
          "=?utf-8?q?x?=", "é", "\ufeff", "\U0001f600", " ", "\t", "..", "'"]
PIECES = st.one_of(st.characters(exclude_categories=()), st.sampled_from(_SPICY))
TEXT = st.lists(PIECES, max_size=30).map("".join)
ADDRESSES = st.sampled_from(["ann@contoso.com", "bob@fabrikam-internal.com", "x@external.example", "news@contoso.com",
                             "bad..dot@contoso.com", "no-at-sign", ""])
ADDRESS = st.one_of(ADDRESSES, st.builds(lambda name, addr: f"{name} <{addr}>", TEXT, ADDRESSES), TEXT)
# Digits of a JSON number past Python's int conversion limit (written as text: Python cannot hold it).
HUGE_DIGITS = st.integers(min_value=4290, max_value=6000)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
ATTACHMENT = st.fixed_dictionaries({}, optional={
    "name": st.one_of(TEXT, st.just("report.pdf")),
    "contentType": st.one_of(st.just("text/plain"), TEXT),
    "contentBase64": st.one_of(st.just("aGVsbG8="), TEXT),
    "blobUrl": st.one_of(st.just("http://127.0.0.1:1/x/att/a.bin"), TEXT),
})
FIELDS: dict[str, Any] = {
    "id": st.one_of(st.just("hostile-1"), TEXT),
    "to": st.one_of(st.lists(ADDRESS, max_size=3), ADDRESS, JSON),
    "cc": st.lists(ADDRESS, max_size=2),
    "bcc": st.lists(ADDRESS, max_size=2),
    "subject": st.one_of(TEXT, JSON),
    "text": st.one_of(st.just("Hello"), TEXT),
    "html": TEXT,
    "category": TEXT,
    "account": st.one_of(st.just("news@contoso.com"), TEXT),
    "headers": st.dictionaries(st.one_of(st.just("X-Tag"), st.just("X-Other"), TEXT), st.one_of(TEXT, JSON), max_size=3),
    "attachments": st.lists(ATTACHMENT, max_size=2),
    "attempt": st.integers(),
    "from": ADDRESS,
    "claimCheck": st.one_of(st.fixed_dictionaries({"blobUrl": TEXT}), JSON),
}
DOCS = st.fixed_dictionaries({"to": FIELDS["to"], "text": FIELDS["text"]},
                            optional={k: v for k, v in FIELDS.items() if k not in ("to", "text")})


def _encode(doc: dict[str, Any], ascii_only: bool, as_base64: bool, nest: int, digits: int | None) -> bytes:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    if nest:
        text = text[:-1] + ("," if len(text) > 2 else "") + '"deep":' + "[" * nest + "]" * nest + "}"
    if digits is not None:
        text = text[:-1] + ("," if len(text) > 2 else "") + '"attempt":' + "7" * digits + "}"
    raw = text.encode("utf-8", "surrogatepass")  # ensure_ascii=False keeps lone surrogates: invalid UTF-8
    return base64.b64encode(raw) if as_base64 else raw


ENCODED_DOCS = st.builds(_encode, DOCS, st.booleans(), st.booleans(),
                         st.one_of(st.just(0), st.integers(1, 20), st.just(5000)),
                         st.one_of(st.none(), HUGE_DIGITS))
# Any byte string that fits on a queue: random bytes, or a hostile request (possibly cut short).
QUEUE_BODIES = st.one_of(
    st.binary(max_size=MAX_QUEUE_BYTES),
    ENCODED_DOCS,
    st.builds(lambda body, cut: body[:cut], ENCODED_DOCS, st.integers(0, 400)),
    # Big bodies without asking hypothesis for 64 KB of choices: a short pattern repeated.
    st.builds(lambda chunk, times: chunk * times, st.binary(min_size=1, max_size=64), st.integers(1, 4096)),
).map(lambda body: body[:MAX_QUEUE_BYTES])
