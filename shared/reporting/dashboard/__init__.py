"""The operations dashboard: one self-contained HTML page that draws itself from `GET /api/report`.

Script and style are inline and allowed by their SHA-256 in a strict Content-Security-Policy, so the
page needs no second request (a second request would need the function key in its URL too) and no
outside resource. Charts are SVG drawn by the page's own script (see docs/operations.md, "Operations dashboard").
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Page:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(script: str, style: str) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256(script)}",
            f"style-src {_sha256(style)}",
            "connect-src 'self'",  # only /api/report, same origin
            "img-src data:",  # the empty favicon, so the browser asks the host for none
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            # No string ever becomes markup: innerHTML and friends throw.
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        ]
    )


@lru_cache(maxsize=1)
def page() -> Page:
    """The page and its headers (built once per process: the files do not change while it runs)."""
    template = (_HERE / "page.html").read_text(encoding="utf-8")
    script = (_HERE / "page.js").read_text(encoding="utf-8")
    style = (_HERE / "page.css").read_text(encoding="utf-8")
    if "</script" in script.lower() or "</style" in style.lower():
        raise ValueError("dashboard assets must not close their own element")
    html = template.replace("{{style}}", style).replace("{{script}}", script)
    headers = {
        "Content-Security-Policy": content_security_policy(script, style),
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    return Page(html.encode("utf-8"), headers)
