"""POST /api/send and GET /api/requests/{id} through function_app.py under the local host, with the
send stage, Azurite and the HVE emulator behind them. Every answer is validated against its schema
in shared/schema/, and no answer carries a recipient address."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema

from tests.schemas import ERROR_SCHEMA, REQUEST_STATUS_SCHEMA, SEND_SCHEMA
from tests.test_function_app import FAST_HOST, app_settings, close_app_relays
from tests.test_no_addresses import BAD, CC, EXTERNAL, SENT_TO, leaks
from tools.devhost import DevHost

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ["send_mail", "send", "request_status"]


def call(port: int, method: str, path: str, data: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "x-functions-key": "local"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, dict(exc.headers), json.loads(raw) if raw.startswith(b"{") else raw


def post(port: int, doc: dict | bytes) -> tuple[int, dict[str, str], Any]:
    return call(port, "POST", "/api/send", doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def mail(rid: str, to: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "to": to, "subject": "Quarterly update", "text": "Hello", **extra}


def test_send_then_status_end_to_end_with_every_answer_valid_and_no_address_in_any(storage, emulator):
    settings = app_settings(storage, emulator, HTTP_SEND_MAX_BYTES="4096")
    answers: list[tuple[str, int, Any]] = []
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0, functions=FUNCTIONS) as host:
            port = host.http_port
            sent = post(port, mail("api-1", SENT_TO[:1] + ["cc.quietperson@contoso.com"], cc=[CC]))
            again = post(port, mail("api-1", SENT_TO[:1] + ["cc.quietperson@contoso.com"], cc=[CC]))
            conflict = post(port, mail("api-1", [SENT_TO[0]]))
            bad = post(port, mail("api-bad", ["ann.privatename@contoso.com", BAD]))
            external = post(port, mail("api-ext", [EXTERNAL]))
            too_large = post(port, mail("api-big", [SENT_TO[0]], text="x" * 5000))
            host.wait_until_idle(60)
            status = call(port, "GET", "/api/requests/api-1")
            unknown = call(port, "GET", "/api/requests/no-such-request")
            address_id = call(port, "GET", "/api/requests/ann.privatename@contoso.com")
            answers = [("sent", *sent[::2]), ("again", *again[::2]), ("conflict", *conflict[::2]), ("bad", *bad[::2]),
                       ("external", *external[::2]), ("too_large", *too_large[::2]), ("status", *status[::2]),
                       ("unknown", *unknown[::2]), ("address_id", *address_id[::2])]
    finally:
        close_app_relays()

    by_name = {name: (code, body) for name, code, body in answers}
    assert by_name["sent"] == (202, {"id": "api-1", "status": "/api/requests/api-1"})
    assert sent[1]["Location"] == "/api/requests/api-1" and sent[1]["Content-Type"].startswith("application/json")
    assert sent[1]["Cache-Control"] == "no-store"
    assert by_name["again"] == by_name["sent"]
    assert by_name["conflict"][0] == 409 and by_name["conflict"][1]["error"] == "id-conflict"
    assert by_name["bad"][0] == 400 and by_name["bad"][1]["reasons"][0]["reason"] == "bad-address"
    assert by_name["external"][0] == 400 and by_name["external"][1]["reasons"][0]["reason"] == "external-not-allowed"
    assert by_name["too_large"][0] == 413 and by_name["too_large"][1]["error"] == "too-large"
    code, view = by_name["status"]
    assert code == 200
    assert (view["id"], view["state"], view["attempts"], view["last_code"]) == ("api-1", "sent", 1, 250)
    assert view["account"] in settings["HVE_ACCOUNTS"].split(",") and view["final_at"] == view["updated"]
    assert view["chunks_total"] == 1 and view["chunks_sent"] == 1 and view["delivery"] == {}
    assert by_name["unknown"] == (404, {"error": "not-found", "message": "no request with this id"})
    assert by_name["address_id"] == by_name["unknown"]  # never echoed
    assert len(emulator.accepted()) == 1

    for name, code, body in answers:
        schema = SEND_SCHEMA if code == 202 else REQUEST_STATUS_SCHEMA if code == 200 else ERROR_SCHEMA
        jsonschema.validate(body, schema)
        assert leaks(json.dumps(body)) == [], (name, body)


def test_a_status_before_the_send_stage_ran_says_received(storage, emulator):
    settings = app_settings(storage, emulator)
    try:
        # No send_mail: the request waits on the queue.
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["send", "request_status"]) as host:
            code, _, body = post(host.http_port, mail("api-waiting", ["ann@contoso.com"]))
            status = call(host.http_port, "GET", "/api/requests/api-waiting")
    finally:
        close_app_relays()
    assert code == 202
    assert status[0] == 200 and status[2]["state"] == "received" and status[2]["final_at"] is None
    assert status[2]["attempts"] == 0 and status[2]["account"] == ""
    jsonschema.validate(status[2], REQUEST_STATUS_SCHEMA)


def test_the_host_refuses_a_body_over_its_limit_without_invoking_the_function(storage, emulator):
    settings = app_settings(storage, emulator, FUNCTIONS_REQUEST_BODY_SIZE_LIMIT="2048")
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["send"]) as host:
            code, _, _ = post(host.http_port, mail("api-huge", ["ann@contoso.com"], text="x" * 4096))
            invocations = list(host.invocations)
    finally:
        close_app_relays()
    assert code == 413 and invocations == []
