"""OpenTelemetry: one span per request and counters for messages, recipients and outcomes.

Exporter: Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set, OTLP/HTTP when
OTEL_EXPORTER_OTLP_ENDPOINT is set, otherwise none (the API's no-op providers). Exporter
packages are imported only when used, to keep cold start short. No addresses ever.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import metrics, trace

from shared.settings import Settings

log = logging.getLogger(__name__)
_configured = False


def exporter_for(settings: Settings) -> str:
    """Which exporter the settings ask for: Azure Monitor wins over OTLP; neither means none."""
    if settings.appinsights_connection_string:
        return "azure-monitor"
    if settings.otlp_endpoint:
        return "otlp"
    return "none"


def configure(settings: Settings) -> str:
    """Install the exporter named by the settings, once per process. Returns which one."""
    global _configured
    if _configured:
        return "already"
    _configured = True
    exporter = exporter_for(settings)
    if exporter == "azure-monitor":
        from azure.monitor.opentelemetry import configure_azure_monitor

        kwargs: dict[str, Any] = {"connection_string": settings.appinsights_connection_string}
        if settings.managed_identity_client_id:
            # Entra authentication (local auth is off on the App Insights resource).
            from azure.identity import ManagedIdentityCredential

            kwargs["credential"] = ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
        configure_azure_monitor(**kwargs)
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": "hve-relay"})
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(
            MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
        )
    return exporter


class Instruments:
    """The relay's spans and counters; names follow OpenTelemetry conventions (dots, units)."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        # Providers default to the process's global ones (set once by `configure`).
        self.tracer = trace.get_tracer("hve_relay", tracer_provider=tracer_provider)
        meter = metrics.get_meter("hve_relay", meter_provider=meter_provider)
        self.messages = meter.create_counter(
            "hve_relay.messages", unit="{message}", description="Requests handled, by outcome and account"
        )
        self.recipients = meter.create_counter(
            "hve_relay.recipients",
            unit="{recipient}",
            description="Recipients of sent messages, by kind (internal/external)",
        )
        self.smtp_replies = meter.create_counter(
            "hve_relay.smtp.replies", unit="{reply}", description="SMTP replies from HVE, by code"
        )
        self.delivery = meter.create_counter(
            "hve_relay.delivery",
            unit="{recipient}",
            description="Recipients reaching a message-trace status, by status and account",
        )
        # Sampled by the `sample_health` timer (shared/reporting/health.py) for the alert rules of
        # infra/modules/alerts.bicep (docs/alerts.md): the last value each time it runs.
        self.queue_depth = meter.create_gauge(
            "hve_relay.queue.depth", unit="{message}", description="Approximate messages on a queue, by queue"
        )
        self.queue_oldest_age = meter.create_gauge(
            "hve_relay.queue.oldest_age",
            unit="s",
            description="Age of the oldest message visible on a queue (0: none visible), by queue",
        )
        self.account_unhealthy = meter.create_gauge(
            "hve_relay.account.unhealthy",
            unit="1",
            description="1 while the governor keeps an account out of rotation after an authentication failure, else 0",
        )
        self.delivery_trace_runs = meter.create_counter(
            "hve_relay.delivery_trace.runs",
            unit="{run}",
            description="Message-trace reconciliations that finished, by result (complete, stopped)",
        )


def flush_metrics(timeout_millis: int = 10_000) -> bool:
    """Export what the process's meter provider holds now (a timer's samples would otherwise wait
    for the next periodic export, which a scaled-in instance may never reach). No-op providers
    have nothing to flush."""
    flush = getattr(metrics.get_meter_provider(), "force_flush", None)
    if flush is None:
        return False
    try:
        return bool(flush(timeout_millis))
    except Exception:  # telemetry never fails the caller
        log.warning("flushing the metrics failed", exc_info=True)
        return False
