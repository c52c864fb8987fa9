"""The send stage: one queue message in, one recorded outcome out.

It trusts nothing from the producer: the body is decoded and validated here, the ledger is the
truth about attempts and duplicates, and the queue is the only way to try again later (a copy is
re-enqueued with a visibility delay). The function holds a message only for a booked slot a few
seconds away (the 2024 preview's per-minute windows); every longer wait is a visibility delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.governor.pacing import Impossible, PacingConfig, Release, Shape, Wait, chunk_recipients
from shared.governor.preview.queue_timing import BacklogEstimator, ReturnLatency
from shared.governor.scheduler import BudgetedScheduler, Later, PlainScheduler, Refuse
from shared.governor.table import Grant, TableGovernor
from shared.hve.credentials import KeyVaultPasswords, LocalPasswords, TokenSource, azure_credential, check_secret_names
from shared.hve.limits import Limits, resolve_limits
from shared.hve.smtp import AUTH_FAILURE_HOLD_SECONDS, BasicAuth, HveSmtp, OAuthAuth, tls_context
from shared.ledger import DEAD, DEFERRED, FINAL_STATES, REFUSED, SENDING, SENT, Ledger, LedgerConflict, LedgerEntry
from shared.reporting.aggregates import Aggregates, reply_labels
from shared.send.blobs import BlobReader
from shared.send.contract import (
    MailRequest,
    RequestRefused,
    ValidationPolicy,
    check_id_claim,
    claim_check_of,
    content_digest,
    content_request_id,
    decode_queue_body,
    fits_on_queue,
    id_proof,
    is_internal,
    is_relay_id,
    mime_base64_size,
    parse_request_id,
    queue_text,
    validate_request,
)
from shared.send.mime import build_message, message_id
from shared.send.relay_blobs import RelayBlobs
from shared.send.replies import Outcome, Verdict, mask_addresses
from shared.send.retry import retry_delay, visibility_for
from shared.settings import UNSET_HASH_KEY, Settings
from shared.storage import StorageClients
from shared.telemetry import Instruments

log = logging.getLogger("hve_relay.sender")

# A request some instance is submitting right now is left alone for SENDING_LEASE_SECONDS (a setting);
# others look again this often (usually the other instance has finished by then).
BUSY_RECHECK_SECONDS = 5.0
# After an account problem another account can usually take the message at once.
ACCOUNT_RETRY_SECONDS = 2.0
# After a local failure with an account (a credential read), this process leaves it alone this long.
LOCAL_HOLD_SECONDS = 10.0
# A slot whose session took too long to be ready is taken again after this short deferral.
LAPSED_RETRY_SECONDS = 1.0
# The body of the pacer message (see `_keep_host_polling`).
PACER_KEY = "hveRelayPacer"
# The pacer reads the governor again when what this process knows of the bookings is this old.
PACER_STATE_MAX_AGE_SECONDS = 30.0


@dataclass(frozen=True)
class Handled:
    """What became of one queue message (returned for the host's log and for tests)."""

    request_id: str
    state: str  # sent | deferred | refused | dead | duplicate | busy
    reason: str = ""
    account: str = ""
    code: int = 0
    delay_seconds: int = 0


def pacing_config(settings: Settings, limits: Limits) -> PacingConfig:
    return PacingConfig(
        limits=limits,
        margin_seconds=settings.pacing_margin_seconds,
        day_offset_seconds=settings.daily_reset_seconds,
        daily_recipient_budget=settings.daily_recipient_budget,
        cooldown_seconds=settings.account_cooldown_seconds,
        unhealthy_seconds=settings.account_unhealthy_seconds,
        booking_horizon_seconds=settings.booking_horizon_seconds,
        bookings_per_second=settings.bookings_per_second,
    )


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Relay:
    """Everything the send stage needs, built once per worker process (per event loop)."""

    def __init__(
        self,
        settings: Settings,
        *,
        storage: StorageClients,
        smtp: HveSmtp,
        governor: TableGovernor,
        ledger: Ledger,
        queue: Any,
        payloads: BlobReader,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        aggregates: Aggregates | None = None,
    ) -> None:
        settings.require_accounts()
        self.settings = settings
        self.storage = storage
        self.smtp = smtp
        self.governor = governor
        self.ledger = ledger
        self.queue = queue
        self.payloads = payloads
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        self.aggregates = aggregates
        self.instruments = Instruments()
        self.stats = RelayStats()
        self._pacer_seen = -math.inf
        # With HVE_BACKLOG_SAMPLE_SECONDS set, bookings never fall due inside the queue's visible
        # backlog (capped at half the horizon).
        self.backlog = BacklogEstimator(
            settings.backlog_sample_seconds, settings.backlog_min_messages, settings.booking_horizon_seconds / 2
        )
        self.return_latency = ReturnLatency(settings.slot_wait_seconds)
        # Waiting for a booked slot a moment away (the simulation puts its virtual clock here).
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self.policy = ValidationPolicy.from_settings(settings, limits)
        # No per-minute window and no per-account daily limit (ga-2026): only account health
        # decides, from the governor's rows read now and then; no account row is written per
        # message, no slot is booked, no queue length is read, and a daily budget is taken from the
        # tenant row in blocks (shared/governor/scheduler.py). Otherwise the governor's `acquire`
        # paces every transaction (bookings, pacer, backlog readings).
        self.scheduler: PlainScheduler | None = None
        if governor.config.plain:
            budgeted = governor.config.tenant_cap is not None
            self.scheduler = BudgetedScheduler(governor, self.rng) if budgeted else PlainScheduler(governor, self.rng)
        self.message_id_domain = settings.accounts[0].rsplit("@", 1)[1]

    @classmethod
    async def create(
        cls, settings: Settings, *, token_credential: Any = None, clock: Callable[[], float] = time.time
    ) -> Relay:
        settings.require_accounts()
        if settings.recipient_hash_key == UNSET_HASH_KEY.encode():
            log.warning("RECIPIENT_HASH_KEY is not set: recipient hashes use a built-in key (fine for local runs only)")
        limits = resolve_limits(settings.limits_profile, settings.limits_overrides)
        storage = StorageClients(settings)
        closers: list[Callable[[], Awaitable[None]]] = []  # what this Relay opened besides storage and SMTP
        if settings.auth_mode == "oauth":
            credential = token_credential
            if credential is None:
                credential = azure_credential(settings.managed_identity_client_id)
                closers.append(credential.close)
            authenticator: Any = OAuthAuth(TokenSource(credential, settings.oauth_scope))
        elif settings.key_vault_url:
            check_secret_names(settings.accounts)  # refuse to start when two accounts share a secret
            credential = azure_credential(settings.managed_identity_client_id)
            passwords = KeyVaultPasswords(settings.key_vault_url, credential, settings.secret_cache_seconds)
            closers += [passwords.close, credential.close]
            authenticator = BasicAuth(passwords)
        else:
            authenticator = BasicAuth(LocalPasswords(settings.local_passwords))
        smtp = HveSmtp(
            host=settings.smtp_host,
            port=settings.smtp_port,
            authenticator=authenticator,
            context=tls_context(settings.smtp_ca_file),
            timeout=settings.smtp_timeout,
            pool_size=settings.pool_size,
            idle_seconds=settings.pool_idle_seconds,
            auth_failure_hold=min(AUTH_FAILURE_HOLD_SECONDS, settings.account_unhealthy_seconds),
            pool_wait=settings.pool_wait_seconds,
        )
        ledger = Ledger(
            await storage.table(settings.ledger_table),
            await storage.table(settings.recipient_index_table),
            settings.recipient_hash_key,
        )
        # The governor ages its view of the rows by the same clock as everything else when one is
        # given (the simulation's virtual clock); by the monotonic clock otherwise.
        governor = TableGovernor(
            await storage.table(settings.governor_table),
            settings.accounts,
            pacing_config(settings, limits),
            clock=time.monotonic if clock is time.time else clock,
        )
        payloads = BlobReader(
            storage.container(settings.claim_check_container),
            limits.message_bytes,
            state_container=storage.container(settings.relay_state_container),
            producers=settings.blob_producers,
        )
        relay = cls(
            settings,
            storage=storage,
            smtp=smtp,
            governor=governor,
            ledger=ledger,
            queue=await storage.queue(settings.mail_queue),
            payloads=payloads,
            limits=limits,
            clock=clock,
            aggregates=Aggregates(
                storage.tables.get_table_client(settings.aggregates_table),
                clock=clock,
                flush_seconds=settings.aggregates_flush_seconds,
                shards=settings.aggregates_shards,
                rollup_after_seconds=settings.aggregates_rollup_after_seconds,
                max_buffer_seconds=settings.aggregates_max_buffer_seconds,
                max_categories=settings.aggregates_max_categories,
            ),
        )
        relay.closers = closers
        return relay

    async def close(self) -> None:
        if self.aggregates is not None:
            await self.aggregates.close()
        await self.smtp.close()
        await self.storage.close()
        for close in self.closers:
            await close()

    # --- the stage ------------------------------------------------------------------------------

    async def handle(self, body: bytes | str, queue_message_id: str, dequeue_count: int = 1) -> Handled:
        with self.instruments.tracer.start_as_current_span("hve_relay.send") as span:
            if self.scheduler is None and self.backlog.sample_due(self.clock()):
                # From the first message on, not only once bookings start: the drain rate is the
                # fall of the backlog between two readings, all instances together.
                await self._sample_backlog(self.clock())
            handled = await self._handle(body, queue_message_id, dequeue_count)
            self.backlog.note_handled(self.clock())
            span.set_attribute("hve.request_id", handled.request_id)
            span.set_attribute("hve.outcome", handled.state)
            span.set_attribute("hve.dequeue_count", dequeue_count)
            if handled.account:
                span.set_attribute("hve.account", handled.account)
            if handled.code:
                span.set_attribute("hve.smtp.code", handled.code)
            self.instruments.messages.add(1, {"outcome": handled.state, "account": handled.account or "-"})
            log.log(
                logging.DEBUG if handled.state == "pacer" else logging.INFO,
                "request %s: %s%s%s",
                handled.request_id,
                handled.state,
                f" via {handled.account}" if handled.account else "",
                f" ({mask_addresses(handled.reason)})" if handled.reason else "",
            )
            return handled

    async def _handle(self, body: bytes | str, queue_message_id: str, dequeue_count: int) -> Handled:
        received = self.clock()
        key = self.settings.recipient_hash_key
        try:
            doc = decode_queue_body(body)
            if PACER_KEY in doc and len(doc) == 1:
                return await self._pace()
            claim = claim_check_of(doc)
            # Without an id the request is its content, never the queue message id: the host's poison
            # copy and a replay are new queue messages, yet must map to the same row and Message-ID.
            request_id = (claim.id if claim else parse_request_id(doc.get("id"))) or content_request_id(body)
            if doc.get("id") is not None:
                # A producer's claim on an id of the relay's own namespaces (`c-`, `welcome-`) is set
                # aside under its queue message id: it never takes (or touches) the row of that id.
                check_id_claim(doc, request_id, key)
        except RequestRefused as refusal:
            return await self._refuse_unread(queue_message_id, refusal, received)
        # What goes back on the queue: the caller's message, now carrying its id (and, for an id of
        # the relay's own, the proof that the relay gave it).
        stub = {**doc, "id": request_id}
        if is_relay_id(request_id):
            stub["idProof"] = id_proof(key, request_id)

        claimed = False
        entry: LedgerEntry | None
        if self.scheduler is not None and claim is None:
            # Nothing to wait for before sending: the claim is the row's creation (one write,
            # no read). A row that exists already (a copy, a retry, another request) is read.
            try:
                entry = await self.ledger.save(
                    LedgerEntry(
                        request_id=request_id,
                        state=SENDING,
                        first_received=_utc(received),
                        updated=_utc(received),
                        queue_message_id=queue_message_id,
                        chunks_total=0,
                        content_digest=content_digest(key, doc),
                    )
                )
                claimed = True
            except LedgerConflict:
                entry = await self.ledger.get(request_id)
        else:
            entry = await self.ledger.get(request_id)
        full: dict[str, Any] | None = None  # the request's full JSON object, once read
        if entry is not None and not claimed:
            # The id is taken: by this request (a copy, a retry, a replay) or by another one.
            try:
                same, full = await self._same_request(entry, doc, claim, request_id)
            except RequestRefused as refusal:
                return await self._refuse_unread(queue_message_id, refusal, received)
            if not same:
                return await self._refuse_unread(
                    queue_message_id,
                    RequestRefused(
                        "id-conflict",
                        "another request with different content was already received under this id; "
                        "give each request its own id",
                    ),
                    received,
                )
        if entry is not None and entry.state in FINAL_STATES:
            if claim is not None:  # a copy of ours that came back after the clean-up
                await RelayBlobs.of(self.storage, self.settings).delete_copy(request_id, claim.blob_url, logger=log)
            return Handled(request_id, "duplicate", f"already {entry.state}", entry.account, entry.last_code)
        if entry is not None and entry.state == SENDING and not claimed:
            lease_left = entry.updated.timestamp() + self.settings.sending_lease_seconds - received
            if lease_left > 0:
                delay = await self._requeue(stub, min(lease_left, BUSY_RECHECK_SECONDS), entry.attempts)
                return Handled(request_id, "busy", "another instance is sending it", entry.account, 0, delay)
        if entry is None:
            entry = LedgerEntry(
                request_id=request_id,
                state="received",
                first_received=_utc(received),
                updated=_utc(received),
                queue_message_id=queue_message_id,
                chunks_total=0,
            )
        try:
            prepared = await self._prepare(doc, claim, request_id, full)
        except RequestRefused as refusal:
            # A claim-check blob that is missing, elsewhere or another request's is not ours to delete.
            if claim is not None and refusal.reason not in ("claim-check", "blob-not-owned"):
                entry = entry.evolve(claim_blob=claim.blob_url)
            if not entry.content_digest:
                # What is known of it (the stub, when its blob could not be read): a different
                # request under this id is still told apart.
                entry = entry.evolve(content_digest=content_digest(key, doc))
            return await self._finish(entry, REFUSED, f"{refusal.reason}: {refusal.detail}")
        if claim is not None:
            entry = entry.evolve(claim_blob=claim.blob_url)
        if not entry.content_digest:
            entry = entry.evolve(content_digest=content_digest(key, prepared.full or doc))
        request = prepared.request
        internal = sum(1 for r in request.recipients if is_internal(r, self.policy.internal_domains))
        entry = entry.evolve(
            category=request.category,
            internal_recipients=internal,
            external_recipients=len(request.recipients) - internal,
            message_id=message_id(request_id, self.message_id_domain, key=key),
            chunks_total=max(entry.chunks_total, len(prepared.chunks)),
        )
        # The clock is read after the downloads: a slot is the moment the message goes, not the
        # moment the handler started.
        expired = self._expired(entry, self.clock())
        if expired:
            return await self._finish(entry, DEAD, expired)
        return await self._send_chunks(entry, stub, prepared, claimed=claimed)

    async def _full_request(self, doc: dict, claim: Any, request_id: str) -> dict:
        """The request's JSON object: the message itself, or what its claim check points at (a blob
        of this request's own; see shared/send/blobs.py)."""
        if claim is None:
            return doc
        full = decode_queue_body(await self.payloads.read(claim.blob_url, "claim check", request_id, claim_check=True))
        if full.get("id") not in (None, request_id):
            raise RequestRefused("claim-check", "the id in the blob differs from the id on the queue")
        return {**full, "id": request_id}

    async def _same_request(
        self, entry: LedgerEntry, doc: dict, claim: Any, request_id: str
    ) -> tuple[bool, dict | None]:
        """Whether this message is the request the row was made for (by the keyed digest of its
        content, contract.content_digest), and its full object if it had to be read."""
        key = self.settings.recipient_hash_key
        if not entry.content_digest:
            return True, None  # a row written before digests were kept: it cannot tell
        if claim is not None and claim.blob_url == entry.claim_blob:
            return True, None  # the very blob the row was made from (it may be deleted by now)
        if content_digest(key, doc) == entry.content_digest:
            return True, None
        if claim is None:
            return False, None
        full = await self._full_request(doc, claim, request_id)
        return content_digest(key, full) == entry.content_digest, full

    async def _prepare(self, doc: dict, claim: Any, request_id: str, full: dict | None = None) -> _Prepared:
        """Read the full request (claim check, blob attachments), validate it, check its size."""
        if full is None:
            full = await self._full_request(doc, claim, request_id)
        request = validate_request(full, self.policy)
        attachments = await self._attachments(request, request_id)
        recipients = list(dict.fromkeys(r.addr for r in request.recipients))
        prepared = _Prepared(
            request,
            attachments,
            recipients,
            chunk_recipients(range(len(recipients)), self.limits.recipients_per_message),
            full=full,
        )
        # Built once here for the size check, and reused if the first chunk goes out as this account.
        prepared.first = self._message(prepared, request_id, self.settings.accounts[0], 0, self.clock())
        size = len(prepared.first)
        if self.limits.message_bytes is not None and size > self.limits.message_bytes:
            raise RequestRefused(
                "too-large", f"the encoded message is {size} bytes; the limit is {self.limits.message_bytes}"
            )
        return prepared

    async def _attachments(self, request: MailRequest, request_id: str) -> list[tuple[str, str, bytes]]:
        """The attachments' bytes, bounded before anything is read: their number, then the sum of
        their sizes (blob properties, base64 overhead included) against the message size limit. A
        few hundred bytes naming one big blob many times are refused without a download."""
        if len(request.attachments) > self.settings.max_attachments:
            raise RequestRefused(
                "too-many-attachments",
                f"{len(request.attachments)} attachments; the limit is {self.settings.max_attachments}",
            )
        limit = self.limits.message_bytes
        # Every blob is checked to be this request's (shared/send/blobs.py) before anything of any is read.
        for i, a in enumerate(request.attachments):
            if a.blob_url is not None:
                self.payloads.locate(a.blob_url, request_id, f"attachments[{i}].blobUrl")
        sizes = [
            len(a.content)
            if a.content is not None
            else await self.payloads.size(a.blob_url or "", f"attachment {a.name!r}", request_id)
            for a in request.attachments
        ]
        estimate = sum(mime_base64_size(size) for size in sizes)
        if limit is not None and estimate > limit:
            raise RequestRefused(
                "too-large", f"the attachments take about {estimate} bytes encoded; the message limit is {limit}"
            )
        # What the blobs may still grow by before the limit: a blob that grew past it since its size
        # was read is refused at that many bytes, never read whole.
        slack = (limit - estimate) * 3 // 4 if limit is not None else None
        out: list[tuple[str, str, bytes]] = []
        for a, size in zip(request.attachments, sizes, strict=False):
            if a.content is None:
                data = await self.payloads.read(
                    a.blob_url or "", f"attachment {a.name!r}", request_id, size + slack if slack is not None else None
                )
                if slack is not None:
                    slack -= max(0, len(data) - size)
                out.append((a.name, a.content_type, data))
            else:
                out.append((a.name, a.content_type, a.content))
        return out

    def _message(self, prepared: _Prepared, request_id: str, account: str, index: int, now: float) -> bytes:
        # Transaction `index` > 0 (another chunk, or a follow-up for recipients HVE deferred) has
        # its own Message-ID suffix, or Exchange would drop it as a duplicate of the first.
        return build_message(
            prepared.request,
            request_id=request_id,
            account=account,
            message_id_key=self.settings.recipient_hash_key,
            sender_name=self.settings.sender_name,
            message_id_domain=self.message_id_domain,
            attachments=prepared.attachments,
            now=_utc(now),
            chunk=index,
        )

    def _envelope(self, entry: LedgerEntry, prepared: _Prepared, index: int) -> list[int] | None:
        """Recipient indices of transaction `index`: a planned chunk, then follow-ups for the
        recipients HVE deferred at RCPT; None when nothing is left to send."""
        refused = set(entry.refused_recipients)
        if index < len(prepared.chunks):
            return [i for i in prepared.chunks[index] if i not in refused]
        pending = [i for i in entry.pending_recipients if i not in refused]
        return pending[: self.limits.recipients_per_message or len(pending)] or None

    async def _send_chunks(
        self, entry: LedgerEntry, stub: dict, prepared: _Prepared, *, claimed: bool = False
    ) -> Handled:
        """Each transaction (a chunk, or a follow-up) gets its own slot; progress is saved in the
        ledger after every accepted transaction, so a retry resumes at the first one not sent.
        `claimed`: this delivery created the row as `sending` a moment ago (the plain path)."""
        index = entry.chunks_sent
        deferred_here = False
        while (envelope := self._envelope(entry, prepared, index)) is not None:
            if not envelope:  # every recipient of this chunk was refused for good earlier
                index += 1
                entry = entry.evolve(chunks_sent=index)
                continue
            if index >= len(prepared.chunks) and deferred_here:
                # HVE deferred some recipients a moment ago: they go in a follow-up, later.
                return await self._retry_later(
                    entry, stub, f"{len(entry.pending_recipients)} recipient(s) deferred by HVE"
                )
            addresses = [prepared.recipients[i] for i in envelope]
            internal = sum(1 for a in addresses if a.rsplit("@", 1)[1].lower() in self.policy.internal_domains)
            shape = Shape(internal, len(addresses) - internal, prepared.request.account)
            booking = (entry.booked_account, entry.booked_at) if entry.booked_chunk == index else None
            if self.scheduler is not None:
                slot = await self._plain_slot(entry, stub, shape)
            else:
                slot = await self._slot(entry, stub, shape, index, self.clock())
            if isinstance(slot, Handled):
                return slot
            account, slot_at, entry = slot
            # A booked slot is the request's, not this delivery's: a duplicate delivery of the
            # request holds the same one, so losing the claim to it must not give the slot back.
            shared = booking == (account, slot_at)
            sent = await self._transaction(
                entry, stub, prepared, index, envelope, account, slot_at, shape, shared_slot=shared, claimed=claimed
            )
            claimed = False  # from here on each transaction renews the claim with its own write
            if isinstance(sent, Handled):
                return sent
            deferred_here = deferred_here or len(sent.pending_recipients) > len(entry.pending_recipients)
            entry = sent
            index += 1
        self.instruments.recipients.add(entry.internal_recipients, {"kind": "internal"})
        self.instruments.recipients.add(entry.external_recipients, {"kind": "external"})
        state, reason = self._outcome_of(entry, prepared)
        if entry.state == state and entry.reason == reason:
            # Written with the last transaction's progress (the plain path): one write, not two.
            return await self._finished(entry)
        return await self._finish(entry, state, reason)

    @staticmethod
    def _outcome_of(entry: LedgerEntry, prepared: _Prepared) -> tuple[str, str]:
        """The final state and reason of a request whose transactions are all done."""
        everyone = len(prepared.recipients)
        if len(entry.refused_recipients) >= everyone:
            return REFUSED, (
                f"refused by HVE: all {everyone} recipient(s); last reply {entry.last_code} {entry.last_reply}"
            )[:300]
        return SENT, f"{len(entry.refused_recipients)} recipient(s) refused by HVE" if entry.refused_recipients else ""

    async def _plain_slot(
        self, entry: LedgerEntry, stub: dict, shape: Shape
    ) -> tuple[str, float, LedgerEntry] | Handled:
        """The account to send on now, or the request back on the queue while every account rests."""
        now = self.clock()
        decision = await self.scheduler.decide(shape, now) if self.scheduler is not None else None
        if isinstance(decision, Refuse):
            return await self._finish(entry, REFUSED, f"over-limit: {decision.reason}")
        if isinstance(decision, Later):
            if now + decision.delay - entry.first_received.timestamp() > self.settings.max_age_seconds:
                return await self._finish(entry, DEAD, f"no send slot before the age limit ({decision.reason})")
            delay = await self._requeue(stub, decision.delay, entry.attempts)
            await self._save_quietly(
                entry.evolve(state=DEFERRED, reason=f"waiting: {decision.reason}", updated=_utc(now))
            )
            return Handled(entry.request_id, DEFERRED, decision.reason, "", 0, delay)
        assert decision is not None
        return decision.account, decision.at, entry

    async def _transaction(
        self,
        entry: LedgerEntry,
        stub: dict,
        prepared: _Prepared,
        index: int,
        envelope: list[int],
        account: str,
        slot_at: float,
        shape: Shape,
        *,
        shared_slot: bool = False,
        claimed: bool = False,
    ) -> LedgerEntry | Handled:
        """One SMTP transaction on a granted slot; the new entry when HVE accepted it."""
        addresses = [prepared.recipients[i] for i in envelope]
        lapse = self.settings.pacing_margin_seconds / 2
        original_slot = slot_at
        trying = entry.evolve(account=account, attempts=entry.attempts + 1, reason="")
        called_off = ""

        async def before_mail() -> bool:
            # The moment that counts at HVE. A grant that got old waiting for a session is taken
            # again (or given back), and only now is the request claimed in the ledger, so the
            # claim's lease never runs out while the message still waits for a session.
            nonlocal slot_at, trying, called_off
            now = self.clock()
            if claimed and now - trying.updated.timestamp() < self.settings.sending_lease_seconds / 2:
                return True  # the row was created as `sending` by this delivery a moment ago
            if self.scheduler is None and now - slot_at > lapse:
                new_at = await self.governor.recheck(account, slot_at, shape, now)
                if new_at is None:
                    called_off = "lapsed"
                    return False
                slot_at = new_at
            try:
                trying = await self.ledger.save(trying.evolve(state=SENDING, updated=_utc(now), chunks_sent=index))
            except LedgerConflict:
                called_off = "claimed"
                return False
            return True

        if index == 0 and account == self.settings.accounts[0] and prepared.first is not None:
            message = prepared.first
        else:
            message = self._message(prepared, entry.request_id, account, index, self.clock())
        result = await self.smtp.submit(account, addresses, message, before_mail=before_mail)
        if called_off == "claimed":
            # Another delivery of the same request got there first; let it finish. Its slot is
            # given back unless it is the booking the other delivery sends on.
            if self.scheduler is not None:
                self.scheduler.give_back(shape.recipients)
            elif not (shared_slot and slot_at == original_slot):
                await self.governor.refund(Release(account, slot_at, shape))
            delay = await self._requeue(stub, BUSY_RECHECK_SECONDS, entry.attempts)
            return Handled(entry.request_id, "busy", "another instance claimed it", account, 0, delay)
        if called_off == "lapsed":
            # recheck gave the slot back already.
            self.stats.lapsed += 1
            delay = await self._requeue(stub, LAPSED_RETRY_SECONDS, entry.attempts)
            await self._save_quietly(
                entry.evolve(
                    state=DEFERRED,
                    reason="waiting: the slot lapsed before an SMTP session was ready",
                    updated=_utc(self.clock()),
                )
            )
            return Handled(entry.request_id, DEFERRED, "slot lapsed", account, 0, delay)

        verdict = result.verdict
        now = self.clock()
        self.instruments.smtp_replies.add(1, {"code": verdict.enhanced or str(verdict.code), "account": account})
        if self.aggregates is not None:
            self.aggregates.replies(now, account, entry.category, reply_labels(result, len(envelope)))
        # Throttling at RCPT teaches the governor as much as at DATA.
        feedback = verdict if verdict.throttled else next((v for v in result.deferred.values() if v.throttled), verdict)
        await self.governor.report(account, feedback, now)
        refused_now = [i for i, a in zip(envelope, addresses, strict=False) if a in result.refused]
        deferred_now = [i for i, a in zip(envelope, addresses, strict=False) if a in result.deferred]
        trying = trying.evolve(
            last_code=verdict.code,
            last_reply=verdict.text[:300],
            updated=_utc(now),
            refused_recipients=tuple(sorted(set(trying.refused_recipients) | set(refused_now))),
        )
        if verdict.outcome is not Outcome.SENT:
            if not result.maybe_delivered:
                # Definitely not delivered: the charge goes back. (A reply lost after DATA keeps it.)
                if self.scheduler is not None:
                    self.scheduler.give_back(shape.recipients)
                else:
                    await self.governor.refund(Release(account, slot_at, shape))
            if len(refused_now) == len(envelope):
                # Every recipient of this transaction refused for good at RCPT: the others of the
                # request (other chunks) still go; the ledger names these by index.
                return await self._save_progress(trying.evolve(chunks_sent=index + 1))
            return await self._not_sent(trying, stub, verdict, account, now)
        pending = [i for i in trying.pending_recipients if i not in envelope] + deferred_now
        done = trying.evolve(
            chunks_sent=index + 1,
            pending_recipients=tuple(pending),
            chunks_total=max(trying.chunks_total, index + (2 if pending else 1)),
        )
        finished_by_other = False
        if self.scheduler is not None and self._envelope(done, prepared, index + 1) is None:
            # Nothing left to send: the progress write is the final one (and the recipient index
            # below comes after it, as it does after progress). Counted by `_finished` only when
            # this write made the row final.
            state, reason = self._outcome_of(done, prepared)
            done, finished_by_other = await self._save_final(done.evolve(state=state, reason=reason))
        else:
            # Progress is durable before the next slot is asked for: a crash or a failed governor
            # call from here on never sends this transaction again.
            done = await self._save_progress(done)
        accepted = [
            a for i, a in zip(envelope, addresses, strict=False) if i not in refused_now and i not in deferred_now
        ]
        if done.chunks_total > 1:
            await self.ledger.record_chunk(
                done,
                index,
                account=account,
                recipients=len(accepted),
                code=verdict.code,
                message_id=message_id(
                    done.request_id, self.message_id_domain, index, key=self.settings.recipient_hash_key
                ),
            )
        await self.ledger.index_recipients(done.evolve(state=SENT), accepted)
        if finished_by_other:
            return Handled(
                done.request_id, "duplicate", f"already {done.state} by another delivery", account, verdict.code
            )
        return done

    async def _save_progress(self, entry: LedgerEntry) -> LedgerEntry:
        try:
            return await self.ledger.save(entry)
        except LedgerConflict:
            # The row changed under us (a duplicate delivery waiting out our lease looked at it):
            # what HVE accepted is the truth, so our progress wins, unless that delivery finished
            # the request meanwhile: a final row stays final (our next write then finds it so, and
            # counts nothing), never `sending` again.
            current = await self.ledger.get(entry.request_id)
            if current is not None and current.state in FINAL_STATES:
                return entry
            return await self.ledger.put(entry)

    async def _save_final(self, entry: LedgerEntry) -> tuple[LedgerEntry, bool]:
        """Write the final row; (the row, whether another delivery had made it final already, so
        this one counts nothing). A write whose answer was lost is recognised as ours."""
        try:
            return await self.ledger.save(entry), False
        except LedgerConflict as conflict:
            current = await self.ledger.get(entry.request_id)
            if current is not None and current.state in FINAL_STATES:
                return current, not self.ledger.landed(conflict, current)
            return await self.ledger.put(entry), False

    async def _retry_later(self, entry: LedgerEntry, stub: dict, why: str) -> Handled:
        now = self.clock()
        expired = self._expired(entry, now)
        if expired:
            return await self._finish(entry, DEAD, f"{expired}; {why}")
        wait = retry_delay(entry.attempts, self.settings.retry_base_seconds, self.settings.retry_max_seconds, self.rng)
        delay = await self._requeue(stub, wait, entry.attempts)
        await self._save_quietly(entry.evolve(state=DEFERRED, reason=why, updated=_utc(now)))
        return Handled(entry.request_id, DEFERRED, why, entry.account, entry.last_code, delay)

    async def _slot(
        self, entry: LedgerEntry, stub: dict, shape: Shape, index: int, now: float
    ) -> tuple[str, float, LedgerEntry] | Handled:
        """The account and slot time to send transaction `index` on now (with the entry minus a
        used-up booking), or what became of the request when it cannot go now (booked, waiting,
        refused, dead)."""
        release = None
        if entry.booked_account and entry.booked_chunk == index:
            if entry.booked_wake:
                self.return_latency.observe(now - entry.booked_wake)
            if now < entry.booked_at:
                early = entry.booked_at - now
                if early > self.settings.slot_wait_seconds + 1:  # (+1: wakes are whole seconds)
                    # Far from the slot (a redelivery): sleep again on the queue, not here.
                    delay = await self._requeue(
                        stub, early - self.return_latency.early_wake(), entry.attempts, jitter=False
                    )
                    return Handled(
                        entry.request_id, DEFERRED, "booked slot not reached", entry.booked_account, 0, delay
                    )
                # Woke early on purpose (see shared/governor/preview/queue_timing.py): the slot is a moment away.
                await self.sleep(early)
                now = max(self.clock(), entry.booked_at)
            booked, booked_at = entry.booked_account, entry.booked_at
            entry = entry.evolve(booked_account="", booked_at=0.0, booked_chunk=-1, booked_wake=0.0)
            # Late by up to half the margin is safe: the other half covers the SMTP exchange. An
            # account this process saw start resting since is not used (no extra round trip).
            if now <= booked_at + self.settings.pacing_margin_seconds / 2 and not self.governor.known_resting(
                booked, now
            ):
                return booked, booked_at, entry
            # Later than that: the booking is given back in the same write that takes the next
            # slot, which is now if the windows allow it.
            release = Release(booked, booked_at, shape)
            self.stats.late += 1
        lead = await self._backlog_lead(now)
        # While a backlog's drain rate is not known yet (a first reading), nothing is booked: the
        # request waits unbooked for its earliest slot (no slot held, so none can go unused).
        # An account's window opening before the middle of the estimate's band (plain to padded)
        # is left to the backlog's fresh messages; one after it is booked at the padded end. (The
        # first readings err either way by about 10%: with one instance draining 217 s, openings
        # at +186 were booked at the padded end, came back behind it and were lost; with four
        # draining 55 s, skipping the +62 opening left it empty.)
        plain = self.backlog.lead(now, padded=False) or 0.0
        decision = await self.governor.acquire(
            shape,
            now,
            release=release,
            allow_booking=lead is not None,
            book_not_before=now + (lead or 0.0),
            backlog_until=now + (plain + (lead or 0.0)) / 2,
        )
        if release is not None and not (isinstance(decision, Grant) and decision.at <= now):
            self.stats.late_rebooked += 1
        if isinstance(decision, Impossible):
            return await self._finish(entry, REFUSED, f"over-limit: {decision.reason}")
        if isinstance(decision, Wait):
            if decision.until - entry.first_received.timestamp() > self.settings.max_age_seconds:
                return await self._finish(entry, DEAD, f"no send slot before the age limit ({decision.reason})")
            delay = await self._requeue(stub, decision.until - now, entry.attempts)
            await self._save_quietly(
                entry.evolve(state=DEFERRED, reason=f"waiting: {decision.reason}", updated=_utc(now))
            )
            return Handled(entry.request_id, DEFERRED, decision.reason, "", 0, delay)
        if decision.at > now:
            # Back on the queue to wake as much before the slot as booked messages come back late.
            # (Whole seconds, rounded down: at least that early.)
            wake_in = max(0, math.floor(decision.at - now - self.return_latency.early_wake() + 1e-6))
            delay = await self._requeue(stub, wake_in, entry.attempts, jitter=False)
            await self._save_quietly(
                entry.evolve(
                    state=DEFERRED,
                    reason=f"booked a slot on {decision.account}",
                    updated=_utc(now),
                    booked_account=decision.account,
                    booked_at=decision.at,
                    booked_chunk=index,
                    booked_wake=now + delay,
                )
            )
            await self._keep_host_polling(decision.at)
            return Handled(entry.request_id, DEFERRED, "booked", decision.account, 0, delay)
        return decision.account, decision.at, entry

    async def _not_sent(self, entry: LedgerEntry, stub: dict, verdict: Verdict, account: str, now: float) -> Handled:
        if verdict.outcome is Outcome.REFUSE:
            return await self._finish(entry, REFUSED, f"refused by HVE: {verdict.code} {verdict.text}"[:300])
        # DEFER or ACCOUNT: the message is fine; try again later, maybe on another account.
        expired = self._expired(entry, now, count_attempts=verdict.outcome is Outcome.DEFER)
        if expired:
            return await self._finish(entry, DEAD, f"{expired}; last reply {verdict.code} {verdict.text}"[:300])
        if verdict.outcome is Outcome.ACCOUNT:
            if not verdict.code:
                # A local failure (a credential read): this process leaves the account alone for
                # a moment; nothing is shared, the account itself may be fine.
                self.governor.hold_locally(account, LOCAL_HOLD_SECONDS)
            wait, why = ACCOUNT_RETRY_SECONDS, f"account {account} unavailable: {verdict.code} {verdict.text}"[:300]
        else:
            wait = retry_delay(
                entry.attempts, self.settings.retry_base_seconds, self.settings.retry_max_seconds, self.rng
            )
            why = f"transient: {verdict.code} {verdict.text}"[:300]
        delay = await self._requeue(stub, wait, entry.attempts)
        await self._save_quietly(entry.evolve(state=DEFERRED, reason=why))
        return Handled(entry.request_id, DEFERRED, why, account, verdict.code, delay)

    async def _backlog_lead(self, now: float) -> float | None:
        """Seconds until the queue's visible backlog is drained (0 when none, None when not known
        yet)."""
        if self.backlog.sample_due(now):
            await self._sample_backlog(now)
        return self.backlog.lead(now)

    async def _sample_backlog(self, now: float) -> None:
        """One queue read per HVE_BACKLOG_SAMPLE_SECONDS per process while it handles messages."""
        self.backlog.asking(now)
        try:
            queued = (await self.queue.get_queue_properties()).approximate_message_count or 0
        except Exception as exc:  # an estimate: without it, bookings are made as before
            log.debug("queue length unknown: %s", exc)
            return
        ahead = self.governor.booked_ahead(now)
        fresh_enough = self.backlog.sample_seconds / 2
        if queued - ahead > self.backlog.min_messages and self.governor.snapshot_age() > fresh_enough:
            # While there is a backlog, the bookings are read with each reading: other instances'
            # bookings this process has not read yet look like backlog (four instances book
            # hundreds a second while they drain one), and a view up to the governor's snapshot
            # age would skew both the backlog and its fall.
            await self.governor.refresh(older_than=fresh_enough)
            ahead = self.governor.booked_ahead(now)
        self.backlog.observe(now, queued, ahead)

    # --- keeping the host's polling short while bookings are ahead ------------------------------

    async def _keep_host_polling(self, booked_at: float) -> None:
        """The Functions host backs its polling off to maxPollingInterval (a minute on Azure) while
        the queue looks empty, and booked messages then come back late. While bookings are ahead, a
        tiny pacer message comes back every HVE_PACER_SECONDS, so some instance keeps polling often.
        A chain is started when none has ticked here for two intervals (its pacers may be stuck
        behind a backlog); chains that meet in one process merge, so a process keeps about one.
        A chain ends once the process handling its pacer knows of no booking ahead."""
        interval = self.settings.pacer_seconds
        now = self.clock()
        if interval <= 0 or booked_at - now <= interval or now - self._pacer_seen < 2 * interval:
            return
        self._pacer_seen = now
        await self._send_pacer(interval)

    async def _pace(self) -> Handled:
        interval = self.settings.pacer_seconds
        now = self.clock()
        previous, self._pacer_seen = self._pacer_seen, now
        if interval <= 0:
            return Handled("pacer", "pacer", "pacing is off")
        if now - previous < interval / 2:
            # Two chains ticking here together (pacers held back behind a backlog come back as a
            # crowd, and each booking meanwhile started a chain): one is enough, this one ends.
            return Handled("pacer", "pacer", "another chain ticked here moments ago: this one ends")
        if self.governor.snapshot_age() > PACER_STATE_MAX_AGE_SECONDS:
            await self.governor.refresh(older_than=PACER_STATE_MAX_AGE_SECONDS)
        if self.governor.latest_slot() <= now + interval:
            return Handled("pacer", "pacer", "no booking ahead: the chain ends")
        await self._send_pacer(interval)
        return Handled("pacer", "pacer", f"next tick in {interval:g} s")

    async def _send_pacer(self, interval: float) -> None:
        await self.queue.send_message(
            json.dumps({PACER_KEY: 1}),
            visibility_timeout=math.ceil(interval),
            time_to_live=max(60, math.ceil(10 * interval)),
        )

    # --- helpers --------------------------------------------------------------------------------

    def _expired(self, entry: LedgerEntry, now: float, count_attempts: bool = True) -> str:
        if count_attempts and entry.attempts >= self.settings.max_attempts:
            return f"gave up after {entry.attempts} attempts"
        age = now - entry.first_received.timestamp()
        if age > self.settings.max_age_seconds:
            return f"gave up after {age / 3600:.1f} hours"
        return ""

    async def _requeue(self, stub: dict, wait_seconds: float, attempts: int, *, jitter: bool = True) -> int:
        """A copy of the caller's message, carrying its id and (for people reading the queue) the
        attempts so far; the ledger, not this field, is what the relay trusts."""
        delay = visibility_for(wait_seconds, jitter_fraction=0.1 if jitter else 0.0, rng=self.rng)
        stub = {**stub, "attempt": attempts}
        text = queue_text(stub)
        if not fits_on_queue(text):
            # The caller's message fitted, but not with its id and attempts added: the copy travels by
            # claim check (once: later copies re-enqueue the small stub).
            # (In RELAY_STATE_CONTAINER, which no producer can write.)
            url = await self.payloads.store(stub["id"], text.encode("utf-8"))
            copy = {"id": stub["id"], "claimCheck": {"blobUrl": url}, "attempt": attempts}
            if "idProof" in stub:
                copy["idProof"] = stub["idProof"]
            text = queue_text(copy)
        # time_to_live=-1: a deferred request must never expire silently on the queue.
        await self.queue.send_message(text, visibility_timeout=delay, time_to_live=-1)
        return delay

    async def _finish(self, entry: LedgerEntry, state: str, reason: str) -> Handled:
        entry = entry.evolve(state=state, reason=reason, updated=_utc(self.clock()))
        await self._save_quietly(entry)
        if state in FINAL_STATES:
            await self._delete_claim_check(entry)
        return Handled(entry.request_id, state, reason, entry.account, entry.last_code)

    async def _finished(self, entry: LedgerEntry) -> Handled:
        """A request whose final row is written already: counted, its blobs deleted."""
        self._count(entry)
        await self._delete_claim_check(entry)
        return Handled(entry.request_id, entry.state, entry.reason, entry.account, entry.last_code)

    async def _delete_claim_check(self, entry: LedgerEntry) -> None:
        """Best effort, after the outcome is recorded: the request's claim-check blob and the
        copies the relay wrote for it (shared/send/relay_blobs.py). A blob left behind is for the
        lifecycle rule (infra/) and `purge_expired` to delete, never a reason to fail or retry the
        request. Only the relay's prefixes: what else is in the container (attachments) belongs to
        the producer."""
        await RelayBlobs.of(self.storage, self.settings).delete_for_request(
            entry.request_id, entry.claim_blob, logger=log
        )

    async def _save_quietly(self, entry: LedgerEntry) -> None:
        """Record an outcome. On a lost ETag race our row still wins, unless the other one is final
        or another instance is sending right now (its outcome will follow)."""
        try:
            await self.ledger.save(entry)
        except LedgerConflict as conflict:
            current = await self.ledger.get(entry.request_id)
            if current is not None and current.state in FINAL_STATES:
                if self.ledger.landed(conflict, current):
                    self._count(entry)  # our write made it final; only its answer was lost
                return
            if (
                current is not None
                and current.state == SENDING
                and entry.state != SENDING
                and current.updated.timestamp() + self.settings.sending_lease_seconds > self.clock()
                and entry.state not in FINAL_STATES
            ):
                return
            await self.ledger.put(entry)
        # Counted only here, once our row is written: a row already final returned above, so a
        # retry or a duplicate delivery of a finished request is never counted again.
        self._count(entry)

    def _count(self, entry: LedgerEntry) -> None:
        if self.aggregates is None:
            return
        if entry.state in FINAL_STATES:
            self.aggregates.outcome(
                self.clock(),
                entry.account,
                entry.category,
                entry.state,
                internal=entry.internal_recipients,
                external=entry.external_recipients,
            )
            if entry.state == SENT:  # latency: first seen -> the ledger's record of HVE's last 250
                seconds = (entry.updated - entry.first_received).total_seconds()
                self.aggregates.latency(self.clock(), entry.account, entry.category, seconds)
            if entry.state == REFUSED and entry.reason.startswith("id-conflict:"):
                # Of the refused, those that came under an id another request had taken.
                self.aggregates.add(self.clock(), entry.account, entry.category, {"requests.id-conflict": 1})
        elif entry.state == DEFERRED:
            self.aggregates.deferral(self.clock(), entry.account, entry.category)

    async def _refuse_unread(self, queue_message_id: str, refusal: RequestRefused, now: float) -> Handled:
        """A message that cannot even be read is recorded under its queue message id and set aside."""
        entry = LedgerEntry(
            request_id=queue_message_id,
            state=REFUSED,
            first_received=_utc(now),
            updated=_utc(now),
            reason=f"{refusal.reason}: {refusal.detail}",
            queue_message_id=queue_message_id,
        )
        try:
            await self.ledger.save(entry)  # created: counted once; a second delivery finds the row
            self._count(entry)
        except LedgerConflict:
            await self.ledger.put(entry)
        return Handled(queue_message_id, REFUSED, entry.reason)


@dataclass
class _Prepared:
    request: MailRequest
    attachments: list[tuple[str, str, bytes]]
    recipients: list[str]  # envelope addresses, de-duplicated; the ledger names them by index
    chunks: list[list[int]]  # recipient indices of each planned SMTP transaction
    first: bytes | None = None  # the message of chunk 0 as the first account
    full: dict[str, Any] | None = None  # the request's JSON object (for its content digest)


@dataclass
class RelayStats:
    """Counts for the simulation and the benchmarks (per process)."""

    late: int = 0  # requests that came back after their booked slot plus the tolerance
    late_rebooked: int = 0  # ...of which could not go at once and were booked again (or wait)
    lapsed: int = 0  # grants that got old waiting for an SMTP session and were not taken again
