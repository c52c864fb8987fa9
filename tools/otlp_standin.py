"""A local stand-in for an OpenTelemetry collector's OTLP/HTTP receiver, on 127.0.0.1: it accepts
`POST /v1/traces`, `/v1/logs` and `/v1/metrics` (protobuf, or JSON; gzip or not), answers as a
collector does, and keeps what it received, decoded, for tests to read.

    with OtlpStandin() as otlp:                    # any free port
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
        ...
        otlp.wait_for(lambda: otlp.spans, timeout=10)
        otlp.spans    # [Span(trace_id, span_id, parent_span_id, name, kind, attributes, scope)]
        otlp.logs     # [LogRecord(trace_id, span_id, severity, body, attributes, scope)]

    python -m tools.otlp_standin --port 4318        # print a line per span and log record
"""

from __future__ import annotations

import argparse
import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SERVICES: dict[str, tuple[Any, Any]] = {
    "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse),
    "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse),
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, metrics_service_pb2.ExportMetricsServiceResponse),
}


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    scope: str
    resource: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogRecord:
    trace_id: str  # "" when logged outside any span
    span_id: str
    severity: str
    body: Any
    attributes: dict[str, Any]
    scope: str
    time_unix_nano: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


class OtlpStandin:
    """The receiver; `start()`/`stop()` or a `with` block. Thread-safe reads of what arrived."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.spans: list[Span] = []
        self.logs: list[LogRecord] = []
        self.metric_names: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (path, content type)
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                service = SERVICES.get(self.path)
                if service is None:
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                content_type = self.headers.get("Content-Type", "")
                request = service[0]()
                try:
                    if content_type.startswith("application/json"):
                        json_format.Parse(body, request)
                    else:
                        request.ParseFromString(body)
                except Exception as exc:
                    self.send_error(400, f"undecodable OTLP: {exc}")
                    return
                standin._take(self.path, content_type, request)
                reply = service[1]()
                if content_type.startswith("application/json"):
                    payload, reply_type = json_format.MessageToJson(reply).encode(), "application/json"
                else:
                    payload, reply_type = reply.SerializeToString(), "application/x-protobuf"
                self.send_response(200)
                self.send_header("Content-Type", reply_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (the exporters add /v1/traces, /v1/logs, /v1/metrics)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpStandin:
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, condition: Callable[[], Any], timeout: float) -> Any:
        """Poll `condition` until it is truthy (returned) or the timeout passes (AssertionError)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"OTLP stand-in: condition not met in {timeout:g} s "
                                     f"({len(self.spans)} spans, {len(self.logs)} log records)")
            time.sleep(0.05)

    def _take(self, path: str, content_type: str, request: Any) -> None:
        with self._lock:
            self.requests.append((path, content_type))
            if path == "/v1/traces":
                for resource_spans in request.resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            self.spans.append(Span(
                                trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(), name=span.name, kind=span.kind,
                                attributes=_attributes(span.attributes), scope=scope_spans.scope.name,
                                resource=resource))
            elif path == "/v1/logs":
                for resource_logs in request.resource_logs:
                    for scope_logs in resource_logs.scope_logs:
                        for record in scope_logs.log_records:
                            self.logs.append(LogRecord(
                                trace_id=record.trace_id.hex(), span_id=record.span_id.hex(),
                                severity=record.severity_text, body=_value(record.body),
                                attributes=_attributes(record.attributes), scope=scope_logs.scope.name,
                                time_unix_nano=record.time_unix_nano))
            else:
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        self.metric_names.extend(m.name for m in scope_metrics.metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.otlp_standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    standin = OtlpStandin(port=args.port).start()
    print(f"OTLP/HTTP on {standin.endpoint} (Ctrl-C to stop)", flush=True)
    seen = (0, 0)
    try:
        while True:
            time.sleep(0.5)
            with standin._lock:
                spans, logs = standin.spans[seen[0]:], standin.logs[seen[1]:]
                seen = (len(standin.spans), len(standin.logs))
            for span in spans:
                print(f"span {span.trace_id} {span.span_id} <- {span.parent_span_id or '-':16} {span.name}", flush=True)
            for record in logs:
                print(f"log  {record.trace_id or '-':32} {record.severity} {record.scope}: {record.body}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
