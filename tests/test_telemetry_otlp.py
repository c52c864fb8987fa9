"""Telemetry as Azure Functions expects it, proved over OTLP: the local host (a separate process, so
the app installs its own exporters as in Azure) hands every invocation a W3C traceparent the way the
real host does; the app exports to a local OTLP/HTTP receiver (tools/otlp_standin.py). One request
is one trace: the caller's trace for POST /api/send, the host's invocation span as the parent of
every span of the send_mail invocation; and each log record is exported once, from the app's
namespace only (never the host's own log lines, the root logger or the exporter's own logging)."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from collections import Counter
from pathlib import Path

from tests.test_function_app import FAST_HOST, app_settings
from tools.devhost_process import HostProcess
from tools.otlp_standin import OtlpStandin, Span

ROOT = Path(__file__).resolve().parents[1]
INVOCATION = re.compile(r"devhost: (\w+): (\w+) in \d+ ms.* invocation_id=\S+ traceparent=00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
# Export at once instead of every 5 s (the SDK's defaults), so the test waits for events, not timers.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_BLRP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invocations(host: HostProcess) -> dict[str, tuple[str, str, str]]:
    """function -> (outcome, trace id, host span id) from the host's one line per invocation."""
    found = {}
    for line in host.log_file.read_text().splitlines():
        if match := INVOCATION.search(line):
            found[match.group(1)] = match.group(2, 3, 4)
    return found


def wait_for(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


def one_tree(spans: list[Span], host_span: str) -> bool:
    """Every span's parent is the host's invocation span or another span of the same trace."""
    ids = {s.span_id for s in spans}
    return all(s.parent_span_id in ids | {host_span} for s in spans) and any(s.parent_span_id == host_span for s in spans)


def test_one_request_is_one_trace_from_host_to_worker_and_every_log_record_is_exported_once(storage, emulator, tmp_path):
    caller_trace, caller_span = os.urandom(16).hex(), os.urandom(8).hex()
    with OtlpStandin() as otlp:
        settings = app_settings(storage, emulator, OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint)
        host = HostProcess(tmp_path / "host", settings, host_json=FAST_HOST, log_level="INFO",
                           functions="send,send_mail", http_port=free_port(), env=FAST_EXPORT)
        host.start()
        try:
            wait_for(lambda: "HTTP on http://" in host.log_file.read_text() or host.exited(), 60, "the host did not start")
            assert not host.exited(), host.log_file.read_text()
            request = urllib.request.Request(
                f"http://127.0.0.1:{host.http_port}/api/send", method="POST",
                data=json.dumps({"id": "otlp-1", "to": ["ann@contoso.com"], "subject": "s", "text": "t"}).encode(),
                headers={"Content-Type": "application/json", "traceparent": f"00-{caller_trace}-{caller_span}-01"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202
            seen = wait_for(lambda: (found := invocations(host)).get("send_mail") and found, 60,
                            "send_mail did not run")
            sent = next(s for s in otlp.wait_for(lambda: [s for s in otlp.spans if s.name == "hve_relay.send"], 30))
            # Azure SDK spans end before their parents: once the send span is in, wait for the
            # batch that closes the intake's storage calls too.
            otlp.wait_for(lambda: any(s.trace_id == caller_trace for s in otlp.spans), 30)
            otlp.wait_for(lambda: [r for r in otlp.logs if r.scope == "hve_relay.sender"], 30)
        finally:
            host.terminate()  # a graceful stop flushes the exporters
        log = host.log_file.read_text()
        spans, logs = list(otlp.spans), list(otlp.logs)

    assert seen["send"][0] == "Succeeded" and seen["send_mail"][0] == "Succeeded", log
    http_trace, http_host_span = seen["send"][1:]
    queue_trace, queue_host_span = seen["send_mail"][1:]
    # The host continued the caller's trace for the HTTP request, with a span of its own; the queue
    # message started a trace of its own (storage queues carry no trace context).
    assert http_trace == caller_trace and http_host_span != caller_span
    assert queue_trace not in (caller_trace, "0" * 32)

    # One request, one trace per invocation, each a single tree under the host's invocation span.
    by_trace: dict[str, list[Span]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    assert set(by_trace) == {caller_trace, queue_trace}, [(s.trace_id, s.name) for s in spans]
    assert sent.trace_id == queue_trace and sent.parent_span_id == queue_host_span
    assert sent.attributes["hve.request_id"] == "otlp-1" and sent.attributes["hve.outcome"] == "sent"
    assert one_tree(by_trace[queue_trace], queue_host_span), by_trace[queue_trace]
    assert one_tree(by_trace[caller_trace], http_host_span), by_trace[caller_trace]
    # The send stage's storage calls are child spans of the send span (Azure SDK tracing).
    assert len(by_trace[queue_trace]) >= 3 and any(s.parent_span_id == sent.span_id for s in by_trace[queue_trace])
    assert {s.resource.get("service.name") for s in spans} == {"hve-relay"}

    # Logs: from the app's namespace only (the host's invocation lines, the root logger and the
    # exporter's own logging never reach the exporter), each exported once, in its invocation's trace.
    assert logs and all(r.scope == "hve_relay" or r.scope.startswith("hve_relay.") for r in logs), logs
    assert not [n for n, c in Counter((r.scope, r.body, r.time_unix_nano) for r in logs).items() if c > 1], logs
    started = [r for r in logs if r.body == "telemetry: exporting with otlp"]
    assert len(started) == 1 and started[0].trace_id == caller_trace  # configured in the first invocation
    assert "send_mail: Succeeded" in log and not any("Succeeded" in str(r.body) for r in logs)
    outcome = [r for r in logs if r.scope == "hve_relay.sender" and "otlp-1" in str(r.body)]
    assert len(outcome) == 1 and outcome[0].trace_id == queue_trace  # the send stage's line, in its trace


def test_cold_start_imports_no_exporter_or_sdk():
    """Importing the app (what the worker does on a cold start) loads the OpenTelemetry API only:
    the SDK, the exporters and the Azure Monitor distro are imported by `configure`, and only when
    their setting is present."""
    import subprocess
    import sys

    probe = ("import sys, function_app; print('\\n'.join(m for m in sys.modules if m.startswith("
             "('azure.monitor', 'opentelemetry.sdk', 'opentelemetry.exporter', 'opentelemetry.instrumentation'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLICATIONINSIGHTS_", "OTEL_"))}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout
