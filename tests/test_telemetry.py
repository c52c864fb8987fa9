"""Telemetry: one span per request with id, account, outcome and SMTP code — and no addresses."""

from __future__ import annotations

import asyncio

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
