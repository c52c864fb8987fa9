"""One typed settings object, read from app settings (environment variables).

`SETTINGS` is the single list of every app setting the code reads. The Bicep
template and its tests check themselves against it, and the table in docs/settings.md is
generated from the same descriptions, so a setting cannot exist in one place only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta


@dataclass(frozen=True)
class SettingSpec:
    name: str
    default: str
    description: str
    # "app": set by the Bicep template in Azure; "local": only for a laptop or tests;
    # "platform": set by the Functions platform itself, not by our template.
    scope: str = "app"


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "AzureWebJobsStorage",
        "",
        "Storage for queues, tables and blobs: a connection string, or the identity-based `AzureWebJobsStorage__*` form in Azure.",
        "local",
    ),
    SettingSpec(
        "AzureWebJobsStorage__accountName", "", "Storage account name for identity-based access (Azure).", "app"
    ),
    SettingSpec(
        "AzureWebJobsStorage__credential", "", "`managedidentity` for identity-based storage access (Azure).", "app"
    ),
    SettingSpec(
        "AzureWebJobsStorage__clientId",
        "",
        "Client id of the user-assigned managed identity used for storage (Azure).",
        "app",
    ),
    SettingSpec(
        "AZURE_CLIENT_ID",
        "",
        "Client id of the user-assigned managed identity used for Key Vault, Graph and XOAUTH2 tokens.",
        "app",
    ),
    SettingSpec(
        "MAIL_QUEUE", "outbound-mail", "Queue that carries mail requests; its poison queue is `<name>-poison`."
    ),
    SettingSpec(
        "MAIL_QUEUE_PRIORITY",
        "outbound-mail-priority",
        'The priority lane: a second queue with its own trigger (`send_mail_priority`), the same send stage, governor and accounts; deferred copies go back onto it. `POST /api/send` puts `"priority": "high"` requests here; queue producers choose the lane by the queue they write to. Its poison queue is `<name>-poison`; it must differ from `MAIL_QUEUE`.',
    ),
    SettingSpec("HVE_SMTP_HOST", "smtp.hve.mx.microsoft", "HVE SMTP endpoint."),
    SettingSpec("HVE_SMTP_PORT", "587", "HVE SMTP port (STARTTLS)."),
    SettingSpec(
        "HVE_SMTP_CA_FILE",
        "",
        "Extra CA bundle (PEM) trusted for the SMTP endpoint, for a local emulator. Public CAs stay trusted.",
        "local",
    ),
    SettingSpec("HVE_SMTP_TIMEOUT_SECONDS", "30", "Timeout of one SMTP command."),
    SettingSpec("HVE_ACCOUNTS", "", "Comma-separated HVE account addresses the relay may send as."),
    SettingSpec("HVE_AUTH", "basic", "`basic` (password from Key Vault) or `oauth` (XOAUTH2 with an app-only token)."),
    SettingSpec(
        "KEY_VAULT_URL",
        "",
        "Key Vault holding the HVE passwords (basic auth). Secret name: `hve-` + the account address lower-cased with every character other than a-z and 0-9 replaced by `-` (at most 100 characters) + `-` + the first 10 hex digits of the SHA-256 of the lower-cased address, e.g. `hve-news-contoso-com-<10 hex>` (`python -m shared.hve.credentials ADDRESS` prints it).",
    ),
    SettingSpec(
        "HVE_PASSWORDS", "", "Local only: JSON object account -> password, used when KEY_VAULT_URL is empty.", "local"
    ),
    SettingSpec("HVE_SECRET_CACHE_SECONDS", "300", "How long a password read from Key Vault is cached."),
    SettingSpec("HVE_OAUTH_SCOPE", "https://outlook.office365.com/.default", "Token scope for XOAUTH2."),
    SettingSpec(
        "HVE_INTERNAL_DOMAINS",
        "",
        "Comma-separated accepted domains of the tenant; any other recipient domain is external.",
    ),
    SettingSpec("HVE_SENDER_NAME", "", "Display name on the From header (the address is always the HVE account)."),
    SettingSpec(
        "MAIL_AUTO_SUBMITTED",
        "true",
        "`true`: every message carries `Auto-Submitted: auto-generated` (RFC 3834), so well-behaved auto-responders do not answer it; `false`: left out.",
    ),
    SettingSpec(
        "MAIL_SUPPRESS_AUTO_RESPONSES",
        "true",
        "`true`: every message carries `X-Auto-Response-Suppress: All` (Exchange: no out-of-office, auto-reply, receipt or NDR back to the HVE account), replacing a producer's own; `false`: left out (a producer's own passes).",
    ),
    SettingSpec(
        "HVE_LIMITS_PROFILE",
        "ga-2026",
        "`ga-2026` (external recipients refused) or `preview-2024` (external allowed, rate limited).",
    ),
    SettingSpec(
        "HVE_LIMITS", "", 'JSON object overriding single limits of the profile, e.g. {"recipients_per_message": 20}.'
    ),
    SettingSpec(
        "HVE_DAILY_RECIPIENT_BUDGET",
        "",
        "Cost guard: at most this many recipients per daily window across all accounts (empty: no guard).",
    ),
    SettingSpec(
        "HVE_DAILY_RESET_UTC", "00:00", "Time of day (UTC, HH:MM) at which the daily windows (quotas, budget) start."
    ),
    SettingSpec(
        "HVE_PACING_MARGIN_SECONDS",
        "2",
        "Safety margin added to each rolling-minute window: HVE counts a message when it arrives, not when it was granted.",
    ),
    SettingSpec(
        "HVE_BOOKING_HORIZON_SECONDS",
        "3600",
        "How far ahead the governor books send slots for a backlog; a request whose slot is further away waits unbooked and asks again later.",
    ),
    SettingSpec(
        "HVE_BOOKINGS_PER_SECOND",
        "8",
        "At most this many booked slots (tenant-wide) fall due in one second (never fewer than the accounts' combined rate needs), so booked requests come back a few at a time rather than as one crowd the host works through late; 0 turns spreading off.",
    ),
    SettingSpec(
        "HVE_PACER_SECONDS",
        "2",
        "While send slots are booked ahead, a tiny pacer message comes back on the queue this often, so the Functions host keeps polling often instead of backing off to maxPollingInterval (a minute on Azure) and picking booked requests up late; 0 turns it off.",
    ),
    SettingSpec(
        "HVE_SLOT_WAIT_SECONDS",
        "3",
        "Booked requests are put back on the queue to wake as much before their slot as this worker sees them come back late (at most this long), and one that is then a little early waits in the process for its slot, at most this long; 0 turns both off (a booked request then wakes at its slot and is handled a little after it).",
    ),
    SettingSpec(
        "HVE_BACKLOG_SAMPLE_SECONDS",
        "1",
        "Each worker reads the queue's message count this often while it handles messages, to estimate how long the visible backlog takes to drain (its fall between readings: all instances together); no booking falls due before that (a booked message would come back late behind the backlog and its slot pass unused), and bookings leave each account's window openings before it to the backlog's own messages; 0 turns this off.",
    ),
    SettingSpec(
        "HVE_BACKLOG_MIN_MESSAGES",
        "64",
        "A visible backlog of at most this many messages is not treated as congestion (bookings may fall due at once).",
    ),
    SettingSpec(
        "MAX_RECIPIENTS_PER_REQUEST",
        "500",
        "Recipients one request may have; above the per-message limit a request is sent as several SMTP transactions.",
    ),
    SettingSpec("HVE_POOL_SIZE", "4", "Open SMTP sessions kept per HVE account in one worker process."),
    SettingSpec("HVE_POOL_IDLE_SECONDS", "60", "An idle SMTP session older than this is closed."),
    SettingSpec(
        "HVE_POOL_WAIT_SECONDS",
        "10",
        "Longest wait for a free SMTP session of an account; past it the request is deferred (its slot given back)."
        " Under per-minute limits, also the longest a request waits in the process for a session while every"
        " account with a slot free now has none (no slot is granted now without one); past it, it is decided as before.",
    ),
    SettingSpec(
        "ACCOUNT_UNHEALTHY_SECONDS", "900", "How long an account that failed authentication is left out of rotation."
    ),
    SettingSpec(
        "ACCOUNT_COOLDOWN_SECONDS",
        "60",
        "How long an account is rested after HVE throttles it (4.5.104, 421); a daily-quota reply (4.5.102) rests it until its daily window resets.",
    ),
    SettingSpec("SEND_MAX_ATTEMPTS", "12", "Attempts before a request is recorded as dead."),
    SettingSpec(
        "SEND_MAX_AGE_HOURS",
        "72",
        "Age after which a still-undelivered request is recorded as dead, counted from its first receipt, or from its `sendAt` when it names one. A row still `deferred` this long plus 7 days (the poison queue's time to live) after its last update is recorded by `purge_expired` as `dead`, reason `lost-in-queue`.",
    ),
    SettingSpec("RETRY_BASE_SECONDS", "30", "First retry delay; doubles per attempt, with jitter."),
    SettingSpec("RETRY_MAX_SECONDS", "3600", "Cap of the retry delay."),
    SettingSpec(
        "SENDING_LEASE_SECONDS",
        "120",
        "A request whose ledger row says `sending` (an instance is submitting it, or died doing so) is left alone this long, then sent again under the same Message-ID. Longer than one SMTP transaction can take.",
    ),
    SettingSpec(
        "MAX_ATTACHMENTS",
        "20",
        "Attachments one request may have (inline and blob together); more is refused as `too-many-attachments` before anything is downloaded.",
    ),
    SettingSpec("LEDGER_TABLE", "hveledger", "Table with one row per request (outcome ledger)."),
    SettingSpec(
        "RECIPIENT_INDEX_TABLE", "hverecipients", "Table keyed by recipient hash, answering 'was this address mailed?'."
    ),
    SettingSpec("GOVERNOR_TABLE", "hvegovernor", "Table holding the rate governor's per-account state."),
    SettingSpec(
        "CLAIM_CHECK_CONTAINER",
        "mail-payloads",
        "Blob container where producers put claim-check requests and blob attachments, each under `requests/<producer>/<request id>/` (a producer of BLOB_PRODUCERS, the id of the request that names the blob); the relay reads nothing else there.",
    ),
    SettingSpec(
        "BLOB_PRODUCERS",
        "",
        "Comma-separated names of the producers that may hand the relay blobs (claim checks, attachments), each writing only under `requests/<name>/` of CLAIM_CHECK_CONTAINER (an ABAC condition on its role); the relay's own producers use `hve-relay`. Empty: only the relay's own.",
    ),
    SettingSpec(
        "RELAY_STATE_CONTAINER",
        "hve-relay-state",
        "Blob container of the relay's own copies (deferred requests too big for a queue message); only the relay's identity may write it, no producer is ever granted it.",
    ),
    SettingSpec(
        "RECIPIENT_HASH_KEY",
        "",
        "Secret key of the recipient hashes in the ledger (HMAC-SHA256). Set it; without it a built-in key is used and a warning is logged.",
    ),
    SettingSpec(
        "SUPPRESSION_ENABLED",
        "true",
        "Skip recipients on the suppression list (a 5xx at RCPT, a message-trace `failed` with a 5.x.x reason, or added by an operator): recorded `suppressed`, the others still go; a request whose recipients are all suppressed is refused `all-suppressed`. `false`: nothing is looked up or added.",
    ),
    SettingSpec(
        "SUPPRESSION_DAYS",
        "30",
        "Days a recipient stays on the suppression list after its last permanent failure (or an operator's `add`); then it is mailed again and `purge_expired` deletes its row. At most LEDGER_RETENTION_DAYS.",
    ),
    SettingSpec(
        "SUPPRESSION_TABLE",
        "hvesuppression",
        "Table of the suppression list: one row per suppressed recipient by keyed hash (RECIPIENT_HASH_KEY), with reason, source request, first/last time and expiry; never an address.",
    ),
    SettingSpec(
        "SUPPRESSION_CACHE_SECONDS",
        "60",
        "Each worker process keeps what it read of the suppression list this long: a suppression added (or removed) by another instance, the CLI or the HTTP route takes up to this long to bite (or to stop) there.",
    ),
    SettingSpec(
        "LEDGER_RETENTION_DAYS",
        "90",
        "Days the relay keeps who was mailed: ledger rows of final requests, chunk rows, recipient-index rows, delivery-status rows, welcome user rows and aggregate rows not updated for this long, and blobs left under the relay's `requests/` and `deferred/` prefixes, are deleted by the daily `purge_expired` timer. Longer than SEND_MAX_AGE_HOURS and WELCOME_LOOKBACK + WELCOME_OVERLAP (a request replayed after it is treated as new).",
    ),
    SettingSpec(
        "RETENTION_SCHEDULE",
        "0 30 2 * * *",
        "NCRONTAB schedule of the `purge_expired` timer (default: daily at 02:30 UTC).",
    ),
    SettingSpec(
        "RETENTION_MAX_ROWS_PER_RUN",
        "20000",
        "Rows `purge_expired` deletes per table in one run at most; what is left waits for the next run.",
    ),
    SettingSpec(
        "LOST_IN_FLIGHT_HOURS",
        "24",
        "A ledger row still `sending` this long after its last update is recorded by `purge_expired` as `dead`, reason `lost-in-flight` (HVE may have accepted it: its Message-ID is in the row).",
    ),
    SettingSpec(
        "AGGREGATES_TABLE",
        "hveaggregates",
        "Table of the hourly counters per account and category behind `GET /api/report` and `tools.ledger report` (no addresses).",
    ),
    SettingSpec(
        "AGGREGATES_FLUSH_SECONDS",
        "10",
        "Each worker process adds its counts to the aggregates table this often (ETag merges, one request per UTC day for the rows it holds): what `/api/status`, the report and the dashboard (which polls every 15 s) show lags by up to this much. A process killed loses the counts it has not written yet (at most this long of them while storage answers; see AGGREGATES_MAX_BUFFER_SECONDS), never counts twice.",
    ),
    SettingSpec(
        "AGGREGATES_MAX_BUFFER_SECONDS",
        "60",
        "Counts a worker process could not write to the aggregates table within this many seconds (storage unreachable) are given up (logged, `hve_relay.aggregates.dropped`): memory never holds more than this long of counts, which is the most a killed process loses. At least twice AGGREGATES_FLUSH_SECONDS plus 10 s (a flush's deadline).",
    ),
    SettingSpec(
        "AGGREGATES_MAX_CATEGORIES",
        "50",
        "Distinct categories each worker process counts apart per UTC hour (the first it sees); later ones are counted under `other`. The report shows the busiest this many of its window and folds the rest into `other`. 0: no cap.",
    ),
    SettingSpec(
        "AGGREGATES_SHARDS",
        "8",
        "Rows one aggregate (hour, account, category) may be spread over: a process that loses an ETag race on one moves to another, so no row is hot.",
    ),
    SettingSpec(
        "AGGREGATES_ROLLUP_AFTER_MINUTES",
        "120",
        "A UTC day that ended this long ago is read by the report from one rollup row per account and category (written by the first report that needs it) instead of its hour rows; a later write into that day marks the rollup stale. Longer than any clock skew between instances.",
    ),
    SettingSpec(
        "HVE_PRICE_PER_MILLION_RECIPIENTS",
        "42",
        "Price of HVE in USD per million recipients, for the cost estimate of `GET /api/report`.",
    ),
    SettingSpec(
        "REPORT_MAX_DAYS", "31", "Longest span `GET /api/report` answers (since to until); longer asks get a 400."
    ),
    SettingSpec(
        "HTTP_SEND_MAX_BYTES",
        "1048576",
        "Largest body `POST /api/send` accepts, in bytes (default 1 MiB: a request with about 700 KB of base64 attachments); a longer one is answered 413 before it is parsed. Requests over a queue message go on by claim check. At most 16777216 (16 MiB, over HVE's 10 MB message limit with base64 and JSON overhead).",
    ),
    SettingSpec("APPLICATIONINSIGHTS_CONNECTION_STRING", "", "Export telemetry to Azure Monitor when set."),
    SettingSpec(
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        "",
        "Entra (managed identity) authentication for Application Insights, e.g. `Authorization=AAD;ClientId=...`.",
    ),
    SettingSpec(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "Export telemetry over OTLP/HTTP when set (and no Azure Monitor connection string).",
    ),
    SettingSpec("WELCOME_ENABLED", "false", "Run the welcome scan timer."),
    SettingSpec("WELCOME_SCHEDULE", "0 */15 * * * *", "NCRONTAB schedule of the welcome scan."),
    SettingSpec("WELCOME_LOOKBACK", "P7D", "How far back the first welcome scan looks (ISO 8601 duration)."),
    SettingSpec("WELCOME_GROUP_ID", "", "Only welcome members of this group (object id); empty: all members."),
    SettingSpec(
        "WELCOME_OVERLAP",
        "PT1H",
        "Each welcome scan re-reads users created this long before the previous scan (Graph replication lag, clock skew); ISO 8601 duration.",
    ),
    SettingSpec(
        "WELCOME_PENDING_DAYS",
        "3",
        "A new user not yet eligible (no mailbox yet, account disabled, not yet in WELCOME_GROUP_ID) is re-checked on every scan for this many days after creation, then recorded as skipped with the reason.",
    ),
    SettingSpec(
        "WELCOME_STATE_TABLE",
        "hvewelcome",
        "Table holding the welcome scan's watermark and one row per new user seen (pending, enqueued or skipped).",
    ),
    SettingSpec("WELCOME_BCC", "", "Address Bcc'd on every welcome mail (e.g. customer services)."),
    SettingSpec(
        "WELCOME_TEMPLATES",
        "",
        "Welcome templates (`welcome.subject.txt`, `welcome.txt`, `welcome.html`) instead of the built-in ones: a folder path, or `blob:<container>/<prefix>` in the app's storage account.",
    ),
    SettingSpec(
        "WELCOME_OUTLOOK_URL",
        "https://outlook.office.com/mail/",
        "Outlook on the web link in the welcome mail (template variable `outlook_url`).",
    ),
    SettingSpec(
        "WELCOME_FAQ_URL", "", "FAQ link in the welcome mail (template variable `faq_url`); empty: no FAQ paragraph."
    ),
    SettingSpec(
        "WELCOME_SUPPORT_ADDRESS",
        "",
        "Support address offered as a mailto link in the welcome mail (template variables `support_address`, `support_mailto`); empty: no support paragraph.",
    ),
    SettingSpec(
        "GRAPH_BASE_URL",
        "https://graph.microsoft.com",
        "Microsoft Graph base URL (HTTPS; plain HTTP only for a loopback stand-in).",
    ),
    SettingSpec(
        "GRAPH_DEV_TOKEN",
        "",
        "Local only: fixed bearer token for a loopback GRAPH_BASE_URL (the Graph stand-in) instead of the app identity's token; refused for any other URL.",
        "local",
    ),
    SettingSpec(
        "DELIVERY_TRACE_ENABLED",
        "false",
        "Run the `confirm_delivery` timer: reconcile the ledger with Microsoft Graph message trace, per recipient (needs the Graph role ExchangeMessageTrace.Read.All).",
    ),
    SettingSpec("DELIVERY_TRACE_SCHEDULE", "0 */10 * * * *", "NCRONTAB schedule of the `confirm_delivery` timer."),
    SettingSpec(
        "DELIVERY_TRACE_MAX_AGE",
        "P3D",
        "Recipients still `pending`/`gettingStatus` are re-checked until final or this old; also how far back the first run looks (ISO 8601 duration, under 90 days).",
    ),
    SettingSpec(
        "DELIVERY_TRACE_REQUESTS_PER_5MIN",
        "60",
        "Graph message-trace requests (trace pages and recipient details) the relay spends in any 5 minutes; Graph allows 100 per tenant, shared with every other tool.",
    ),
    SettingSpec(
        "DELIVERY_TRACE_OVERLAP",
        "PT30M",
        "Each run re-reads trace rows received this long before the previous run's end: rows appear 5-10 minutes late (ISO 8601 duration).",
    ),
    SettingSpec(
        "DELIVERY_TRACE_SPAN",
        "PT6H",
        "Longest receivedDateTime window of one trace query (at most P10D); a run stopped by the budget resumes at the first window it did not finish.",
    ),
    SettingSpec(
        "DELIVERY_TRACE_END_LAG",
        "PT1M",
        "A trace query ends this long before now, so a clock a little ahead of Exchange's never asks for the future (Graph refuses it).",
    ),
    SettingSpec(
        "DELIVERY_TRACE_RETRY_AFTER_MAX",
        "PT1H",
        "Longest wait a Graph `Retry-After` can impose on the trace (ISO 8601 duration): a longer value (e.g. 1e11 or 1e15 s) waits this long, then the next run tries again.",
    ),
    SettingSpec("DELIVERY_TRACE_PAGE_SIZE", "5000", "`$top` of a trace query (1-5000)."),
    SettingSpec(
        "DELIVERY_TRACE_DETAILS_PER_RUN",
        "10",
        "getDetailsByRecipient calls per run at most, for the reason of `failed` and `quarantined` recipients (stored masked); 0: none.",
    ),
    SettingSpec(
        "DELIVERY_TABLE",
        "hvedelivery",
        "Table of delivery status: per request the count of recipients in each trace status, per recipient (by recipient hash) its status, and the reconciliation cursors.",
    ),
    SettingSpec(
        "EVENTS_QUEUE",
        "",
        "Storage queue that gets an outcome event (CloudEvents 1.0 JSON, shared/schema/event.v1.json) when a request becomes final and when its delivery counts change; empty: no queue events.",
    ),
    SettingSpec(
        "EVENTS_TOPIC_ENDPOINT",
        "",
        "Event Grid custom topic endpoint (https://<topic>.<region>-1.eventgrid.azure.net/api/events) that gets the same events, published with the app's managed identity (EventGrid Data Sender); empty: none.",
    ),
    SettingSpec(
        "EVENTS_SOURCE",
        "",
        "The events' `source` is `/hve-relay/<this>`; empty: the function app's name (WEBSITE_SITE_NAME), `local` without one.",
    ),
    SettingSpec(
        "EVENTS_CA_FILE",
        "",
        "Extra CA bundle (PEM) trusted for EVENTS_TOPIC_ENDPOINT, for a local stand-in. Public CAs stay trusted.",
        "local",
    ),
    SettingSpec(
        "WEBSITE_SITE_NAME",
        "",
        "The function app's name, set by the platform (the events' default source).",
        "platform",
    ),
)

_DEFAULTS = {spec.name: spec.default for spec in SETTINGS}


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


# Used only on a laptop when RECIPIENT_HASH_KEY is unset; Azure refuses to start without a key.
UNSET_HASH_KEY = "hve-relay-unset-key"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the setting."""


# Producer names the relay itself writes under (shared/send/blobs.py HTTP_PRODUCER: `POST /api/send`'s
# claim checks); a producer granted `requests/http/` could otherwise name blobs as if the relay wrote them.
RESERVED_PRODUCERS = frozenset({"http"})
# Largest HTTP_SEND_MAX_BYTES: HVE's 10 MB message in base64 inside JSON, and some room.
HTTP_SEND_MAX_BYTES_CAP = 16 * 1024 * 1024


def _producers(value: str) -> frozenset[str]:
    names = frozenset(p.lower() for p in _csv(value))
    for name in names:
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", name):
            raise SettingsError(f"BLOB_PRODUCERS: {name!r} is not a producer name (lower-case letters, digits and '-')")
        if name in RESERVED_PRODUCERS:
            raise SettingsError(f"BLOB_PRODUCERS: {name!r} is the relay's own producer name (POST /api/send)")
    return names


def _http_send_max_bytes(value: int) -> int:
    if not 1024 <= value <= HTTP_SEND_MAX_BYTES_CAP:
        raise SettingsError(f"HTTP_SEND_MAX_BYTES must be between 1024 and {HTTP_SEND_MAX_BYTES_CAP}, got {value}")
    return value


def _time_of_day(name: str, value: str) -> float:
    try:
        hours, minutes = (int(part) for part in value.split(":"))
    except ValueError:
        raise SettingsError(f"{name} must be HH:MM, got {value!r}") from None
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise SettingsError(f"{name} must be HH:MM between 00:00 and 23:59, got {value!r}")
    return hours * 3600.0 + minutes * 60.0


_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+(?:\.\d+)?)W)?(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def _duration(name: str, value: str) -> timedelta:
    """An ISO 8601 duration of weeks, days, hours, minutes and seconds (P7D, PT1H, P1DT12H).
    Months and years are refused: their length is not fixed."""
    match = _DURATION.match(value.strip().upper())
    if not match or not any(match.groupdict().values()) or value.strip().upper().endswith("T"):
        raise SettingsError(
            f"{name} must be an ISO 8601 duration such as P7D or PT1H (no months or years), got {value!r}"
        )
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    return timedelta(**parts)


def _flag(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise SettingsError(f"{name} must be true or false, got {value!r}")


def _delivery_settings(get, number) -> dict:
    """The DELIVERY_TRACE_* settings, checked against Graph's message-trace rules."""
    max_age = _duration("DELIVERY_TRACE_MAX_AGE", get("DELIVERY_TRACE_MAX_AGE"))
    if not timedelta(0) < max_age < timedelta(days=90):
        raise SettingsError("DELIVERY_TRACE_MAX_AGE must be more than 0 and less than 90 days (message trace keeps 90)")
    span = _duration("DELIVERY_TRACE_SPAN", get("DELIVERY_TRACE_SPAN"))
    if not timedelta(0) < span <= timedelta(days=10):
        raise SettingsError("DELIVERY_TRACE_SPAN must be more than 0 and at most P10D (Graph's longest trace window)")
    page = number("DELIVERY_TRACE_PAGE_SIZE", int)
    if not 1 <= page <= 5000:
        raise SettingsError("DELIVERY_TRACE_PAGE_SIZE must be 1..5000")
    per_5min = number("DELIVERY_TRACE_REQUESTS_PER_5MIN", int)
    if per_5min < 1:
        raise SettingsError("DELIVERY_TRACE_REQUESTS_PER_5MIN must be at least 1")
    retry_max = _duration("DELIVERY_TRACE_RETRY_AFTER_MAX", get("DELIVERY_TRACE_RETRY_AFTER_MAX"))
    if retry_max < timedelta(seconds=1):
        raise SettingsError("DELIVERY_TRACE_RETRY_AFTER_MAX must be at least PT1S")
    return dict(
        delivery_enabled=get("DELIVERY_TRACE_ENABLED").lower() in ("1", "true", "yes"),
        delivery_schedule=get("DELIVERY_TRACE_SCHEDULE"),
        delivery_max_age=max_age,
        delivery_requests_per_5min=per_5min,
        delivery_overlap=_duration("DELIVERY_TRACE_OVERLAP", get("DELIVERY_TRACE_OVERLAP")),
        delivery_span=span,
        delivery_end_lag=_duration("DELIVERY_TRACE_END_LAG", get("DELIVERY_TRACE_END_LAG")),
        delivery_page_size=page,
        delivery_retry_after_max=retry_max,
        delivery_details_per_run=number("DELIVERY_TRACE_DETAILS_PER_RUN", int),
        delivery_table=get("DELIVERY_TABLE"),
    )


def _events_endpoint(value: str) -> str:
    if value and not value.lower().startswith("https://"):
        raise SettingsError("EVENTS_TOPIC_ENDPOINT must be an https:// URL (the topic endpoint)")
    return value


@dataclass(frozen=True)
class Settings:
    storage_connection_string: str
    storage_account_name: str
    storage_client_id: str
    managed_identity_client_id: str
    mail_queue: str
    smtp_host: str
    smtp_port: int
    smtp_ca_file: str
    smtp_timeout: float
    accounts: tuple[str, ...]
    auth_mode: str
    key_vault_url: str
    local_passwords: Mapping[str, str] = field(repr=False)
    secret_cache_seconds: float
    oauth_scope: str
    internal_domains: frozenset[str]
    sender_name: str
    limits_profile: str
    limits_overrides: Mapping[str, object]
    daily_recipient_budget: int | None
    daily_reset_seconds: float
    pacing_margin_seconds: float
    max_recipients_per_request: int
    pool_size: int
    pool_idle_seconds: float
    pool_wait_seconds: float
    booking_horizon_seconds: float
    bookings_per_second: int
    pacer_seconds: float
    slot_wait_seconds: float
    backlog_sample_seconds: float
    backlog_min_messages: int
    account_unhealthy_seconds: float
    account_cooldown_seconds: float
    max_attempts: int
    max_age_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    sending_lease_seconds: float
    max_attachments: int
    ledger_table: str
    recipient_index_table: str
    governor_table: str
    claim_check_container: str
    blob_producers: frozenset[str]
    relay_state_container: str
    ledger_retention: timedelta
    retention_schedule: str
    retention_max_rows: int
    lost_in_flight_seconds: float
    aggregates_table: str
    aggregates_flush_seconds: float
    aggregates_shards: int
    aggregates_rollup_after_seconds: float
    aggregates_max_buffer_seconds: float
    aggregates_max_categories: int
    price_per_million_recipients: float
    report_max_days: float
    http_send_max_bytes: int
    recipient_hash_key: bytes = field(repr=False)
    appinsights_connection_string: str = field(repr=False)
    otlp_endpoint: str
    welcome_enabled: bool
    welcome_schedule: str
    welcome_lookback: timedelta
    welcome_overlap: timedelta
    welcome_pending: timedelta
    welcome_state_table: str
    welcome_group_id: str
    welcome_bcc: str
    welcome_templates: str
    welcome_outlook_url: str
    welcome_faq_url: str
    welcome_support_address: str
    graph_base_url: str
    graph_dev_token: str = field(repr=False)
    delivery_enabled: bool = False
    delivery_schedule: str = "0 */10 * * * *"
    delivery_max_age: timedelta = timedelta(days=3)
    delivery_requests_per_5min: int = 60
    delivery_overlap: timedelta = timedelta(minutes=30)
    delivery_span: timedelta = timedelta(hours=6)
    delivery_end_lag: timedelta = timedelta(minutes=1)
    delivery_page_size: int = 5000
    delivery_details_per_run: int = 10
    delivery_table: str = "hvedelivery"
    delivery_retry_after_max: timedelta = timedelta(hours=1)
    events_queue: str = ""
    events_topic_endpoint: str = ""
    events_source: str = ""
    events_ca_file: str = ""
    mail_auto_submitted: bool = True
    mail_suppress_auto_responses: bool = True
    priority_queue: str = "outbound-mail-priority"
    suppression_enabled: bool = True
    suppression_days: float = 30.0
    suppression_table: str = "hvesuppression"
    suppression_cache_seconds: float = 60.0

    @property
    def poison_queue(self) -> str:
        return f"{self.mail_queue}-poison"

    @property
    def priority_poison_queue(self) -> str:
        return f"{self.priority_queue}-poison"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            value = env.get(name)
            return (value if value is not None and value.strip() != "" else _DEFAULTS[name]).strip()

        def number(name: str, kind: type = float):
            raw = get(name)
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a number, got {raw!r}") from None
            if value < 0:
                raise SettingsError(f"{name} must not be negative")
            return value

        def json_object(name: str) -> dict:
            raw = get(name)
            if not raw:
                return {}
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"{name} is not valid JSON: {exc.msg}") from None
            if not isinstance(value, dict):
                raise SettingsError(f"{name} must be a JSON object")
            return value

        auth_mode = get("HVE_AUTH").lower()
        if auth_mode not in ("basic", "oauth"):
            raise SettingsError(f"HVE_AUTH must be 'basic' or 'oauth', got {auth_mode!r}")
        profile = get("HVE_LIMITS_PROFILE").lower()
        if profile not in ("ga-2026", "preview-2024"):
            raise SettingsError(f"HVE_LIMITS_PROFILE must be 'ga-2026' or 'preview-2024', got {profile!r}")
        accounts = tuple(a.lower() for a in _csv(get("HVE_ACCOUNTS")))
        passwords = {k.lower(): str(v) for k, v in json_object("HVE_PASSWORDS").items()}
        budget_raw = get("HVE_DAILY_RECIPIENT_BUDGET")
        hash_key = get("RECIPIENT_HASH_KEY")
        if hash_key.startswith("@Microsoft.KeyVault("):
            raise SettingsError(
                "RECIPIENT_HASH_KEY is an unresolved Key Vault reference: check the secret exists "
                "and the app's identity may read it"
            )
        if not hash_key and get("AzureWebJobsStorage__accountName"):
            raise SettingsError(
                "RECIPIENT_HASH_KEY is empty: in Azure it must come from Key Vault (infra/deploy.sh sets it)"
            )

        retention_days = number("LEDGER_RETENTION_DAYS")
        # Purging a row that a live request still needs would let a replay send it again.
        must_outlive = max(
            timedelta(hours=number("SEND_MAX_AGE_HOURS")),
            _duration("WELCOME_LOOKBACK", get("WELCOME_LOOKBACK"))
            + _duration("WELCOME_OVERLAP", get("WELCOME_OVERLAP")),
        )
        if timedelta(days=retention_days) <= must_outlive:
            raise SettingsError(
                f"LEDGER_RETENTION_DAYS ({retention_days:g}) must be longer than SEND_MAX_AGE_HOURS "
                "and WELCOME_LOOKBACK + WELCOME_OVERLAP"
            )

        if get("MAIL_QUEUE_PRIORITY").lower() == get("MAIL_QUEUE").lower():
            raise SettingsError(
                "MAIL_QUEUE_PRIORITY must differ from MAIL_QUEUE: the priority lane is a queue of its own"
            )

        suppression_days = number("SUPPRESSION_DAYS")
        if not 0 < suppression_days <= retention_days:
            raise SettingsError(
                f"SUPPRESSION_DAYS ({suppression_days:g}) must be more than 0 and at most LEDGER_RETENTION_DAYS "
                f"({retention_days:g}): the relay keeps who was mailed no longer than that"
            )

        if get("RELAY_STATE_CONTAINER") == get("CLAIM_CHECK_CONTAINER"):
            raise SettingsError(
                "RELAY_STATE_CONTAINER must differ from CLAIM_CHECK_CONTAINER: producers write the "
                "one, only the relay the other"
            )

        return cls(
            storage_connection_string=get("AzureWebJobsStorage"),
            storage_account_name=get("AzureWebJobsStorage__accountName"),
            storage_client_id=get("AzureWebJobsStorage__clientId"),
            managed_identity_client_id=get("AZURE_CLIENT_ID"),
            mail_queue=get("MAIL_QUEUE"),
            priority_queue=get("MAIL_QUEUE_PRIORITY"),
            smtp_host=get("HVE_SMTP_HOST"),
            smtp_port=number("HVE_SMTP_PORT", int),
            smtp_ca_file=get("HVE_SMTP_CA_FILE"),
            smtp_timeout=number("HVE_SMTP_TIMEOUT_SECONDS"),
            accounts=accounts,
            auth_mode=auth_mode,
            key_vault_url=get("KEY_VAULT_URL"),
            local_passwords=passwords,
            secret_cache_seconds=number("HVE_SECRET_CACHE_SECONDS"),
            oauth_scope=get("HVE_OAUTH_SCOPE"),
            internal_domains=frozenset(d.lower() for d in _csv(get("HVE_INTERNAL_DOMAINS"))),
            sender_name=get("HVE_SENDER_NAME"),
            mail_auto_submitted=_flag("MAIL_AUTO_SUBMITTED", get("MAIL_AUTO_SUBMITTED")),
            mail_suppress_auto_responses=_flag("MAIL_SUPPRESS_AUTO_RESPONSES", get("MAIL_SUPPRESS_AUTO_RESPONSES")),
            limits_profile=profile,
            limits_overrides=json_object("HVE_LIMITS"),
            daily_recipient_budget=int(number("HVE_DAILY_RECIPIENT_BUDGET", int)) if budget_raw else None,
            daily_reset_seconds=_time_of_day("HVE_DAILY_RESET_UTC", get("HVE_DAILY_RESET_UTC")),
            pacing_margin_seconds=number("HVE_PACING_MARGIN_SECONDS"),
            max_recipients_per_request=max(1, number("MAX_RECIPIENTS_PER_REQUEST", int)),
            pool_size=max(1, number("HVE_POOL_SIZE", int)),
            pool_idle_seconds=number("HVE_POOL_IDLE_SECONDS"),
            pool_wait_seconds=max(0.1, number("HVE_POOL_WAIT_SECONDS")),
            booking_horizon_seconds=max(60.0, number("HVE_BOOKING_HORIZON_SECONDS")),
            bookings_per_second=max(0, number("HVE_BOOKINGS_PER_SECOND", int)),
            pacer_seconds=number("HVE_PACER_SECONDS"),
            slot_wait_seconds=max(0.0, number("HVE_SLOT_WAIT_SECONDS")),
            backlog_sample_seconds=max(0.0, number("HVE_BACKLOG_SAMPLE_SECONDS")),
            backlog_min_messages=max(0, number("HVE_BACKLOG_MIN_MESSAGES", int)),
            account_unhealthy_seconds=number("ACCOUNT_UNHEALTHY_SECONDS"),
            account_cooldown_seconds=number("ACCOUNT_COOLDOWN_SECONDS"),
            max_attempts=max(1, number("SEND_MAX_ATTEMPTS", int)),
            max_age_seconds=number("SEND_MAX_AGE_HOURS") * 3600.0,
            retry_base_seconds=number("RETRY_BASE_SECONDS"),
            retry_max_seconds=number("RETRY_MAX_SECONDS"),
            sending_lease_seconds=number("SENDING_LEASE_SECONDS"),
            max_attachments=number("MAX_ATTACHMENTS", int),
            ledger_table=get("LEDGER_TABLE"),
            recipient_index_table=get("RECIPIENT_INDEX_TABLE"),
            governor_table=get("GOVERNOR_TABLE"),
            claim_check_container=get("CLAIM_CHECK_CONTAINER"),
            blob_producers=_producers(get("BLOB_PRODUCERS")),
            relay_state_container=get("RELAY_STATE_CONTAINER"),
            ledger_retention=timedelta(days=retention_days),
            retention_schedule=get("RETENTION_SCHEDULE"),
            retention_max_rows=max(1, number("RETENTION_MAX_ROWS_PER_RUN", int)),
            lost_in_flight_seconds=number("LOST_IN_FLIGHT_HOURS") * 3600.0,
            aggregates_table=get("AGGREGATES_TABLE"),
            aggregates_flush_seconds=number("AGGREGATES_FLUSH_SECONDS"),
            aggregates_shards=max(1, number("AGGREGATES_SHARDS", int)),
            aggregates_rollup_after_seconds=max(60.0, number("AGGREGATES_ROLLUP_AFTER_MINUTES") * 60.0),
            aggregates_max_buffer_seconds=number("AGGREGATES_MAX_BUFFER_SECONDS"),
            aggregates_max_categories=number("AGGREGATES_MAX_CATEGORIES", int),
            price_per_million_recipients=number("HVE_PRICE_PER_MILLION_RECIPIENTS"),
            report_max_days=max(1.0, number("REPORT_MAX_DAYS")),
            http_send_max_bytes=_http_send_max_bytes(number("HTTP_SEND_MAX_BYTES", int)),
            recipient_hash_key=(hash_key or UNSET_HASH_KEY).encode(),
            appinsights_connection_string=get("APPLICATIONINSIGHTS_CONNECTION_STRING"),
            otlp_endpoint=get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            welcome_enabled=get("WELCOME_ENABLED").lower() in ("1", "true", "yes"),
            welcome_schedule=get("WELCOME_SCHEDULE"),
            welcome_lookback=_duration("WELCOME_LOOKBACK", get("WELCOME_LOOKBACK")),
            welcome_overlap=_duration("WELCOME_OVERLAP", get("WELCOME_OVERLAP")),
            welcome_pending=timedelta(days=number("WELCOME_PENDING_DAYS")),
            welcome_state_table=get("WELCOME_STATE_TABLE"),
            welcome_group_id=get("WELCOME_GROUP_ID"),
            welcome_bcc=get("WELCOME_BCC"),
            welcome_templates=get("WELCOME_TEMPLATES"),
            welcome_outlook_url=get("WELCOME_OUTLOOK_URL"),
            welcome_faq_url=get("WELCOME_FAQ_URL"),
            welcome_support_address=get("WELCOME_SUPPORT_ADDRESS"),
            graph_base_url=get("GRAPH_BASE_URL").rstrip("/"),
            graph_dev_token=get("GRAPH_DEV_TOKEN"),
            **_delivery_settings(get, number),
            events_queue=get("EVENTS_QUEUE"),
            events_topic_endpoint=_events_endpoint(get("EVENTS_TOPIC_ENDPOINT")),
            events_source=get("EVENTS_SOURCE") or get("WEBSITE_SITE_NAME"),
            events_ca_file=get("EVENTS_CA_FILE"),
            suppression_enabled=_flag("SUPPRESSION_ENABLED", get("SUPPRESSION_ENABLED")),
            suppression_days=suppression_days,
            suppression_table=get("SUPPRESSION_TABLE"),
            suppression_cache_seconds=number("SUPPRESSION_CACHE_SECONDS"),
        )

    def require_accounts(self) -> None:
        if not self.accounts:
            raise SettingsError("HVE_ACCOUNTS is empty: name at least one HVE account address")
