"""docs/producers.md: its curl and Python examples run, as written, against the local host, Azurite and
the HVE emulator; the examples that cannot run here (PowerShell, C#, az, Logic Apps, an output binding)
carry the payload of a tested one."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from shared.send.mime import message_id
from tests.schemas import REQUEST_STATUS_SCHEMA
from tests.test_function_app import FAST_HOST, app_settings, close_app_relays
from tools.devhost import DevHost

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "producers.md"
README = ROOT / "README.md"


def examples(text: str) -> dict[str, str]:
    """The fenced block after each `<!-- example: NAME -->` marker."""
    found = {}
    for match in re.finditer(r"<!-- example: ([\w-]+) -->\n```\w*\n(.*?)\n```", text, re.S):
        found[match.group(1)] = match.group(2)
    return found


EXAMPLES = examples(DOC.read_text(encoding="utf-8"))


def json_values(text: str) -> list[Any]:
    """The JSON values printed one after the other (curl adds no newline)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())  # the next character that is not white space
        if at == len(text):
            return out
        value, at = decoder.raw_decode(text, at)
        out.append(value)


def python_request(source: str) -> dict[str, Any]:
    """The dict literal assigned to `request` in a Python example."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["request"]:
            return ast.literal_eval(node.value)
    raise AssertionError("no `request = {...}` in the example")


def between(source: str, start: str, end: str) -> dict[str, Any]:
    return json.loads(source.split(start, 1)[1].split(end, 1)[0])


def payloads() -> dict[str, dict[str, Any]]:
    e = EXAMPLES
    return {
        "curl-http": between(e["curl-http"], "-d '", "'"),
        "python-http": python_request(e["python-http"]),
        "powershell-http": between(e["powershell-http"], "@'\n", "\n'@"),
        "logicapps-http": json.loads(e["logicapps-http"])["inputs"]["body"],
        "python-queue": python_request(e["python-queue"]),
        "az-queue": between(e["az-queue"], "--content '", "'"),
        "powershell-queue": between(e["powershell-queue"], "@'\n", "\n'@"),
        "csharp-queue": between(e["csharp-queue"], '"""\n', '\n"""'),
        "binding-queue": python_request(e["binding-queue"]),
    }


def test_every_example_that_cannot_run_here_sends_the_payload_of_a_tested_one():
    p = payloads()
    # The HTTP examples that cannot run post exactly what the tested curl example posts.
    assert p["powershell-http"] == p["curl-http"] and p["logicapps-http"] == p["curl-http"]
    # The queue examples that cannot run put exactly what the tested Python example puts.
    for name in ("az-queue", "powershell-queue", "csharp-queue", "binding-queue"):
        assert p[name] == p["python-queue"], name
    # One first mail everywhere, under one id per door (and the Python HTTP example's own).
    assert len({json.dumps({k: v for k, v in d.items() if k != "id"}, sort_keys=True) for d in p.values()}) == 1
    assert {d["id"] for d in p.values()} == {"first-mail-http", "first-mail-python", "first-mail-queue"}
    # Each untested example says so beside it.
    text = DOC.read_text(encoding="utf-8")
    for name in ("powershell-http", "logicapps-http", "az-queue", "powershell-queue", "csharp-queue", "binding-queue"):
        heading = text[: text.index(f"<!-- example: {name} -->")].rsplit("\n### ", 1)[1].split("\n", 1)[0]
        assert "not run here" in heading, name
    for name in ("curl-http", "python-http", "python-queue"):
        heading = text[: text.index(f"<!-- example: {name} -->")].rsplit("\n### ", 1)[1].split("\n", 1)[0]
        assert "(tested)" in heading, name


def test_the_powershell_function_speaks_send_mailmessage_and_posts_the_contract():
    script = (ROOT / "tools" / "Send-HveRelayMail.ps1").read_text(encoding="utf-8")
    assert "function Send-HveRelayMail" in script
    params = set(re.findall(r"\[Parameter[^\]]*\]\s*(?:\[[\w\[\]]+\]\s*)*\$(\w+)", script))
    assert {"To", "Cc", "Bcc", "Subject", "Body", "BodyAsHtml", "Attachments", "From"} <= params, params
    for field in ("to", "cc", "bcc", "subject", "text", "html", "attachments", "contentBase64", "contentType", "account"):
        assert re.search(rf"\b{field}\b\s*=", script), field
    assert "Invoke-RestMethod" in script and "/api/send" in script and "ToBase64String" in script


def test_the_readme_starts_with_both_doors_and_links_the_examples():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Send your first mail", 1)[1].split("\n## ", 1)[0]
    # On the first screen: the first section of the README, within its first 60 lines.
    assert text.index("\n## ") == text.index("\n## Send your first mail")
    assert text[: text.index("## Send your first mail")].count("\n") < 60
    assert "/api/send" in section and "az storage message put" in section and "docs/producers.md" in section


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_and_python_examples_send_their_first_mail_through_the_local_host(storage, emulator):
    settings = app_settings(storage, emulator)
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["send_mail", "send", "request_status"]) as host:
            env = {**os.environ, "HVE_RELAY_URL": f"http://127.0.0.1:{host.http_port}", "HVE_RELAY_KEY": "local",
                   "AZURE_STORAGE_CONNECTION_STRING": storage.connection_string, "MAIL_QUEUE": storage.queue_name}
            curl = subprocess.run(["bash", "-euo", "pipefail", "-c", EXAMPLES["curl-http"]], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            python_http = subprocess.run([sys.executable, "-c", EXAMPLES["python-http"]], env=env, cwd=ROOT,
                                         capture_output=True, text=True, timeout=60)
            python_queue = subprocess.run([sys.executable, "-c", EXAMPLES["python-queue"]], env=env, cwd=ROOT,
                                          capture_output=True, text=True, timeout=60)
            for run in (curl, python_http, python_queue):
                assert run.returncode == 0, run.stderr
            host.wait_until_idle(60)
            states = {}
            for rid in ("first-mail-http", "first-mail-python", "first-mail-queue"):
                with urllib.request.urlopen(f"http://127.0.0.1:{host.http_port}/api/requests/{rid}") as response:
                    states[rid] = json.load(response)
    finally:
        close_app_relays()

    # curl printed the 202 body, then the status (the request was still on the queue then).
    accepted, status = json_values(curl.stdout)
    assert accepted == {"id": "first-mail-http", "status": "/api/requests/first-mail-http"}
    assert status["id"] == "first-mail-http" and status["state"] in ("received", "sending", "sent")
    assert python_http.stdout.split() == ["202", "first-mail-python", "/api/requests/first-mail-python"]
    for rid, view in states.items():
        jsonschema.validate(view, REQUEST_STATUS_SCHEMA)
        assert (view["state"], view["attempts"], view["last_code"]) == ("sent", 1, 250), rid
    assert {m.message_id for m in emulator.accepted()} == {
        message_id(rid, "contoso.com", key=b"k") for rid in states}
