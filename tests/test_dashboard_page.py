"""The dashboard page as served (no browser): one self-contained document whose strict CSP allows
exactly its own inline script and style, loads nothing from outside, and has no way to turn text
into markup. The browser test (test_dashboard_browser.py) shows the same page working."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import urllib.request
from pathlib import Path

from shared.reporting.dashboard import content_security_policy, page
from shared.wiring import close_relays
from tools.devhost import DevHost, _background_loop

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "shared" / "reporting" / "dashboard"


def directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_csp_allows_exactly_the_inline_script_and_style_and_nothing_from_outside():
    built = page()
    html = built.body.decode()
    csp = directives(built.headers["Content-Security-Policy"])
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == [sha256(scripts[0])] and csp["style-src"] == [sha256(styles[0])]
    assert csp["connect-src"] == ["'self'"] and csp["img-src"] == ["data:"]
    assert csp["require-trusted-types-for"] == ["'script'"] and csp["trusted-types"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    everything = " ".join(sum(csp.values(), []))
    assert "unsafe" not in everything and "http" not in everything and "*" not in everything
    assert built.headers["Referrer-Policy"] == "no-referrer" and built.headers["Cache-Control"] == "no-store"


def test_the_page_names_no_outside_resource():
    html = page().body.decode()
    # The one URL in the page is the SVG namespace, an identifier the browser never fetches.
    urls = set(re.findall(r"https?://[^\s'\"<>)]+", html))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert re.findall(r"""\b(?:src|href|action)\s*=\s*["']?([^"'\s>]+)""", html) == ["data:,"]
    assert "@import" not in html and "url(" not in html


def test_the_script_has_no_way_to_turn_text_into_markup_or_code():
    # The code, without its comments (which name innerHTML to say why it is not used).
    script = re.sub(r"^\s*//.*$", "", (SOURCES / "page.js").read_text(), flags=re.M)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute('on", 'setAttribute("on', "javascript:"):
        assert sink not in script, sink
    # Labels reach the page through textContent only.
    assert script.count("textContent = ") >= 3


def test_a_script_that_would_close_its_own_element_is_refused(tmp_path, monkeypatch):
    import shared.reporting.dashboard as dashboard

    for name in ("page.html", "page.css"):
        (tmp_path / name).write_text((SOURCES / name).read_text())
    (tmp_path / "page.js").write_text("const x = '</script><script>alert(1)';")
    monkeypatch.setattr(dashboard, "_HERE", tmp_path)
    dashboard.page.cache_clear()
    try:
        try:
            dashboard.page()
        except ValueError as exc:
            assert "must not close" in str(exc)
        else:
            raise AssertionError("a script closing its own element was served")
    finally:
        dashboard.page.cache_clear()


def test_a_changed_script_gets_a_changed_hash():
    assert content_security_policy("a", "b") != content_security_policy("a ", "b")


def test_the_dashboard_route_serves_the_page_with_its_headers(storage, emulator):
    try:
        with DevHost(ROOT / "function_app.py", storage.env(), http_port=0, functions=["dashboard"]) as host:
            with urllib.request.urlopen(f"http://127.0.0.1:{host.http_port}/api/dashboard?code=local") as response:
                body, headers = response.read(), response.headers
    finally:
        asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)
    assert body == page().body
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == page().headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
