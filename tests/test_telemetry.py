"""Telemetry: one span per request with id, account, outcome and SMTP code — and no addresses."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.send.stage import Relay
from shared.settings import Settings
from shared.telemetry import Instruments, exporter_for
from tests.relay_harness import drain, enqueue, relay_settings

SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()
# Providers of this test's own: the process-wide ones can be set only once, and another test (or a
# relay's `configure`) may have set them first.
TRACER_PROVIDER = TracerProvider()
TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(SPANS))
METER_PROVIDER = MeterProvider(metric_readers=[READER])


def setup_module():
    # Tests that use the global provider (test_no_addresses) feed the same exporter.
    trace.set_tracer_provider(TRACER_PROVIDER)


def test_span_and_counters_describe_the_outcome_without_addresses(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        relay.instruments = Instruments(TRACER_PROVIDER, METER_PROVIDER)
        try:
            await enqueue(relay, {"id": "otel-1", "to": ["secret.person@contoso.com"], "subject": "s", "text": "t"})
            await enqueue(relay, {"id": "otel-2", "to": ["bad address"], "subject": "s", "text": "t"})
            await drain(relay)
        finally:
            await relay.close()

    asyncio.run(main())
    spans = {s.attributes["hve.request_id"]: s for s in SPANS.get_finished_spans() if s.name == "hve_relay.send"}
    assert spans["otel-1"].attributes["hve.outcome"] == "sent"
    assert spans["otel-1"].attributes["hve.smtp.code"] == 250
    assert spans["otel-1"].attributes["hve.account"].endswith("@contoso.com")
    assert spans["otel-2"].attributes["hve.outcome"] == "refused"
    everything = repr([dict(s.attributes) for s in spans.values()])
    assert "secret.person" not in everything and "bad address" not in everything

    points = {}
    for metric in READER.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
        for point in metric.data.data_points:
            points.setdefault(metric.name, []).append((dict(point.attributes), point.value))
    assert any(attrs.get("outcome") == "sent" and value >= 1 for attrs, value in points["hve_relay.messages"])
    assert any(attrs == {"kind": "internal"} and value >= 1 for attrs, value in points["hve_relay.recipients"])
    assert any(attrs.get("code") == "2.6.0" for attrs, _ in points["hve_relay.smtp.replies"])


def test_exporter_follows_the_settings():
    assert exporter_for(Settings.from_env({})) == "none"
    assert exporter_for(Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})) == "otlp"
    assert exporter_for(Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                                           "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"})) == "azure-monitor"


def test_azure_monitor_collects_the_app_namespace_only(monkeypatch):
    """configure_azure_monitor gets the app's logger namespace: without it the distro attaches its
    handler to the root logger, where the worker's own handler sits, and every record goes twice
    (azure-functions-python-worker#1342); the exporter's own logging would be collected too."""
    import azure.monitor.opentelemetry as distro

    from shared import telemetry

    calls: list[dict] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(telemetry, "_configured", False)
    settings = Settings.from_env({"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x",
                                  "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001"})
    assert telemetry.configure(settings) == "azure-monitor"
    assert telemetry.configure(settings) == "already"
    assert len(calls) == 1
    kwargs = calls[0]
    assert kwargs["logger_name"] == telemetry.LOGGER_NAMESPACE == "hve_relay"
    assert kwargs["connection_string"] == "InstrumentationKey=x"
    assert type(kwargs["credential"]).__name__ == "ManagedIdentityCredential"
    # No web-framework instrumentation: the host already records each invocation as a request.
    assert all(not kwargs["instrumentation_options"][name]["enabled"] for name in ("django", "fastapi", "flask"))


def test_every_logger_of_the_app_is_in_the_exported_namespace():
    root = Path(__file__).resolve().parents[1]
    names = []
    for path in [root / "function_app.py", *(root / "shared").rglob("*.py")]:
        names += [(path.name, m) for m in re.findall(r"getLogger\(([^)]*)\)", path.read_text())]
    assert names
    wrong = [(file, arg) for file, arg in names
             if not re.fullmatch(r'"hve_relay(\.[a-z_]+)*"|f"\{LOGGER_NAMESPACE\}\.[a-z_]+"|LOGGER_NAMESPACE', arg)]
    assert not wrong, f"loggers outside the exported namespace hve_relay: {wrong}"


def test_an_invocation_is_a_child_of_the_host_invocation_span():
    from shared.telemetry import invocation

    class HostContext:
        trace_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        trace_state = "congo=t61rcWkgMzE"

    tracer = TRACER_PROVIDER.get_tracer("test")
    with invocation(HostContext()):
        with tracer.start_as_current_span("inside") as inside:
            pass
    with invocation(type("NoHost", (), {"trace_parent": "", "trace_state": ""})()):
        with tracer.start_as_current_span("no-host") as alone:
            pass
    with tracer.start_as_current_span("after") as after:
        pass
    context = inside.get_span_context()
    assert f"{context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert inside.parent is not None and f"{inside.parent.span_id:016x}" == "b7ad6b7169203331"
    assert context.trace_state.get("congo") == "t61rcWkgMzE"
    # Without a traceparent, and after the invocation, spans are roots of their own traces.
    assert alone.parent is None and after.parent is None
    assert after.get_span_context().trace_id != context.trace_id
