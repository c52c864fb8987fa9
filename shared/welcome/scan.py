"""The welcome scan: find users created since the last scan in Microsoft Graph and put one
welcome mail request per new user on the relay's queue, exactly once per user.

Exactly once, by layers:
1. The request id is `welcome-<user id>`: the send stage's ledger sends a request id once, so a
   request that reaches the queue twice is still one mail.
2. A row per user in the welcome state table (`enqueued`, `pending`, `skipped`): a user already
   enqueued or skipped is not enqueued again, so reruns and overlapping windows do not flood the
   queue. The row is written *after* the request is on the queue: a crash in between means the
   request may be enqueued again (layer 1 absorbs it), never that it is lost.
3. The watermark (start of the last completed scan) advances only after every request of the scan
   is on the queue and recorded; the next window starts `WELCOME_OVERLAP` before it, so users that
   Graph lists late are still seen. A failed scan leaves the watermark alone and the next run
   reads the same users again.

Entry points: `run_scan(settings, ...)` (one scan; `dry_run=True` decides but writes nothing) and
`handle_timer()` for the `welcome_new_users` timer function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.send.contract import RequestRefused, ValidationPolicy, id_proof, parse_address, validate_request
from shared.settings import Settings, SettingsError
from shared.welcome.policy import (
    DONE_STATES,
    PENDING,
    SKIP,
    STATE_ENQUEUED,
    STATE_PENDING,
    STATE_SKIPPED,
    TEMPLATE_FILES,
    USER_SELECT,
    WELCOME,
    Decision,
    GraphUser,
    Links,
    TemplateError,
    Templates,
    Window,
    build_request,
    decide,
    graph_time,
    hold,
    needs_group_check,
    request_id_for,
    scan_window,
)
from shared.welcome.state import UserRow, WelcomeState

log = logging.getLogger("hve_relay.welcome")

TEMPLATES_DIR = Path(__file__).parent / "templates"

# A test (or a fault drill) can stop a scan between its steps: checkpoint(stage, user_id) is called
# after a request is on the queue ("enqueued"), after its state row is written ("recorded") and
# before the watermark moves ("watermark"). Raising there is a crash at that point.
Checkpoint = Callable[[str, str], None]


@dataclass
class ScanReport:
    started: datetime
    window: Window
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)  # decided in this scan, by creation time
    already: list[tuple[GraphUser, UserRow]] = field(default_factory=list)  # enqueued/skipped by an earlier scan
    expired: list[UserRow] = field(default_factory=list)  # pending rows that ran out without being seen again
    users_read: int = 0
    graph_requests: int = 0
    watermark: datetime | None = None  # the stored watermark after the scan

    def of(self, outcome: str) -> list[Decision]:
        return [d for d in self.decisions if d.outcome == outcome]

    @property
    def enqueued(self) -> list[str]:
        return [request_id_for(d.user.id) for d in self.of(WELCOME)]

    def summary(self) -> str:
        """One line without names or addresses (it goes to the logs)."""
        verb = "would welcome" if self.dry_run else "welcomed"
        return (
            f"welcome scan{' (dry run)' if self.dry_run else ''} since {graph_time(self.window.since)}: "
            f"{self.users_read} user(s) read, {verb} {len(self.of(WELCOME))}, pending {len(self.of(PENDING))}, "
            f"skipped {len(self.of(SKIP)) + len(self.expired)}, already done {len(self.already)}; "
            f"{self.graph_requests} Graph request(s)"
            + (f"; watermark {graph_time(self.watermark)}" if self.watermark and not self.dry_run else "")
        )


def validation_policy(settings: Settings) -> ValidationPolicy:
    """The same contract policy the send stage applies, so the scan never enqueues a request the
    relay would refuse."""
    from shared.hve.limits import resolve_limits

    settings.require_accounts()
    return ValidationPolicy.from_settings(settings, resolve_limits(settings.limits_profile, settings.limits_overrides))


def check_bcc(settings: Settings, policy: ValidationPolicy) -> str:
    """WELCOME_BCC is a setting: a bad one fails the scan instead of holding back every user."""
    if not settings.welcome_bcc:
        return ""
    try:
        address = parse_address("WELCOME_BCC", settings.welcome_bcc)
    except RequestRefused as exc:
        raise SettingsError(f"WELCOME_BCC: {exc.detail}") from None
    if not policy.external_allowed and address.domain not in policy.internal_domains:
        raise SettingsError(
            f"WELCOME_BCC {address.addr!r} is outside HVE_INTERNAL_DOMAINS, and the limits "
            f"profile {settings.limits_profile!r} refuses external recipients"
        )
    return settings.welcome_bcc


# --- templates ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def builtin_templates() -> Templates:
    return Templates.from_sources({k: (TEMPLATES_DIR / name).read_text("utf-8") for k, name in TEMPLATE_FILES.items()})


async def load_templates(settings: Settings, storage: Any = None) -> Templates:
    """The built-in templates, or those named by WELCOME_TEMPLATES: a folder, or
    `blob:<container>/<prefix>` in the app's storage account. All three files must be there."""
    spec = settings.welcome_templates
    if not spec:
        return builtin_templates()
    sources: dict[str, str] = {}
    if spec.startswith("blob:"):
        if storage is None:
            raise TemplateError("WELCOME_TEMPLATES names blobs, but no storage client was given")
        from azure.core.exceptions import ResourceNotFoundError

        container_name, _, prefix = spec[len("blob:") :].strip("/").partition("/")
        container = storage.container(container_name)
        for key, name in TEMPLATE_FILES.items():
            blob = f"{prefix.rstrip('/')}/{name}" if prefix else name
            try:
                sources[key] = (await (await container.download_blob(blob)).readall()).decode("utf-8")
            except ResourceNotFoundError:
                raise TemplateError(
                    f"WELCOME_TEMPLATES: blob {blob!r} not found in container {container_name!r}"
                ) from None
    else:
        folder = Path(spec)
        for key, name in TEMPLATE_FILES.items():
            try:
                sources[key] = (folder / name).read_text("utf-8")
            except FileNotFoundError:
                raise TemplateError(f"WELCOME_TEMPLATES: {folder / name} does not exist") from None
    return Templates.from_sources(sources)


# --- the scan -------------------------------------------------------------------------------------


def _utc_from(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class WelcomeScan:
    """One scan's work, given its peers: a Graph client, the state table, the queue (through
    `storage`), the templates. `clock` returns epoch seconds."""

    def __init__(
        self,
        settings: Settings,
        *,
        graph: Any,
        state: WelcomeState,
        storage: Any,
        templates: Templates,
        clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.settings = settings
        self.graph = graph
        self.state = state
        self.storage = storage
        self.templates = templates
        self.clock = clock
        self.checkpoint = checkpoint or (lambda stage, user_id: None)
        self.policy = validation_policy(settings)
        self.bcc = check_bcc(settings, self.policy)
        self.links = Links(
            outlook_url=settings.welcome_outlook_url,
            faq_url=settings.welcome_faq_url,
            support_address=settings.welcome_support_address,
        )

    async def run(self, *, dry_run: bool = False) -> ScanReport:
        s = self.settings
        now = _utc_from(self.clock())
        watermark = await self.state.watermark()
        # Every user a window below can list was created after this horizon.
        rows = await self.state.rows(now - max(s.welcome_lookback, s.welcome_pending, s.welcome_overlap))
        pending_rows = [r for r in rows.values() if r.state == STATE_PENDING]
        oldest_pending = min((r.created or r.first_seen for r in pending_rows), default=None)
        window = scan_window(
            now,
            watermark,
            lookback=s.welcome_lookback,
            overlap=s.welcome_overlap,
            pending_for=s.welcome_pending,
            oldest_pending=oldest_pending,
        )
        report = ScanReport(started=now, window=window, dry_run=dry_run)
        requests_before = getattr(self.graph, "requests", 0)

        users: dict[str, GraphUser] = {}
        async for doc in self.graph.users_created_since(window.since, USER_SELECT):
            user = GraphUser.from_graph(doc)
            users[user.id] = user
        report.users_read = len(users)
        todo = sorted(
            (u for u in users.values() if not (u.id in rows and rows[u.id].state in DONE_STATES)),
            key=lambda u: (u.created or now, u.id),
        )
        for user in users.values():
            if user.id in rows and rows[user.id].state in DONE_STATES:
                report.already.append((user, rows[user.id]))

        group_members = None
        if s.welcome_group_id and any(needs_group_check(u, s.welcome_group_id) for u in todo):
            group_members = await self.graph.group_member_ids(s.welcome_group_id)

        for user in todo:
            row = rows.get(user.id)
            decision = decide(
                user,
                now,
                s.welcome_pending,
                group_id=s.welcome_group_id,
                group_members=group_members,
                first_seen=row.first_seen if row else None,
            )
            request = None
            if decision.outcome == WELCOME:
                request = build_request(user, self.templates, self.links, bcc=self.bcc)
                try:
                    validate_request(request, self.policy)
                except RequestRefused as refusal:
                    # Held, not dropped: a fixed setting (HVE_INTERNAL_DOMAINS) lets it through later.
                    decision = hold(
                        user,
                        f"the relay would refuse the request ({refusal})",
                        now,
                        s.welcome_pending,
                        first_seen=row.first_seen if row else None,
                    )
                    request = None
            report.decisions.append(decision)
            if not dry_run:
                await self._carry_out(decision, request, row, now)

        for row in pending_rows:
            if row.user_id in users or row.retry_until is None or now < row.retry_until:
                continue
            # Pending until its deadline and not listed any more (deleted, or older than any window).
            expired = UserRow(
                user_id=row.user_id,
                state=STATE_SKIPPED,
                first_seen=row.first_seen,
                updated=now,
                created=row.created,
                reason=f"{row.reason} until {graph_time(row.retry_until)}",
            )
            report.expired.append(expired)
            if not dry_run:
                await self.state.save(expired)

        report.graph_requests = getattr(self.graph, "requests", 0) - requests_before
        if dry_run:
            report.watermark = watermark
            return report
        self.checkpoint("watermark", "")
        report.watermark = await self.state.advance_watermark(
            now,
            last_users_read=report.users_read,
            last_enqueued=len(report.of(WELCOME)),
            last_pending=len(report.of(PENDING)),
            last_window_since=window.since,
        )
        return report

    async def _carry_out(self, decision: Decision, request: dict | None, row: UserRow | None, now: datetime) -> None:
        user = decision.user
        first_seen = row.first_seen if row else now
        if decision.outcome == WELCOME:
            from shared.send.producer import enqueue_requests

            assert request is not None
            # `welcome-` ids are the relay's own namespace: the request carries the relay's proof, a
            # producer's request under such an id is refused (shared/send/contract.check_id_claim).
            request = {**request, "idProof": id_proof(self.settings.recipient_hash_key, request["id"])}
            await enqueue_requests(
                self.storage, self.settings.mail_queue, self.settings.claim_check_container, [request]
            )
            self.checkpoint("enqueued", user.id)
            await self.state.save(
                UserRow(
                    user_id=user.id,
                    state=STATE_ENQUEUED,
                    first_seen=first_seen,
                    updated=now,
                    created=user.created,
                    request_id=request["id"],
                )
            )
            log.info("welcome: user %s enqueued as %s", user.id, request["id"])
        elif decision.outcome == PENDING:
            if row is not None and row.state == STATE_PENDING and row.reason == decision.reason:
                return  # nothing new to record
            await self.state.save(
                UserRow(
                    user_id=user.id,
                    state=STATE_PENDING,
                    first_seen=first_seen,
                    updated=now,
                    created=user.created,
                    reason=decision.reason,
                    retry_until=decision.retry_until,
                )
            )
            log.info("welcome: user %s pending: %s", user.id, decision.reason)
        else:
            await self.state.save(
                UserRow(
                    user_id=user.id,
                    state=STATE_SKIPPED,
                    first_seen=first_seen,
                    updated=now,
                    created=user.created,
                    reason=decision.reason,
                )
            )
            log.info("welcome: user %s skipped: %s", user.id, decision.reason)
        self.checkpoint("recorded", user.id)


async def run_scan(
    settings: Settings,
    *,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    credential: Any = None,
    graph: Any = None,
    storage: Any = None,
    checkpoint: Checkpoint | None = None,
) -> ScanReport:
    """One welcome scan. Builds (and closes) the Graph client and storage clients it is not given:
    `credential` is any object with `async get_token(scope)` (default: the app identity, or
    GRAPH_DEV_TOKEN for a loopback stand-in)."""
    from shared.graph import GraphClient
    from shared.storage import StorageClients

    own_storage = storage is None
    own_graph = graph is None
    storage = storage if storage is not None else StorageClients(settings)
    try:
        graph = graph if graph is not None else GraphClient.from_settings(settings, credential)
        try:
            templates = await load_templates(settings, storage)
            state = await WelcomeState.open(storage, settings.welcome_state_table, read_only=dry_run)
            scan = WelcomeScan(
                settings,
                graph=graph,
                state=state,
                storage=storage,
                templates=templates,
                clock=clock,
                checkpoint=checkpoint,
            )
            return await scan.run(dry_run=dry_run)
        finally:
            if own_graph:
                await graph.close()
    finally:
        if own_storage:
            await storage.close()


async def handle_timer(past_due: bool = False) -> ScanReport | None:
    """The `welcome_new_users` timer: one scan when WELCOME_ENABLED is true. A failure raises, so the
    host records it; the watermark stays where it was and the next run repeats the window."""
    settings = Settings.from_env()
    if not settings.welcome_enabled:
        log.info("welcome scan: WELCOME_ENABLED is not true; nothing to do")
        return None
    from opentelemetry import trace

    from shared.telemetry import configure

    configure(settings)
    with trace.get_tracer("hve_relay").start_as_current_span("hve_relay.welcome_scan") as span:
        report = await run_scan(settings)
        span.set_attribute("hve.welcome.users_read", report.users_read)
        span.set_attribute("hve.welcome.enqueued", len(report.of(WELCOME)))
        span.set_attribute("hve.welcome.pending", len(report.of(PENDING)))
        span.set_attribute("hve.welcome.past_due", past_due)
    log.info("%s", report.summary())
    return report
