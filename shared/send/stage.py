"""The send stage: one queue message in, one recorded outcome out.

It trusts nothing from the producer: the body is decoded and validated here, the ledger is the
truth about attempts and duplicates, and the queue is the only way to try again later (a copy is
re-enqueued with a visibility delay). The function holds a message only for a booked slot a few
seconds away (the 2024 preview's per-minute windows); every longer wait is a visibility delay.

`Relay.handle` reads as the steps, each in its own module:

    decode (decode.py) -> ledger gate (ledger_gate.py) -> prepare (prepare.py)
      -> hold (hold.py: back on the queue while its sendAt is ahead)
      -> for each chunk: schedule (schedule.py) -> transmit (transmit.py) -> record (record.py)

The Relay holds what the steps share (settings, clients, clock, governor, per-process state).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shared.governor.pacing import PacingConfig
from shared.governor.preview.queue_timing import BacklogEstimator, ReturnLatency
from shared.governor.scheduler import BudgetedScheduler, PlainScheduler
from shared.governor.table import TableGovernor
from shared.hve.credentials import KeyVaultPasswords, LocalPasswords, TokenSource, azure_credential, check_secret_names
from shared.hve.limits import Limits, resolve_limits
from shared.hve.smtp import AUTH_FAILURE_HOLD_SECONDS, BasicAuth, HveSmtp, OAuthAuth, tls_context
from shared.ledger import Ledger, LedgerEntry
from shared.reporting.aggregates import Aggregates
from shared.send.blobs import BlobReader
from shared.send.contract import ValidationPolicy
from shared.send.decode import PacerTick, Unreadable, decode
from shared.send.events import OutcomeEvents
from shared.send.hold import hold_until_due
from shared.send.ledger_gate import LedgerGate
from shared.send.outcome import Handled, RelayStats
from shared.send.pacer import Pacer
from shared.send.prepare import Prepared, Preparer, envelope_of
from shared.send.record import Recorder, outcome_of
from shared.send.replies import mask_addresses
from shared.send.schedule import Slots
from shared.send.transmit import Transmit
from shared.settings import UNSET_HASH_KEY, Settings
from shared.storage import StorageClients
from shared.telemetry import Instruments

__all__ = ["Handled", "Relay", "RelayStats", "pacing_config"]

log = logging.getLogger("hve_relay.sender")


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
        lapse_room_seconds=settings.pacing_margin_seconds,
    )


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
        # The steps.
        self.gate = LedgerGate(self)
        self.preparer = Preparer(self)
        self.slots = Slots(self)
        self.transmit = Transmit(self)
        self.recorder = Recorder(self)
        self.pacer = Pacer(self)
        self.events = OutcomeEvents(self)  # after record: the outcome event, before the message goes

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
        await self.events.close()
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
                await self.pacer.sample_backlog(self.clock())
            handled = await self._handle(body, queue_message_id)
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
            await self.events.after(handled, dequeue_count)  # raises: the message must come back
            return handled

    async def _handle(self, body: bytes | str, queue_message_id: str) -> Handled:
        received = self.clock()
        decoded = decode(body, self.settings.recipient_hash_key)
        if isinstance(decoded, PacerTick):
            return await self.pacer.tick()
        if isinstance(decoded, Unreadable):
            return await self.recorder.refuse_unread(queue_message_id, decoded.refusal, received)
        admitted = await self.gate.admit(decoded, queue_message_id, received)
        if isinstance(admitted, Handled):  # duplicate, busy, id conflict
            return admitted
        ready = await self.preparer.prepare(admitted, decoded)
        if isinstance(ready, Handled):  # refused, or past its age
            return ready
        entry, prepared = ready
        held = await hold_until_due(self, entry, decoded.stub)  # sendAt still ahead: back on the queue until then
        if held is not None:
            return held
        return await self._send_chunks(entry, decoded.stub, prepared, claimed=admitted.claimed)

    async def _send_chunks(self, entry: LedgerEntry, stub: dict, prepared: Prepared, *, claimed: bool) -> Handled:
        """Each transaction (a chunk, or a follow-up) gets its own slot; progress is saved in the
        ledger after every accepted transaction, so a retry resumes at the first one not sent.
        `claimed`: this delivery created the row as `sending` a moment ago (the plain path)."""
        index = entry.chunks_sent
        deferred_here = False
        while (envelope := envelope_of(entry, prepared, index, self.limits)) is not None:
            if not envelope:  # every recipient of this chunk was refused for good earlier
                index += 1
                entry = entry.evolve(chunks_sent=index)
                continue
            if index >= len(prepared.chunks) and deferred_here:
                # HVE deferred some recipients a moment ago: they go in a follow-up, later.
                why = f"{len(entry.pending_recipients)} recipient(s) deferred by HVE"
                return await self.recorder.retry_later(entry, stub, why)
            slot = await self.slots.next(entry, stub, prepared, envelope, index)
            if isinstance(slot, Handled):  # booked, waiting, refused, dead
                return slot
            sent = await self.transmit.chunk(slot.entry, stub, prepared, index, envelope, slot, claimed=claimed)
            claimed = False  # from here on each transaction renews the claim with its own write
            if isinstance(sent, Handled):  # called off: another delivery claimed it, or the slot lapsed
                return sent
            done = await self.recorder.transaction(sent, stub, prepared, index)
            if isinstance(done, Handled):  # not sent (deferred, refused, dead), or finished by another
                return done
            deferred_here = deferred_here or len(done.pending_recipients) > len(slot.entry.pending_recipients)
            entry = done
            index += 1
        self.instruments.recipients.add(entry.internal_recipients, {"kind": "internal"})
        self.instruments.recipients.add(entry.external_recipients, {"kind": "external"})
        state, reason = outcome_of(entry, prepared)
        if entry.state == state and entry.reason == reason:
            # Written with the last transaction's progress (the plain path): one write, not two.
            return await self.recorder.finished(entry)
        return await self.recorder.finish(entry, state, reason)
