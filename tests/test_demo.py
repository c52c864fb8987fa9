"""`./tools/demo.sh`, the README's "run it locally" command (its sample output in docs/local.md), runs as written: Azurite, the HVE emulator,
the Graph stand-in and the local host, the sample batch with its faults, then one mail through
POST /api/send whose status URL and final GET /api/requests/<id> answer it prints, a recipient refused
for good at RCPT left out of the next request (suppressed 1) and a priority request sent while bulk
requests are still queued. The output keeps the shape docs/local.md shows (every line of its sample,
numbers aside) and the batch's outcome."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest

from tests.schemas import REQUEST_STATUS_SCHEMA
from tools.demo import BACKLOG, HTTP_REQUEST

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_output() -> str:
    # --http-port 0: any free port (the default, 7071, may be taken by a developer's own host).
    run = subprocess.run(
        [str(ROOT / "tools" / "demo.sh"), "--http-port", "0"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, f"demo.sh exited with {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run.stdout


def _sample() -> list[str]:
    text = (ROOT / "docs" / "local.md").read_text(encoding="utf-8")
    section = text.split("`./tools/demo.sh` starts Azurite", 1)[1]
    return section.split("```\n", 1)[1].split("\n```", 1)[0].splitlines()


def _pattern(line: str) -> re.Pattern[str]:
    """A sample line as a pattern: numbers and ports vary, `...` stands for what the sample leaves out."""
    parts = [".*" if p == "..." else r"\d+" if p.isdigit() else re.escape(p)
             for p in re.split(r"(\d+|\.\.\.)", line.strip())]
    return re.compile(r"\s*" + "".join(parts) + r"\s*$")


def test_the_demo_prints_every_line_of_the_documented_sample(demo_output):
    lines = demo_output.splitlines()
    sample = [s for s in _sample() if s.strip() != "..."]
    assert any("POST" in s for s in sample), "the sample in docs/local.md shows the HTTP door"
    for line in sample:
        pattern = _pattern(line)
        assert any(pattern.match(out) for out in lines), f"docs/local.md sample line not in the demo's output: {line!r}"


def test_the_batch_ends_as_the_docs_say(demo_output):
    # The sample batch's outcome is fixed by tools/samples/demo-requests.json and the faults.
    assert re.search(r"^\s+\d+\.\ds  sent 37  deferred 0  refused 6  dead 0  on queue 0$", demo_output, re.M)
    summary = demo_output.split("== Summary (from the ledger) ==\n", 1)[1].split("\n\n", 1)[0]
    assert "  refused   6\n" in summary and "  sent      37\n" in summary
    assert "HVE emulator accepted 37 messages over " in summary
    assert "welcome mails accepted by the emulator: 4" in demo_output, "the HTTP mail is not counted as a welcome"


def test_the_demo_confirms_delivery_of_what_it_sent_from_the_message_trace(demo_output):
    # The trace finds the accounts' hours in the hourly aggregates: the demo's mail is seconds old,
    # so this fails if the worker's counts were not written before the run.
    section = demo_output.split("== Delivery confirmation (message trace, Graph stand-in) ==\n", 1)[1].split("\n\n", 1)[0]
    run = re.search(r"^(\d+) Graph request\(s\), (\d+) trace row\(s\): (\d+) matched", section, re.M)
    assert run and int(run.group(1)) > 0 and int(run.group(3)) > 0, section
    counts = re.search(r"recipients by delivery status:  delivered (\d+)  failed (\d+)  quarantined (\d+)  pending (\d+)",
                       section)
    assert counts and all(int(n) > 0 for n in counts.groups()), section     # hugo@, archive@, jon@ and the rest


def test_the_demo_sends_one_mail_over_http_and_shows_its_status(demo_output):
    section = demo_output.split("== Over HTTP (POST /api/send on the local host) ==\n", 1)[1].split("\n\n", 1)[0]
    lines = section.splitlines()
    rid = HTTP_REQUEST["id"]

    post = re.fullmatch(r"POST (http://127\.0\.0\.1:(\d+))/api/send  ->  202 (.*)", lines[0])
    assert post, lines[0]
    base = post.group(1)
    assert json.loads(post.group(3)) == {"id": rid, "status": f"/api/requests/{rid}"}

    assert lines[1] == f"status URL  {base}/api/requests/{rid}"

    get = re.fullmatch(rf"GET  {re.escape(base)}/api/requests/{rid}  ->  200 (.*)", lines[2])
    assert get, lines[2]
    view = json.loads(get.group(1))
    jsonschema.validate(view, REQUEST_STATUS_SCHEMA)
    assert view["id"] == rid and view["state"] == "sent" and view["last_code"] == 250 and view["attempts"] >= 1
    assert view["chunks_sent"] == view["chunks_total"] == 1
    assert "ann@" not in section.lower(), "no recipient address in what the demo prints of the HTTP door"

    assert re.fullmatch(r"  states seen: (\w+ -> )*sent \(\d+\.\d s\)", lines[3]), lines[3]


def test_a_recipient_refused_for_good_at_rcpt_is_left_out_of_the_next_request(demo_output):
    section = demo_output.split("== Suppression list (docs/suppression.md) ==\n", 1)[1].split("\n\n", 1)[0]
    first, check, second = section.splitlines()
    assert re.fullmatch(r"demo-gone-1  to olaf@ +->  refused  suppressed 0  last code 550  HVE accepted: none", first), first

    post = re.fullmatch(r"POST /api/suppressions/check \(olaf@\)  ->  200 (.*)", check)
    assert post, check
    answer = json.loads(post.group(1))
    assert answer["suppressed"] is True and answer["reason"] == "rcpt:550 5.1.1", answer

    # The second request, to the refused recipient and another one: sent, the refused one left out.
    sent = re.fullmatch(r"demo-gone-2  to olaf@, bob@ +->  sent  suppressed (\d+)  last code 250  HVE accepted: bob@", second)
    assert sent, second
    assert int(sent.group(1)) == 1
    assert "@contoso.com" not in section, "only local parts of addresses, as in the demo's other lines"


def test_a_priority_request_is_sent_while_bulk_requests_are_still_queued(demo_output):
    section = demo_output.split('== Priority lane ("priority": "high" on POST /api/send) ==\n', 1)[1].split("\n\n", 1)[0]
    enqueued, priority, drained = section.splitlines()
    assert re.fullmatch(rf"enqueued    {BACKLOG} bulk requests on 'outbound-mail' in \d+\.\d s, then "
                        r'POST /api/send with "priority": "high"  ->  202', enqueued), enqueued
    sent = re.fullmatch(r"priority request sent (\d+\.\d) s after its POST, (\d+) bulk requests still queued "
                        rf"\((\d+) of {BACKLOG} sent before it\)", priority)
    assert sent, priority
    still_queued, sent_before = int(sent.group(2)), int(sent.group(3))
    assert still_queued > 0 and still_queued + sent_before == BACKLOG, priority
    assert re.fullmatch(rf"backlog drained: {BACKLOG} of {BACKLOG} bulk requests sent \d+\.\d s after the first was queued",
                        drained), drained
