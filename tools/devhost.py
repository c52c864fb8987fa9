"""A local stand-in for the Azure Functions host, for Python v2-model apps and Azurite.

`func` (Core Tools) cannot be installed here, so this runs the app's functions itself:
queue triggers poll Azurite with the semantics of host.json `extensions.queues`, timer
triggers fire on their NCRONTAB schedules, HTTP triggers are served with aiohttp.

CLI::

    python -m tools.devhost [--app function_app[:app] | path/to/app.py]
                            [--settings local.settings.json] [--host-json PATH]
                            [--once] [--for SECONDS] [--functions NAME,NAME]
                            [--http-port 7071 | --no-http] [--log-level INFO]
                            [--lease-seconds 600]

  * `Values` of local.settings.json go to os.environ before the app is imported; variables
    already in the environment win (like `func start`). `Host.LocalHttpPort` is honoured.
  * host.json: `--host-json`, else the host.json next to the app module (the app root),
    else the host's built-in defaults.
  * `--once`: exit when every watched queue is empty (approximate message count 0, so
    messages waiting out a visibility timeout or an initial delay count) and nothing is in
    flight. `--for S`: stop after S seconds. Otherwise run until SIGINT/SIGTERM; shutdown is
    graceful (in-flight invocations finish; a second Ctrl-C cancels them).
  * Exit code 0, or 1 when start-up fails (bad setting, unsupported binding, ...).

Python API (for tests)::

    from tools.devhost import DevHost

    host = DevHost(app, settings={...}, host_json={"extensions": {"queues": {...}}})
    host.run_until_idle(timeout=30)      # start, wait until idle, stop; returns invocations

    with DevHost(app, settings, http_port=0) as host:   # start() ... stop()
        host.http_port                                  # the bound port
        host.wait_until_idle(timeout=10)
        host.wait_for(lambda: len(host.invocations) >= 2, timeout=5)
    host.invocations        # list[Invocation]: function, trigger, outcome, duration_ms, ...

  `app`: an azure.functions.FunctionApp, a module that has `app`, or "module[:attr]".
  `settings`: app settings; they are layered over os.environ (settings win) for resolving
  `%NAME%` and connections, and exported to os.environ while the host runs (restored on
  stop) because app code reads its settings from the environment.
  `host_json`: dict, path, or None (see above). `http_port`: None = no HTTP server
  (API default), 0 = any free port. `functions`: run only these functions.
  start() runs the host on one background event-loop thread shared by every DevHost in
  the process (the Python worker also keeps one loop for its lifetime), so async clients an
  app caches at module level keep working across hosts. `stop()` is graceful; a host can
  be started again after it stopped. `serve()` is the coroutine behind both the CLI and
  start(), for callers that have their own loop.

What it does like the real host
  * Queue trigger: receives up to batchSize messages and fetches again when no more than
    newBatchThreshold are in flight (so at most batchSize + newBatchThreshold run at once);
    backs off exponentially from 100 ms up to maxPollingInterval while the queue is empty;
    deletes a message on success; on failure makes it visible again after
    visibilityTimeout, or, when its dequeue count has reached maxDequeueCount, copies it
    unchanged to `<queue>-poison` and deletes it. A message received with a dequeue count
    above maxDequeueCount goes to the poison queue without an invocation. Messages are
    leased for 10 minutes and the lease is renewed while the function runs (`--lease-seconds` /
    `lease_seconds=` shortens it, so a test can replay a killed host's messages quickly).
    messageEncoding "base64" decodes the body (undecodable = failed invocation), "none"
    hands over the UTF-8 text. The queue and its poison queue are created if missing.
    The function gets an azure.functions.QueueMessage (body bytes, id, dequeue_count,
    pop_receipt, insertion_time, expiration_time, time_next_visible); a parameter annotated
    `str` or `bytes` gets the body instead.
  * Timer trigger: six-field NCRONTAB (seconds first) or a "hh:mm:ss" interval, in UTC
    (or WEBSITE_TIME_ZONE); run_on_startup; no overlapping runs of one timer; the function
    gets an azure.functions TimerRequest (past_due when it fires more than 1 s late).
  * HTTP trigger: `/<routePrefix>/<route>` (routePrefix from host.json, default "api"),
    route parameters `{x}`, `{x:constraint}`, `{x?}` (last segment), `{*rest}`; methods as
    declared. Auth levels are NOT enforced: any or no key is accepted, as with
    `func start`. A body over FUNCTIONS_REQUEST_BODY_SIZE_LIMIT (default 100 MB) gets a 413
    without an invocation. Returns the function's HttpResponse (str/bytes = 200, None = 204,
    exception = 500).
  * `POST /admin/functions/<name>` with `{"input": "..."}` runs a non-HTTP function once
    (timer: a TimerRequest; queue: the input as a message body, not through the queue)
    and answers 202, like the real admin API.
  * `%NAME%` in queue names and schedules resolve from app settings; a function is
    skipped when `AzureWebJobs.<name>.Disabled` is "true" or "1".
  * `async def` functions run concurrently on the host's event loop; plain `def` ones in
    a thread pool (PYTHON_THREADPOOL_THREAD_COUNT, default min(32, cpus + 4)). A
    parameter named `context` gets an azure.functions.Context; its trace_context holds a
    W3C traceparent per invocation, like the real host's (the id of the host's invocation
    span, in the HTTP caller's trace when the request carried a `traceparent` header, else a
    new trace). Queue output bindings (`func.Out` or `$return`) are written after a
    successful invocation.
  * functionTimeout (host.json) fails an invocation that runs too long; an async one is
    cancelled, a sync one cannot be stopped and keeps its thread until it returns.
  * One log line per invocation (logger "devhost"): function, outcome, duration, the
    message id and dequeue count for queue triggers, and the invocation's traceparent.

Not supported: other triggers and bindings (start-up fails, naming them; use
`--functions` to run the rest), identity-based storage connections, function keys,
the singleton lock of timers across several hosts, blob-based timer schedule monitoring.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import contextvars
import dataclasses
import datetime as dt
import functools
import importlib
import inspect
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import azure.functions as func
from azure.functions import _abc as azf_abc
from azure.functions.decorators.core import BindingDirection
from azure.functions.queue import QueueMessage as _TriggerQueueMessage  # has dequeue_count etc.
from azure.functions.timer import TimerRequest
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

log = logging.getLogger("devhost")

__all__ = [
    "DevHost",
    "DevHostError",
    "Invocation",
    "QueueOptions",
    "load_app",
    "load_local_settings",
    "load_host_json",
    "parse_timespan",
    "main",
]

LEASE_SECONDS = 600.0  # the real host receives messages for 10 minutes and renews
MIN_POLL_SECONDS = 0.1
SUCCEEDED, FAILED, CANCELLED = "Succeeded", "Failed", "Cancelled"


# The user agent prefix of the local host's own queue calls.
HOST_USER_AGENT = "hve-relay-devhost"


class DevHostError(RuntimeError):
    """The app cannot be hosted: bad setting, unsupported binding, bad host.json."""


# --------------------------------------------------------------------------------------
# Configuration: host.json, app settings, local.settings.json
# --------------------------------------------------------------------------------------

_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def parse_timespan(value: Any, what: str = "value") -> float:
    """Seconds in a .NET TimeSpan string "[d.]hh:mm:ss[.fff]" (host.json format)."""
    if isinstance(value, str):
        match = _TIMESPAN.match(value.strip())
        if match:
            days, hours, minutes, seconds = match.groups()
            return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    raise DevHostError(f'{what} must be a TimeSpan string like "00:00:30", got {value!r}')


@dataclasses.dataclass(frozen=True)
class QueueOptions:
    """host.json `extensions.queues`, with the real host's defaults."""

    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @classmethod
    def from_host_json(cls, host_json: Mapping[str, Any]) -> "QueueOptions":
        q = dict((host_json.get("extensions") or {}).get("queues") or {})
        batch = int(q.get("batchSize", 16))
        if not 1 <= batch <= 32:
            raise DevHostError(f"extensions.queues.batchSize must be 1..32, got {batch}")
        threshold = int(q.get("newBatchThreshold", batch // 2))
        if threshold < 0:
            raise DevHostError("extensions.queues.newBatchThreshold must be >= 0")
        encoding = str(q.get("messageEncoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise DevHostError(f'extensions.queues.messageEncoding must be "base64" or "none", got {encoding!r}')
        max_dequeue = int(q.get("maxDequeueCount", 5))
        if max_dequeue < 1:
            raise DevHostError("extensions.queues.maxDequeueCount must be >= 1")
        return cls(
            batch_size=batch,
            new_batch_threshold=threshold,
            max_polling_interval=max(
                MIN_POLL_SECONDS,
                parse_timespan(q["maxPollingInterval"], "maxPollingInterval") if "maxPollingInterval" in q else 60.0,
            ),
            visibility_timeout=parse_timespan(q["visibilityTimeout"], "visibilityTimeout") if "visibilityTimeout" in q else 0.0,
            max_dequeue_count=max_dequeue,
            message_encoding=encoding,
        )


def load_host_json(source: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if source is None:
        return {"version": "2.0"}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DevHostError(f"host.json not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DevHostError(f"{path} is not valid JSON: {exc}") from None


def load_local_settings(path: str | os.PathLike, *, required: bool = False) -> dict[str, Any]:
    """Read local.settings.json and copy `Values` into os.environ (existing variables win).

    Returns the parsed file ({} if it is missing and not required).
    """
    path = Path(path)
    if not path.is_file():
        if required:
            raise DevHostError(f"settings file not found: {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DevHostError(f"{path} is not valid JSON: {exc}") from None
    if data.get("IsEncrypted"):
        raise DevHostError(f"{path} is encrypted (IsEncrypted: true); devhost reads plain values only")
    for key, value in (data.get("Values") or {}).items():
        if key not in os.environ and value is not None:
            os.environ[key] = str(value)
    return data


_SETTING_REF = re.compile(r"%([^%]+)%")


def resolve_setting_refs(value: str, settings: Mapping[str, str], what: str) -> str:
    """Replace %NAME% with the app setting NAME, as the host does for binding properties."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        resolved = settings.get(name)
        if resolved is None or resolved == "":
            raise DevHostError(f"{what}: app setting '{name}' (referenced as %{name}%) is not set")
        return resolved

    return _SETTING_REF.sub(sub, value)


def storage_connection_string(connection: str | None, settings: Mapping[str, str], what: str) -> str:
    name = connection or "AzureWebJobsStorage"
    for key in (name, f"AzureWebJobs{name}"):
        if settings.get(key):
            return settings[key]
    if any(k.startswith(f"{name}__") for k in settings):
        raise DevHostError(
            f"{what}: connection '{name}' is identity-based ({name}__*); devhost needs a connection string "
            f"in the setting '{name}' (e.g. Azurite's)"
        )
    raise DevHostError(f"{what}: connection setting '{name}' is not set (expected a storage connection string)")


def load_app(spec: str | ModuleType | func.FunctionApp, app_dir: str | os.PathLike | None = None) -> tuple[func.FunctionApp, Path | None]:
    """The FunctionApp for "module[:attr]", "path/to/file.py[:attr]", a module, or an app.

    Returns (app, app_root): app_root is the module's folder (where host.json lives), or
    None when an app object was given.
    """
    if isinstance(spec, func.FunctionApp):
        return spec, None
    attr = "app"
    if isinstance(spec, ModuleType):
        module = spec
    else:
        target, _, attr_part = str(spec).partition(":")
        attr = attr_part or "app"
        base = Path(app_dir) if app_dir is not None else Path.cwd()
        if target.endswith(".py"):
            path = (base / target).resolve()
            if not path.is_file():
                raise DevHostError(f"app file not found: {path}")
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            module = importlib.import_module(path.stem)
        else:
            if str(base.resolve()) not in sys.path:
                sys.path.insert(0, str(base.resolve()))
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                if exc.name and target.startswith(exc.name):
                    raise DevHostError(f"cannot import app module '{target}' from {base}: {exc}") from None
                raise
    app = getattr(module, attr, None)
    if not isinstance(app, func.FunctionRegister):
        raise DevHostError(f"module '{module.__name__}' has no azure.functions.FunctionApp named '{attr}'")
    root = Path(module.__file__).resolve().parent if getattr(module, "__file__", None) else None
    return app, root


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------
# Functions and their bindings
# --------------------------------------------------------------------------------------

QUEUE_TRIGGER, TIMER_TRIGGER, HTTP_TRIGGER = "queueTrigger", "timerTrigger", "httpTrigger"


@dataclasses.dataclass
class _Output:
    name: str  # parameter name, or "$return"
    queue_name: str
    connection_string: str


@dataclasses.dataclass
class _FunctionSpec:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    trigger_type: str
    trigger_arg: str
    trigger_annotation: Any
    wants_context: bool
    outputs: list[_Output]
    queue_name: str | None = None
    connection_string: str | None = None
    schedule: str | None = None
    run_on_startup: bool = False
    route: str | None = None
    methods: list[str] | None = None
    auth_level: str | None = None

    def describe(self, http_base: str | None) -> str:
        if self.trigger_type == QUEUE_TRIGGER:
            return f"queueTrigger (queue {self.queue_name})"
        if self.trigger_type == TIMER_TRIGGER:
            startup = ", run on startup" if self.run_on_startup else ""
            return f"timerTrigger ({self.schedule}{startup})"
        methods = ",".join(self.methods or ["*"])
        url = f"{http_base}/{self.route}" if http_base else f"(no HTTP server) /{self.route}"
        return f"[{methods}] {url}"


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _build_spec(function: func.Function, settings: Mapping[str, str]) -> _FunctionSpec:
    name = function.get_function_name()
    trigger = function.get_trigger()
    fn = function.get_user_function()
    what = f"function '{name}'"
    ttype = trigger.type
    if ttype not in (QUEUE_TRIGGER, TIMER_TRIGGER, HTTP_TRIGGER):
        raise DevHostError(f"{what}: trigger type '{ttype}' is not supported by devhost (queue, timer, http are)")

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to no annotations
        hints = {}
    params = inspect.signature(fn).parameters
    outputs: list[_Output] = []
    bound = {trigger.name}
    for binding in function.get_bindings():
        if binding is trigger:
            continue
        btype = binding.type
        if btype == "http" and ttype == HTTP_TRIGGER:
            continue  # the HttpOutput ($return) of @app.route
        if btype == "queue" and _enum_value(binding.direction) == BindingDirection.OUT.value:
            outputs.append(
                _Output(
                    name=binding.name,
                    queue_name=resolve_setting_refs(binding.queue_name, settings, f"{what} output '{binding.name}'").lower(),
                    connection_string=storage_connection_string(binding.connection, settings, what),
                )
            )
            bound.add(binding.name)
            continue
        raise DevHostError(f"{what}: binding '{binding.name}' of type '{btype}' is not supported by devhost")

    if trigger.name not in params:
        raise DevHostError(f"{what}: the function has no parameter '{trigger.name}' for its trigger")
    for pname, param in params.items():
        if pname in bound or pname == "context":
            continue
        if param.default is inspect.Parameter.empty and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            raise DevHostError(f"{what}: parameter '{pname}' is not bound to any binding")

    spec = _FunctionSpec(
        name=name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        trigger_type=ttype,
        trigger_arg=trigger.name,
        trigger_annotation=hints.get(trigger.name),
        wants_context="context" in params,
        outputs=outputs,
    )
    if ttype == QUEUE_TRIGGER:
        spec.queue_name = resolve_setting_refs(trigger.queue_name, settings, f"{what} queue_name").lower()
        spec.connection_string = storage_connection_string(trigger.connection, settings, what)
    elif ttype == TIMER_TRIGGER:
        spec.schedule = resolve_setting_refs(trigger.schedule, settings, f"{what} schedule").strip()
        _Schedule(spec.schedule, dt.timezone.utc)  # validate now
        spec.run_on_startup = bool(trigger.run_on_startup)
    else:
        spec.route = (trigger.route or name).strip("/")
        spec.methods = [str(_enum_value(m)).upper() for m in trigger.methods] if trigger.methods else None
        spec.auth_level = str(_enum_value(trigger.auth_level)) if trigger.auth_level is not None else None
    return spec


def _app_functions(app: func.FunctionRegister) -> list[func.Function]:
    # get_functions() records names it has seen and refuses a second call on the same app
    # ("does not have a unique function name"); tests build several hosts on one app.
    if hasattr(app, "functions_bindings"):
        app.functions_bindings = None
    root = logging.getLogger()
    quiet = _DropMessage("Auth level is not applied to non http function app")
    root.addFilter(quiet)
    try:
        return app.get_functions()
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# --------------------------------------------------------------------------------------
# Invocation plumbing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Invocation:
    """One function invocation, as recorded in DevHost.invocations."""

    function: str
    trigger: str
    invocation_id: str
    outcome: str  # "Succeeded", "Failed" or "Cancelled"
    started_at: dt.datetime
    duration_ms: float
    message_id: str | None = None
    dequeue_count: int | None = None
    error: BaseException | None = None
    trace_parent: str = ""  # the W3C traceparent handed to the function (context.trace_context)

    @property
    def succeeded(self) -> bool:
        return self.outcome == SUCCEEDED


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def invocation_traceparent(incoming: str | None = None) -> str:
    """The traceparent of one invocation, as the real host builds it: the id of its own invocation
    span, in the caller's trace when an HTTP request carried a valid W3C `traceparent` header, else
    in a new trace (sampled)."""
    match = _TRACEPARENT.match((incoming or "").strip().lower())
    if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
        trace_id, flags = match.group(1), match.group(3)
    else:
        trace_id, flags = uuid.uuid4().hex, "01"
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"


class _TraceContext(azf_abc.TraceContext):
    def __init__(self, trace_parent: str = "", trace_state: str = "", attributes: dict[str, str] | None = None) -> None:
        self._trace_parent = trace_parent
        self._trace_state = trace_state
        self._attributes = dict(attributes or {})

    @property
    def trace_parent(self) -> str:
        return self._trace_parent

    @property
    def trace_state(self) -> str:
        return self._trace_state

    @property
    def attributes(self) -> dict[str, str]:
        return self._attributes


class _RetryContext(azf_abc.RetryContext):
    retry_count = 0
    max_retry_count = 0
    exception = None


class _Context(func.Context):
    _thread_local = threading.local()

    def __init__(self, invocation_id: str, function_name: str, function_directory: str,
                 trace_context: _TraceContext | None = None) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._trace_context = trace_context or _TraceContext()

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> threading.local:
        return self._thread_local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> azf_abc.TraceContext:
        return self._trace_context

    @property
    def retry_context(self) -> azf_abc.RetryContext:
        return _RetryContext()


class _Out(func.Out):
    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


def _queue_bodies(value: Any) -> list[bytes]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray)):
        items: list[Any] = [value]
    elif isinstance(value, func.QueueMessage):
        items = [value]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise TypeError(f"queue output must be str, bytes, QueueMessage or a list of them, got {type(value).__name__}")
    bodies = []
    for item in items:
        if isinstance(item, func.QueueMessage):
            item = item.get_body()
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, (bytes, bytearray)):
            raise TypeError(f"queue output item must be str or bytes, got {type(item).__name__}")
        bodies.append(bytes(item))
    return bodies


class _Schedule:
    """Next occurrences of an NCRONTAB (6 fields, seconds first) or "hh:mm:ss" schedule."""

    def __init__(self, expression: str, tz: dt.tzinfo) -> None:
        self.expression = expression
        self.tz = tz
        self.interval: float | None = None
        if _TIMESPAN.match(expression):
            self.interval = parse_timespan(expression, "schedule")
            if self.interval <= 0:
                raise DevHostError(f"timer schedule interval must be positive: {expression!r}")
            return
        from croniter import croniter

        fields = expression.split()
        if len(fields) != 6 or not croniter.is_valid(expression, second_at_beginning=True):
            raise DevHostError(
                f"invalid timer schedule {expression!r}: expected a six-field NCRONTAB "
                '"{second} {minute} {hour} {day} {month} {day-of-week}" or "hh:mm:ss"'
            )

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        if self.interval is not None:
            return moment + dt.timedelta(seconds=self.interval)
        from croniter import croniter

        local = moment.astimezone(self.tz)
        nxt = croniter(self.expression, local, second_at_beginning=True).get_next(dt.datetime)
        return nxt.astimezone(dt.timezone.utc)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_shared_loop: asyncio.AbstractEventLoop | None = None
_shared_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread per process shared by all DevHost.start() calls, like the
    Python worker's single loop: app-level async clients cached across hosts stay usable."""
    global _shared_loop
    with _shared_loop_lock:
        if _shared_loop is None or _shared_loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="devhost-loop", daemon=True).start()
            _shared_loop = loop
        return _shared_loop


# --------------------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------------------


class DevHost:
    """Runs an app's queue, timer and HTTP functions. See the module docstring."""

    def __init__(
        self,
        app: func.FunctionApp | ModuleType | str,
        settings: Mapping[str, str] | None = None,
        *,
        host_json: Mapping[str, Any] | str | os.PathLike | None = None,
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        functions: Iterable[str] | None = None,
        export_settings: bool = True,
        shutdown_timeout: float = 30.0,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.app, app_root = load_app(app)
        if host_json is None and app_root is not None and (app_root / "host.json").is_file():
            host_json = app_root / "host.json"
        self.host_json = load_host_json(host_json)
        self.queue_options = QueueOptions.from_host_json(self.host_json)
        timeout = self.host_json.get("functionTimeout")
        self.function_timeout: float | None = (
            None if timeout in (None, "-1", -1) else parse_timespan(timeout, "functionTimeout")
        )
        self.route_prefix = str(((self.host_json.get("extensions") or {}).get("http") or {}).get("routePrefix", "api")).strip("/")
        self.app_root = app_root
        self._overrides = {k: str(v) for k, v in (settings or {}).items()}
        self.settings: dict[str, str] = {**os.environ, **self._overrides}
        self.export_settings = export_settings
        self.http_host = http_host
        self._requested_http_port = http_port
        self.http_port: int | None = None
        self.shutdown_timeout = shutdown_timeout
        if lease_seconds < 1:
            raise DevHostError("the lease must be at least 1 second")
        # How long a received message stays invisible (renewed halfway while the function runs); a
        # host that dies leaves it invisible this long. Tests shorten it; the real host uses 10 minutes.
        self.lease_seconds = float(lease_seconds)
        self.invocations: list[Invocation] = []

        wanted = set(functions) if functions is not None else None
        specs: list[_FunctionSpec] = []
        seen: set[str] = set()
        for function in _app_functions(self.app):
            name = function.get_function_name()
            seen.add(name)
            if wanted is not None and name not in wanted:
                continue
            if _truthy(self.settings.get(f"AzureWebJobs.{name}.Disabled")):
                log.info("Function '%s' is disabled (AzureWebJobs.%s.Disabled)", name, name)
                continue
            specs.append(_build_spec(function, self.settings))
        if wanted is not None and wanted - seen:
            raise DevHostError(f"no such function(s): {', '.join(sorted(wanted - seen))}; the app has {', '.join(sorted(seen))}")
        self.functions: dict[str, _FunctionSpec] = {s.name: s for s in specs}
        tz_name = self.settings.get("WEBSITE_TIME_ZONE")
        if tz_name:
            from zoneinfo import ZoneInfo

            self._tz: dt.tzinfo = ZoneInfo(tz_name)
        else:
            self._tz = dt.timezone.utc

        # runtime state (owned by the event loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: Any = None  # concurrent.futures.Future of serve() on the shared loop
        self._stop_event: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._listeners: list[_QueueListener] = []
        self._tasks: list[asyncio.Task] = []
        self._busy = 0
        self._pending_startup = 0
        self._clients: dict[tuple[str, str], Any] = {}
        self._http_runner: Any = None
        self._saved_env: dict[str, str | None] = {}
        self._ready = threading.Event()

    # -- public, thread-side API ---------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "DevHost":
        """Start the host on the shared background event loop; returns once it is listening."""
        if self._future is not None:
            raise RuntimeError("DevHost already started")
        self._export_env()
        self._ready.clear()
        self._future = asyncio.run_coroutine_threadsafe(
            self.serve(ready=self._ready.set, install_signal_handlers=False), _background_loop()
        )
        self._future.add_done_callback(lambda _: self._ready.set())
        if not self._ready.wait(timeout):
            self.stop()
            raise DevHostError(f"devhost did not start within {timeout} s")
        if self._future.done():  # start-up failed
            future, self._future = self._future, None
            self._restore_env()
            future.result()
            raise DevHostError("devhost stopped during start-up")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: no new messages, in-flight invocations finish (up to shutdown_timeout)."""
        future = self._future
        if future is None:
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop_event.set)
        try:
            future.result(timeout if timeout is not None else self.shutdown_timeout + 15)
        except concurrent.futures.TimeoutError:
            raise DevHostError("devhost did not stop in time") from None
        finally:
            if future.done():
                self._future = None
                self._restore_env()

    def wait_until_idle(self, timeout: float = 30.0, poll: float = 0.1) -> None:
        """Block until every watched queue is empty and nothing is in flight."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self._call(self._is_idle()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"devhost not idle after {timeout} s: {self._call(self._describe_state())}")
            time.sleep(poll)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, poll: float = 0.05) -> None:
        """Block until predicate() is true (checked every `poll` seconds)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(poll)

    def run_until_idle(self, timeout: float = 60.0) -> list[Invocation]:
        """start(), wait_until_idle(timeout), stop(); returns the invocations."""
        self.start()
        try:
            self.wait_until_idle(timeout)
        finally:
            self.stop()
        return list(self.invocations)

    def __enter__(self) -> "DevHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event loop side -------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._future is None:
            raise DevHostError("devhost is not running")
        if self._future.done():
            self._future.result()  # re-raise a crash
            raise DevHostError("devhost has stopped")

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _export_env(self) -> None:
        if not self.export_settings:
            return
        for key, value in self._overrides.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    async def serve(
        self,
        *,
        once: bool = False,
        duration: float | None = None,
        ready: Callable[[], None] | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        """Run the host on the current event loop until stopped (or idle with once=True)."""
        # The real host is another process: its own work (polling queues, leases, deletes) is not
        # the app's telemetry. It runs here under an unsampled span, so an exporter the app
        # installs exports only what runs inside invocations (each gets a sampled traceparent).
        otel_context.attach(otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(otel_trace.SpanContext(
            trace_id=int(uuid.uuid4().hex, 16), span_id=int.from_bytes(os.urandom(8), "big") or 1,
            is_remote=True, trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.DEFAULT)))))
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._listeners, self._tasks, self._clients = [], [], {}
        self._busy = self._pending_startup = 0
        threads = int(self.settings.get("PYTHON_THREADPOOL_THREAD_COUNT") or min(32, (os.cpu_count() or 1) + 4))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="devhost-worker")

        def on_signal() -> None:
            if self._stop_event.is_set():
                log.warning("Second signal: cancelling in-flight invocations")
                for task in self._tasks + [t for l in self._listeners for t in l.inflight]:
                    task.cancel()
            else:
                log.info("Stopping: waiting for in-flight invocations (Ctrl-C again to cancel them)")
                self._stop_event.set()

        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, on_signal)
        try:
            await self._startup()
            if ready:
                ready()
            waiters = [asyncio.ensure_future(self._stop_event.wait())]
            if once:
                waiters.append(asyncio.ensure_future(self._wait_idle_forever()))
            if duration is not None:
                waiters.append(asyncio.ensure_future(asyncio.sleep(duration)))
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            self._stop_event.set()
        finally:
            await self._shutdown()
            if install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._loop.remove_signal_handler(sig)

    async def _wait_idle_forever(self) -> None:
        while True:
            try:
                if await self._is_idle():
                    return
            except Exception as exc:  # storage unreachable: keep trying, like the listeners
                log.warning("checking whether the queues are empty failed: %s", exc)
                await asyncio.sleep(1)
            await asyncio.sleep(0.1)

    async def _startup(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        for spec in self.functions.values():
            if spec.trigger_type == QUEUE_TRIGGER:
                queue = self._queue_client(spec.connection_string, spec.queue_name)
                poison = self._queue_client(spec.connection_string, f"{spec.queue_name}-poison")
                for client in (queue, poison):
                    try:
                        await client.create_queue()
                    except ResourceExistsError:
                        pass
                self._listeners.append(_QueueListener(self, spec, queue, poison))
            for output in spec.outputs:
                try:
                    await self._queue_client(output.connection_string, output.queue_name).create_queue()
                except ResourceExistsError:
                    pass

        if self._requested_http_port is not None:
            await self._start_http()

        for listener in self._listeners:
            self._tasks.append(asyncio.ensure_future(listener.run()))
        for spec in self.functions.values():
            if spec.trigger_type == TIMER_TRIGGER:
                if spec.run_on_startup:
                    self._pending_startup += 1
                self._tasks.append(asyncio.ensure_future(self._timer_loop(spec)))

        http_base = f"http://{self.http_host}:{self.http_port}/{self.route_prefix}".rstrip("/") if self.http_port else None
        lines = [f"    {s.name}: {s.describe(http_base)}" for s in self.functions.values()]
        log.info("Functions:\n%s", "\n".join(lines) if lines else "    (none)")
        q = self.queue_options
        if self._listeners:
            log.info(
                "Queues: batchSize=%d newBatchThreshold=%d maxPollingInterval=%gs visibilityTimeout=%gs "
                "maxDequeueCount=%d messageEncoding=%s",
                q.batch_size, q.new_batch_threshold, q.max_polling_interval, q.visibility_timeout,
                q.max_dequeue_count, q.message_encoding,
            )

    async def _shutdown(self) -> None:
        assert self._stop_event is not None
        self._stop_event.set()
        for listener in self._listeners:
            listener.wake()

        def running() -> set[asyncio.Task]:
            tasks = set(self._tasks) | {t for listener in self._listeners for t in listener.inflight}
            return {t for t in tasks if not t.done()}

        if running():
            _, still = await asyncio.wait(running(), timeout=self.shutdown_timeout)
            if still:
                log.warning("Cancelling invocations still running after %g s", self.shutdown_timeout)
                for task in running():
                    task.cancel()
        if running():  # cancelled invocations release their messages before the clients close
            await asyncio.wait(running(), timeout=10)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("devhost task failed", exc_info=task.exception())
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        counts = {o: sum(1 for i in self.invocations if i.outcome == o) for o in (SUCCEEDED, FAILED, CANCELLED)}
        log.info(
            "Stopped: %d invocation(s), %d succeeded, %d failed, %d cancelled",
            len(self.invocations), counts[SUCCEEDED], counts[FAILED], counts[CANCELLED],
        )

    def _queue_client(self, connection_string: str, queue_name: str) -> Any:
        from azure.storage.queue.aio import QueueClient

        key = (connection_string, queue_name)
        if key not in self._clients:
            # Tagged, so a storage log tells the host's own calls (polls, idle checks, deletes) apart
            # from the app's (bench.storage_requests).
            self._clients[key] = QueueClient.from_connection_string(connection_string, queue_name,
                                                                    user_agent=HOST_USER_AGENT)
        return self._clients[key]

    async def _is_idle(self) -> bool:
        if self._busy or self._pending_startup or any(l.busy for l in self._listeners):
            return False
        for listener in self._listeners:
            props = await listener.queue.get_queue_properties()
            if props.approximate_message_count:
                return False
        return not (self._busy or self._pending_startup or any(l.busy for l in self._listeners))

    async def _describe_state(self) -> str:
        parts = [f"{self._busy} invocation(s) running", f"{self._pending_startup} startup run(s) pending"]
        for listener in self._listeners:
            props = await listener.queue.get_queue_properties()
            parts.append(f"queue {listener.spec.queue_name}: {props.approximate_message_count} message(s), {len(listener.inflight)} in flight")
        return "; ".join(parts)

    # -- invoking ---------------------------------------------------------------------------

    async def _invoke(
        self,
        spec: _FunctionSpec,
        trigger_value: Any,
        *,
        message_id: str | None = None,
        dequeue_count: int | None = None,
    ) -> tuple[Invocation, Any]:
        """Call the user function once; returns (record, return value). Never raises
        for a function error (the record says Failed); re-raises cancellation."""
        invocation_id = str(uuid.uuid4())
        # Like the real host: each invocation is a span of the host's, in the HTTP caller's trace
        # when the request carried a traceparent, handed to the function as context.trace_context.
        incoming = trigger_value.headers.get("traceparent") if isinstance(trigger_value, func.HttpRequest) else None
        trace_state = (trigger_value.headers.get("tracestate") or "") if incoming else ""
        trace_parent = invocation_traceparent(incoming)
        kwargs: dict[str, Any] = {spec.trigger_arg: trigger_value}
        if spec.wants_context:
            trace_context = _TraceContext(trace_parent, trace_state, {"OperationName": spec.name})
            kwargs["context"] = _Context(invocation_id, spec.name, str(self.app_root or Path.cwd()), trace_context)
        outs = {o.name: _Out() for o in spec.outputs if o.name != "$return"}
        kwargs.update(outs)
        started_at = _utcnow()
        t0 = time.perf_counter()
        self._busy += 1
        result = None
        error: BaseException | None = None
        outcome = FAILED
        try:
            try:
                if spec.is_async:
                    call = spec.fn(**kwargs)
                else:
                    ctx = contextvars.copy_context()
                    call = asyncio.get_running_loop().run_in_executor(
                        self._pool, functools.partial(ctx.run, self._call_sync, spec.fn, kwargs, invocation_id)
                    )
                result = await asyncio.wait_for(call, self.function_timeout) if self.function_timeout else await call
                await self._write_outputs(spec, outs, result)
                outcome = SUCCEEDED
            except asyncio.TimeoutError as exc:
                error = TimeoutError(f"Timeout value of {self.function_timeout:g} s exceeded by function '{spec.name}'")
                error.__cause__ = exc
            except asyncio.CancelledError:
                outcome = CANCELLED
                raise
            except Exception as exc:  # the function failed
                error = exc
        finally:
            self._busy -= 1
            duration = (time.perf_counter() - t0) * 1000
            record = Invocation(
                function=spec.name,
                trigger=spec.trigger_type,
                invocation_id=invocation_id,
                outcome=outcome,
                started_at=started_at,
                duration_ms=duration,
                message_id=message_id,
                dequeue_count=dequeue_count,
                error=error,
                trace_parent=trace_parent,
            )
            self.invocations.append(record)
            self._log_invocation(record)
        return record, result

    @staticmethod
    def _call_sync(fn: Callable[..., Any], kwargs: dict[str, Any], invocation_id: str) -> Any:
        _Context._thread_local.invocation_id = invocation_id
        return fn(**kwargs)

    def _log_invocation(self, record: Invocation) -> None:
        extra = ""
        if record.message_id is not None:
            extra = f" message_id={record.message_id} dequeue_count={record.dequeue_count}"
        line = (f"{record.function}: {record.outcome} in {record.duration_ms:.0f} ms{extra} "
                f"invocation_id={record.invocation_id} traceparent={record.trace_parent}")
        if record.error is not None:
            # A binding problem (DevHostError) needs no traceback; a function error does.
            trace = None if isinstance(record.error, DevHostError) else record.error
            log.error("%s error=%s: %s", line, type(record.error).__name__, record.error, exc_info=trace)
        elif record.outcome == CANCELLED:
            log.warning(line)
        else:
            log.info(line)

    async def _write_outputs(self, spec: _FunctionSpec, outs: dict[str, _Out], result: Any) -> None:
        for output in spec.outputs:
            value = result if output.name == "$return" else outs[output.name].get()
            bodies = _queue_bodies(value)
            if not bodies:
                continue
            client = self._queue_client(output.connection_string, output.queue_name)
            for body in bodies:
                await client.send_message(self._encode(body))
            for listener in self._listeners:
                if listener.spec.queue_name == output.queue_name and listener.spec.connection_string == output.connection_string:
                    listener.wake()

    def _encode(self, body: bytes) -> str:
        if self.queue_options.message_encoding == "base64":
            return base64.b64encode(body).decode("ascii")
        return body.decode("utf-8")

    def _decode(self, content: str | None) -> bytes:
        content = content or ""
        if self.queue_options.message_encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise DevHostError(f"message is not valid base64 (messageEncoding is base64): {exc}") from None
        return content.encode("utf-8")

    def _queue_argument(self, spec: _FunctionSpec, message: Any, body: bytes) -> Any:
        if spec.trigger_annotation is bytes:
            return body
        if spec.trigger_annotation is str:
            return body.decode("utf-8")
        return _TriggerQueueMessage(
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )

    # -- timers -------------------------------------------------------------------------------

    async def _timer_loop(self, spec: _FunctionSpec) -> None:
        assert self._stop_event is not None and spec.schedule is not None
        schedule = _Schedule(spec.schedule, self._tz)
        last: dt.datetime | None = None
        if spec.run_on_startup:
            try:
                await self._invoke_timer(spec, schedule, last=None, past_due=False)
                last = _utcnow()
            finally:
                self._pending_startup -= 1
        moment = _utcnow()
        while not self._stop_event.is_set():
            due = schedule.next_after(moment)
            while not self._stop_event.is_set():
                remaining = (due - _utcnow()).total_seconds()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._stop_event.wait(), timeout=min(remaining, 60))
                except asyncio.TimeoutError:
                    pass
            if self._stop_event.is_set():
                return
            late = (_utcnow() - due).total_seconds()
            await self._invoke_timer(spec, schedule, last=last, past_due=late > 1.0)
            last = due
            moment = max(due, _utcnow())

    async def _invoke_timer(self, spec: _FunctionSpec, schedule: _Schedule, last: dt.datetime | None, past_due: bool) -> Invocation:
        now = _utcnow()
        request = TimerRequest(
            past_due=past_due,
            schedule_status={
                "Last": (last or now).isoformat(),
                "Next": schedule.next_after(now).isoformat(),
                "LastUpdated": now.isoformat(),
            },
            schedule={"AdjustForDST": True},
        )
        record, _ = await self._invoke(spec, request)
        return record

    # -- HTTP -----------------------------------------------------------------------------------

    async def _start_http(self) -> None:
        from aiohttp import web

        # Like the real host: bodies over FUNCTIONS_REQUEST_BODY_SIZE_LIMIT (default 100 MB) are answered
        # 413 while being read, and never reach the function.
        limit = self.settings.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT") or ""
        app = web.Application(client_max_size=int(limit) if limit.strip().isdigit() else 100 * 1024 * 1024)
        prefix = f"/{self.route_prefix}" if self.route_prefix else ""
        for spec in self.functions.values():
            if spec.trigger_type != HTTP_TRIGGER:
                continue
            handler = functools.partial(self._handle_http, spec)
            for path in _aiohttp_paths(f"{prefix}/{spec.route}"):
                for method in spec.methods or ["*"]:
                    app.router.add_route(method, path, handler)
        app.router.add_post("/admin/functions/{name}", self._handle_admin)
        app.router.add_get("/", self._handle_root)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.http_host, self._requested_http_port)
        await site.start()
        self._http_runner = runner
        self.http_port = runner.addresses[0][1]
        log.info("HTTP on http://%s:%d (function keys are not checked)", self.http_host, self.http_port)

    async def _handle_root(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="devhost: Azure Functions local stand-in is running\n")

    async def _handle_http(self, spec: _FunctionSpec, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        req = func.HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=headers,
            params={k: request.query.getone(k) for k in request.query.keys()},
            route_params={k: v for k, v in request.match_info.items() if v is not None},
            body=body,
        )
        record, result = await self._invoke(spec, req)
        if not record.succeeded:
            return web.Response(status=500, text="Internal Server Error")
        if isinstance(result, func.HttpResponse):
            response = web.Response(status=result.status_code, body=result.get_body())
            for key, value in result.headers.items():
                response.headers.add(key, value)
            if "Content-Type" not in response.headers:
                response.headers["Content-Type"] = f"{result.mimetype}; charset={result.charset}" if result.mimetype.startswith("text/") or result.mimetype.endswith("json") else result.mimetype
            return response
        if result is None:
            return web.Response(status=204)
        if isinstance(result, (bytes, bytearray)):
            return web.Response(body=bytes(result), content_type="application/octet-stream")
        return web.Response(text=str(result))

    async def _handle_admin(self, request: Any) -> Any:
        from aiohttp import web

        name = request.match_info["name"]
        spec = next((s for s in self.functions.values() if s.name.lower() == name.lower()), None)
        if spec is None or spec.trigger_type == HTTP_TRIGGER:
            return web.Response(status=404, text=f"no non-HTTP function named {name!r}\n")
        try:
            payload = await request.json() if await request.read() else {}
        except ValueError:
            return web.Response(status=400, text="body must be JSON like {\"input\": \"...\"}\n")
        raw = (payload or {}).get("input") or ""
        if spec.trigger_type == TIMER_TRIGGER:
            schedule = _Schedule(spec.schedule, self._tz)
            task = asyncio.ensure_future(self._invoke_timer(spec, schedule, last=None, past_due=False))
        else:
            body = raw.encode("utf-8") if isinstance(raw, str) else json.dumps(raw).encode("utf-8")
            now = _utcnow()
            message = _TriggerQueueMessage(id=str(uuid.uuid4()), body=body, dequeue_count=1, insertion_time=now,
                                        expiration_time=now + dt.timedelta(days=7), time_next_visible=now, pop_receipt="")
            value = body if spec.trigger_annotation is bytes else body.decode("utf-8") if spec.trigger_annotation is str else message
            task = asyncio.ensure_future(self._invoke(spec, value, message_id=message.id, dequeue_count=1))
        self._tasks.append(task)
        return web.Response(status=202)


_ROUTE_PARAM = re.compile(r"\{(\*?)(\w+)(?::[^}?]*)?(\?)?\}")


def _aiohttp_paths(route: str) -> list[str]:
    """aiohttp paths for a Functions route template (constraints are not enforced)."""
    optional_last = False

    def sub(match: re.Match[str]) -> str:
        nonlocal optional_last
        star, name, optional = match.groups()
        if optional:
            optional_last = True
        return f"{{{name}:.*}}" if star else f"{{{name}}}"

    path = _ROUTE_PARAM.sub(sub, route)
    if optional_last and "/" in path:
        return [path, path.rsplit("/", 1)[0] or "/"]
    return [path]


class _QueueListener:
    """Polls one queue for one function with the host.json queue semantics."""

    def __init__(self, host: DevHost, spec: _FunctionSpec, queue: Any, poison: Any) -> None:
        self.host = host
        self.spec = spec
        self.queue = queue
        self.poison = poison
        self.options = host.queue_options
        self.inflight: set[asyncio.Task] = set()
        self.fetching = False
        self._wake = asyncio.Event()

    @property
    def busy(self) -> bool:
        return self.fetching or bool(self.inflight)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        stop = self.host._stop_event
        assert stop is not None
        opts = self.options
        delay = MIN_POLL_SECONDS
        while not stop.is_set():
            # A new batch only once no more than newBatchThreshold messages are in flight.
            while len(self.inflight) > opts.new_batch_threshold and not stop.is_set():
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait(self.inflight | {woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                self._wake.clear()
            if stop.is_set():
                break
            self.fetching = True
            try:
                messages = await self._receive(opts.batch_size)
            except Exception as exc:
                self.fetching = False
                log.warning("%s: receiving from queue '%s' failed: %s", self.spec.name, self.spec.queue_name, exc)
                messages = None
            if messages:
                for message in messages:
                    task = asyncio.ensure_future(self._process_guarded(message))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                self.fetching = False
                delay = MIN_POLL_SECONDS
                continue
            self.fetching = False
            # Empty queue (or an error): randomized exponential back-off up to maxPollingInterval.
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                delay = MIN_POLL_SECONDS
            except asyncio.TimeoutError:
                delay = min(opts.max_polling_interval, delay * 2 * random.uniform(0.8, 1.2))
                delay = max(delay, MIN_POLL_SECONDS)
        # Graceful stop: let in-flight messages finish.
        if self.inflight:
            await asyncio.wait(set(self.inflight))

    async def _receive(self, count: int) -> list[Any]:
        pages = self.queue.receive_messages(messages_per_page=count, visibility_timeout=int(self.host.lease_seconds)).by_page()
        async for page in pages:
            return [m async for m in page]
        return []

    async def _process_guarded(self, message: Any) -> None:
        try:
            await self._process(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here, not in the function: log it; the lease expires and the message returns.
            log.exception("%s: handling message %s failed", self.spec.name, message.id)

    async def _process(self, message: Any) -> None:
        opts = self.options
        state = {"pop_receipt": message.pop_receipt}
        if message.dequeue_count > opts.max_dequeue_count:
            # Already failed (or was abandoned) too often: straight to the poison queue.
            await self._to_poison(message, state)
            return
        renew = asyncio.ensure_future(self._renew(message, state))
        record: Invocation | None = None
        try:
            try:
                body = self.host._decode(message.content)
            except DevHostError as exc:
                record = self._binding_failure(message, exc)
            else:
                record, _ = await self.host._invoke(
                    self.spec,
                    self.host._queue_argument(self.spec, message, body),
                    message_id=message.id,
                    dequeue_count=message.dequeue_count,
                )
        except asyncio.CancelledError:
            renew.cancel()
            await self._safe(self.queue.update_message(message.id, state["pop_receipt"], visibility_timeout=0), "releasing", message)
            raise
        finally:
            renew.cancel()
        if record.succeeded:
            await self._safe(self.queue.delete_message(message.id, state["pop_receipt"]), "deleting", message)
        elif message.dequeue_count >= opts.max_dequeue_count:
            await self._to_poison(message, state)
        else:
            await self._safe(
                self.queue.update_message(message.id, state["pop_receipt"], visibility_timeout=int(round(opts.visibility_timeout))),
                "releasing",
                message,
            )

    def _binding_failure(self, message: Any, exc: Exception) -> Invocation:
        record = Invocation(
            function=self.spec.name,
            trigger=self.spec.trigger_type,
            invocation_id=str(uuid.uuid4()),
            outcome=FAILED,
            started_at=_utcnow(),
            duration_ms=0.0,
            message_id=message.id,
            dequeue_count=message.dequeue_count,
            error=exc,
        )
        self.host.invocations.append(record)
        self.host._log_invocation(record)
        return record

    async def _to_poison(self, message: Any, state: dict[str, str]) -> None:
        log.warning(
            "%s: message %s has reached maxDequeueCount of %d; moving it to queue '%s'",
            self.spec.name, message.id, self.options.max_dequeue_count, f"{self.spec.queue_name}-poison",
        )
        try:
            await self.poison.send_message(message.content or "")
        except Exception as exc:
            log.error("%s: could not move message %s to the poison queue: %s", self.spec.name, message.id, exc)
            return
        await self._safe(self.queue.delete_message(message.id, state["pop_receipt"]), "deleting", message)

    async def _renew(self, message: Any, state: dict[str, str]) -> None:
        while True:
            await asyncio.sleep(self.host.lease_seconds / 2)
            try:
                updated = await self.queue.update_message(message.id, state["pop_receipt"], visibility_timeout=int(self.host.lease_seconds))
                state["pop_receipt"] = updated.pop_receipt
            except Exception as exc:
                log.warning("%s: renewing the lease of message %s failed: %s", self.spec.name, message.id, exc)

    async def _safe(self, coro: Any, doing: str, message: Any) -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("%s: %s message %s failed: %s", self.spec.name, doing, message.id, exc)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.devhost",
        description="Local stand-in for the Azure Functions host (queue, timer and HTTP triggers on Azurite).",
    )
    parser.add_argument("--app", default="function_app", help='module[:attr] or file.py[:attr] (default: "function_app", attr "app")')
    parser.add_argument("--settings", default=None, help="local.settings.json to load (default: ./local.settings.json if present)")
    parser.add_argument("--host-json", default=None, help="host.json (default: next to the app module, else built-in defaults)")
    parser.add_argument("--once", action="store_true", help="exit when the queues are empty and nothing is in flight")
    parser.add_argument("--for", dest="duration", type=float, default=None, metavar="SECONDS", help="stop after this many seconds")
    parser.add_argument("--functions", default=None, help="comma-separated function names to run (default: all)")
    parser.add_argument("--http-port", "--port", type=int, default=None, help="HTTP port (default: Host.LocalHttpPort or 7071; 0 = any free port)")
    parser.add_argument("--no-http", action="store_true", help="do not serve HTTP")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    parser.add_argument("--lease-seconds", type=float, default=LEASE_SECONDS,
                        help=f"how long a received queue message stays invisible, renewed halfway while it runs "
                             f"(default {LEASE_SECONDS:.0f}, like the real host; tests shorten it to replay a crash quickly)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("azure", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))

    try:
        local = load_local_settings(args.settings or "local.settings.json", required=args.settings is not None)
        http_port: int | None = None
        if not args.no_http:
            http_port = args.http_port if args.http_port is not None else int((local.get("Host") or {}).get("LocalHttpPort") or 7071)
        functions = [f.strip() for f in args.functions.split(",") if f.strip()] if args.functions else None
        host = DevHost(args.app, host_json=args.host_json, http_port=http_port, functions=functions, export_settings=False,
                       lease_seconds=args.lease_seconds)
        asyncio.run(host.serve(once=args.once, duration=args.duration))
        # Like the real worker, the host ends the process without closing what the app keeps open
        # for its lifetime (SMTP sessions, storage clients); their garbage-collection complaints
        # at exit are noise, not errors.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    except DevHostError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("devhost failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
