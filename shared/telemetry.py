"""OpenTelemetry: one span per request and counters for messages, recipients and outcomes.

Exporter: Azure Monitor when APPLICATIONINSIGHTS_CONNECTION_STRING is set, OTLP/HTTP when
OTEL_EXPORTER_OTLP_ENDPOINT is set, otherwise none (the API's no-op providers). Exporter
packages are imported only when used, to keep cold start short. No addresses ever.

As Azure Functions expects it (Microsoft Learn, "Use OpenTelemetry with Azure Functions"): the
host exports its own telemetry (host.json `"telemetryMode": "OpenTelemetry"`), the worker
exports the app's (`PYTHON_ENABLE_OPENTELEMETRY=true`, so the host no longer forwards the
worker's logs as well), and the two correlate because every invocation's spans are children of
the host's invocation span (`invocation`, from `context.trace_context`). Logs are exported from
the app's own logger namespace (`hve_relay`) only, never from the root logger: the worker's
handler on the root logger, the host's console capture and the exporter's own logging stay out,
so a record is exported once (azure-functions-python-worker#1342).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from shared.settings import Settings

# Every logger of the app is `hve_relay.<part>`: the one namespace whose records are exported.
LOGGER_NAMESPACE = "hve_relay"
log = logging.getLogger(f"{LOGGER_NAMESPACE}.telemetry")
_configured = False
# Instrumentations of the Azure Monitor distro that would report the host's request a second
# time (web frameworks the app does not use; the host already records each invocation).
_NOT_INSTRUMENTED = ("django", "fastapi", "flask")


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

        kwargs: dict[str, Any] = {
            "connection_string": settings.appinsights_connection_string,
            # Logs of the app's namespace only: not the root logger, where the worker's own handler
            # sits and the exporter's own records would be collected and sent again.
            "logger_name": LOGGER_NAMESPACE,
            "instrumentation_options": {name: {"enabled": False} for name in _NOT_INSTRUMENTED},
        }
        if settings.managed_identity_client_id:
            # Entra authentication (local auth is off on the App Insights resource).
            from azure.identity import ManagedIdentityCredential

            kwargs["credential"] = ManagedIdentityCredential(client_id=settings.managed_identity_client_id)
        configure_azure_monitor(**kwargs)
    elif exporter == "otlp":
        _configure_otlp()
    if exporter != "none":
        log.info("telemetry: exporting with %s", exporter)
    return exporter


def _configure_otlp() -> None:
    """Traces, metrics and the app's logs over OTLP/HTTP (OTEL_EXPORTER_OTLP_* settings), and
    Azure SDK calls (storage, Key Vault) as child spans, as the Azure Monitor distro does."""
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        from opentelemetry.instrumentation.logging.handler import LoggingHandler
    except ImportError:  # older SDKs keep it here
        from opentelemetry.sdk._logs import LoggingHandler  # type: ignore[assignment]

    resource = Resource.create({"service.name": "hve-relay"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    )
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    set_logger_provider(logger_provider)
    app_logger = logging.getLogger(LOGGER_NAMESPACE)
    if not any(isinstance(handler, LoggingHandler) for handler in app_logger.handlers):
        app_logger.addHandler(LoggingHandler(logger_provider=logger_provider))
    try:
        from azure.core.settings import settings as azure_settings

        azure_settings.tracing_implementation = "opentelemetry"
    except Exception:  # azure-core-tracing-opentelemetry missing: no SDK spans, nothing else lost
        log.debug("Azure SDK spans are off", exc_info=True)


@contextmanager
def invocation(trace_context: Any) -> Iterator[None]:
    """Run one invocation as a child of the host's invocation span: `trace_context` is the
    `context.trace_context` the host hands the function (W3C traceparent and tracestate). The
    host's request telemetry and the app's spans and logs then share one trace (operation) id.
    Without a valid traceparent (an old host, a test calling the function) nothing changes."""
    traceparent = getattr(trace_context, "trace_parent", "") or ""
    if not traceparent:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent, "tracestate": getattr(trace_context, "trace_state", "") or ""}
    token = otel_context.attach(TraceContextTextMapPropagator().extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


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
        self.events = meter.create_counter(
            "hve_relay.events", unit="{event}", description="Outcome events published (copies included), by type"
        )
        self.events_dropped = meter.create_counter(
            "hve_relay.events.dropped",
            unit="{event}",
            description="Outcome events given up after PUBLISH_ATTEMPTS tries (the events target kept failing), by type",
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
