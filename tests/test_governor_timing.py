"""The governor against real peers (Azurite, the HVE emulator over TLS) where timing and faults
decide what HVE really saw: the slot is the moment of DATA, days never go backwards, a charge
follows what HVE accepted, a local credential error stays local, RCPT refusals are per recipient,
and a reply lost after DATA is never resent at once."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench.latency_proxy import LatencyProxy
from bench.simulate import VirtualClock, VirtualQueue
from shared.hve.smtp import HveSmtp, BasicAuth, SessionLease, tls_context
from shared.hve.credentials import LocalPasswords
from shared.send.mime import message_id
from shared.governor.pacing import AccountState, PacingConfig, Shape, decide, take_slot
from shared.hve.limits import PROFILES
from shared.send.stage import Relay
from tests.relay_harness import ACCOUNTS, drain, enqueue, relay_settings

START = 1_799_920_800.0  # 2027-01-15 10:00:00 UTC
NEWS = "news@contoso.com"
CFG_WINDOW = 62.0  # the rolling minute plus the default 2 s margin


def run(coro):
    return asyncio.run(coro)


def mail(**extra):
    return {"to": ["ann@contoso.com"], "subject": "Timing", "text": "Hello", **extra}


# --- 2. the slot is the moment of DATA ----------------------------------------------------------

def test_slot_is_dated_after_slow_downloads_so_hve_never_sees_eleven_in_its_minute(storage, make_emulator):
    """Ten external requests whose attachments take 4 s to download, then an 11th: the 11th must
    come a full window after the moment the ten reached HVE, not after the moment they started."""
    clock = VirtualClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_PACER_SECONDS="0"), clock=clock)
        relay.queue = queue = VirtualQueue(clock)   # visibility delays on the virtual clock
        real_read = relay.payloads.read

        async def slow_read(*args, **kwargs):
            data = await real_read(*args, **kwargs)
            clock.t = max(clock.t, START + 4.0)       # the download took 4 s
            return data

        relay.payloads.read = slow_read
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            bodies = []
            for i in range(11):   # each request names its own copy (requests/<producer>/<id>/)
                blob = await container.upload_blob(f"requests/producer-a/slow-{i}/terms.txt", b"terms and conditions")
                attachment = [{"name": "terms.txt", "contentType": "text/plain", "blobUrl": blob.url}]
                bodies.append(json.dumps(mail(id=f"slow-{i}", to=[f"c{i}@fabrikam.example"], attachments=attachment)))
            first = await asyncio.gather(*(relay.handle(b, f"q{i}") for i, b in enumerate(bodies)))
            assert sorted(h.state for h in first) == ["deferred"] + ["sent"] * 10
            # The 11th comes back when its booking is due (the queue's visibility delay).
            [booked] = [h for h in first if h.state == "deferred"]
            entry = await relay.ledger.get(booked.request_id)
            clock.t = entry.booked_at
            [again] = queue.receive(clock.t, 16)
            return first, await relay.handle(again.body, again.message_id), entry
        finally:
            await relay.close()

    first, last, entry = run(main())
    # HVE saw the ten at START+4: the 11th's slot is a window (60 s + 2 s margin) after that.
    assert entry.booked_at >= START + 4.0 + 62.0
    assert last.state == "sent", last
    assert emulator.stats()["replies"].get("4.5.104", 0) == 0


def test_pool_wait_is_bounded_and_a_message_that_waits_too_long_is_deferred_unsent(emulator):
    """One session per account, held by a slow transaction: the next message gives up waiting
    after HVE_POOL_WAIT_SECONDS instead of waiting past its slot, and nothing is sent for it."""
    async def main():
        with LatencyProxy(emulator.port, rtt_ms=400) as proxy:
            smtp = HveSmtp(host="127.0.0.1", port=proxy.port, authenticator=BasicAuth(LocalPasswords(ACCOUNTS)),
                           context=tls_context(str(emulator.ca_file)), pool_size=1, pool_wait=0.3)
            try:
                slow = asyncio.ensure_future(smtp.submit(NEWS, ["a@contoso.com"], b"Subject: one\r\n\r\nbody\r\n"))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                waited = await smtp.submit(NEWS, ["b@contoso.com"], b"Subject: two\r\n\r\nbody\r\n")
                return await slow, waited, time.monotonic() - started
            finally:
                await smtp.close()

    slow, waited, seconds = run(main())
    assert slow.verdict.code == 250
    assert waited.verdict.code == 0 and "no SMTP session free" in waited.verdict.text
    assert not waited.maybe_delivered
    assert len(emulator.messages()) == 1


def test_a_grant_that_got_old_waiting_for_a_session_is_taken_again_before_mail(storage, emulator):
    """With a slow path to HVE, the session is ready after the grant's tolerance: the relay takes
    the slot again at that moment (one slot in the log, dated when MAIL went), then sends."""
    async def main():
        with LatencyProxy(emulator.port, rtt_ms=300) as proxy:
            relay = await Relay.create(relay_settings(storage, emulator, HVE_SMTP_PORT=str(proxy.port),
                                                      HVE_ACCOUNTS=NEWS, HVE_PACING_MARGIN_SECONDS="0.2",
                                                      HVE_LIMITS='{"messages_per_minute": 5}'))
            try:
                before = time.time()
                await enqueue(relay, mail(id="old-grant"))
                results = await drain(relay)
                [state] = await relay.governor.states()
                return before, results, state, relay.stats
            finally:
                await relay.close()

    before, results, state, stats = run(main())
    assert [r.state for r in results] == ["sent"]
    # Connect + TLS + AUTH through the proxy take well over the 0.1 s tolerance: the one slot in the
    # log was re-dated to when the session was ready, and the first one was given back.
    assert len(state.slots) == 1 and state.slots[0] > before + 0.3
    assert state.messages_today == 1 and stats.lapsed == 0


# The governor's own mechanics: a per-minute window (however wide) puts the relay on the paced path.
PACED = {"HVE_LIMITS": '{"messages_per_minute": 100000}'}


def test_two_deliveries_of_one_request_waiting_for_sessions_send_it_once(storage, emulator):
    """The ledger claim is taken when the session is ready, just before MAIL: a second delivery that
    waited for a session just as long finds the claim and gives its slot back."""
    async def main():
        with LatencyProxy(emulator.port, rtt_ms=200) as proxy:
            settings = relay_settings(storage, emulator, HVE_SMTP_PORT=str(proxy.port), HVE_POOL_SIZE="1", **PACED)
            relays = [await Relay.create(settings), await Relay.create(settings)]
            try:
                body = json.dumps(mail(id="twice-at-once"))
                results = []
                for _ in range(5):
                    results += await asyncio.gather(*(r.handle(body, "q") for r in relays))
                states = await relays[0].governor.states()
                return results, states
            finally:
                for r in relays:
                    await r.close()

    results, states = run(main())
    assert [r.state for r in results].count("sent") == 1
    assert set(r.state for r in results) <= {"sent", "busy", "duplicate"}
    ids = [m.message_id for m in emulator.accepted()]
    assert ids == [message_id("twice-at-once", "contoso.com", key=b"test-hash-key")]
    # The losers' slots went back: the accounts count one message in all.
    assert sum(s.messages_today for s in states) == 1


# --- 3. days never go backwards ------------------------------------------------------------------

def test_a_stale_decision_never_moves_an_account_back_a_day():
    cfg = PacingConfig(limits=PROFILES["preview-2024"])
    day = cfg.day_of(START)
    ahead = AccountState(NEWS, day=day + 1, external_today=1990, messages_today=1990)
    late_yesterday = cfg.day_end(day) - 1.0   # 23:59:59 of the day before the row's day
    state, _ = take_slot(ahead, None, Shape(0, 51), late_yesterday, late_yesterday, cfg, 1)
    assert state.day == day + 1 and state.external_today == 2041 and state.messages_today == 1991
    # And the decision sees the row's real day: 2,000 external a day is full for it.
    decision = decide([ahead], None, Shape(0, 11), late_yesterday, cfg)
    assert not hasattr(decision, "account_state") or decision.at >= cfg.day_end(day + 1)


# --- 4. counts follow what HVE accepted ------------------------------------------------------------

def test_a_budget_is_not_spent_by_messages_hve_did_not_accept(storage, emulator):
    emulator.fail_next(2, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_DAILY_RECIPIENT_BUDGET="2"))
        try:
            await enqueue(relay, mail(id="budget-1"))
            await enqueue(relay, mail(id="budget-2"))
            results = await drain(relay, timeout=30)
            _, tenant = await relay.governor.read()
            return results, tenant
        finally:
            await relay.close()

    results, tenant = run(main())
    # Two 451s, then both sent the same day: the charges of the refused attempts came back (the
    # budget's two recipients, taken from the tenant row once, were enough for both).
    assert sorted(r.state for r in results) == ["deferred", "deferred", "sent", "sent"]
    assert tenant.claimed == 2 and len(emulator.messages()) == 2


def test_a_reply_lost_after_data_keeps_its_charge_and_is_not_resent_at_once(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_ACCOUNTS=NEWS, **PACED))
        try:
            await enqueue(relay, mail(id="warm-up"))
            await drain(relay)                       # a pooled session is ready now
            emulator.drop_next(1, stage="DATA", after_accept=True)
            await enqueue(relay, mail(id="lost-reply"))
            results = await drain(relay)
            [state] = await relay.governor.states()
            return results, state, len(relay.governor.spares_held())
        finally:
            await relay.close()

    results, state, spares = run(main())
    # Not resent silently on a fresh session: deferred through the ledger, then resent (same
    # Message-ID), and both attempts are counted, because HVE may have both.
    assert [r.state for r in results] == ["deferred", "sent"]
    lost = [m for m in emulator.accepted() if m.message_id == message_id("lost-reply", "contoso.com", key=b"test-hash-key")]
    assert len(lost) == 2
    assert state.messages_today == 3 + spares  # (and slots booked in a block, not used yet)


# --- 5. a local credential error is not an account problem -------------------------------------

def test_a_credential_read_failure_rests_the_account_in_this_process_only(storage, emulator):
    passwords = {k: v for k, v in ACCOUNTS.items() if k != NEWS}   # news's secret cannot be read

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_PASSWORDS=json.dumps(passwords)))
        try:
            await enqueue(relay, mail(id="cred-1", account=NEWS))
            results = await drain(relay)
            states = {s.account: s for s in await relay.governor.states()}
            return results, states, await relay.ledger.get("cred-1")
        finally:
            await relay.close()

    results, states, entry = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    assert results[0].code == 0 and results[0].delay_seconds <= 3
    # Nothing shared: the account is not marked unhealthy for every instance.
    assert states[NEWS].unhealthy_until == 0 and states[NEWS].last_problem == ""
    assert entry.account != NEWS


# --- 6. partial refusals at RCPT ---------------------------------------------------------------------

def test_recipients_deferred_at_rcpt_go_in_a_follow_up_with_their_own_message_id(storage, emulator):
    emulator.fail_next(1, "451 4.7.1 <ann@contoso.com>: try again later", stage="RCPT")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await enqueue(relay, mail(id="partial-4xx", to=["ann@contoso.com", "bob@contoso.com", "cy@contoso.com"]))
            results = await drain(relay)
            return results, await relay.ledger.get("partial-4xx")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["deferred", "sent"]
    copies = {m.message_id: sorted(m.recipients) for m in emulator.accepted()}
    assert copies == {message_id("partial-4xx", "contoso.com", key=b"test-hash-key"): ["bob@contoso.com", "cy@contoso.com"],
                      message_id("partial-4xx", "contoso.com", 1, key=b"test-hash-key"): ["ann@contoso.com"]}
    assert entry.state == "sent" and entry.chunks_sent == 2 and entry.pending_recipients == ()


def test_a_recipient_refused_for_good_is_named_by_index_and_the_others_get_the_message(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            emulator.fail_next(1, "550 5.1.10 <gone@contoso.com>: recipient not found", stage="RCPT")
            await enqueue(relay, mail(id="partial-5xx", to=["gone@contoso.com", "bob@contoso.com"]))
            results = await drain(relay)
            return results, await relay.ledger.get("partial-5xx")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["sent"]
    assert entry.refused_recipients == (0,) and "1 recipient(s) refused" in entry.reason
    assert "gone" not in entry.reason + entry.last_reply
    assert [sorted(m.recipients) for m in emulator.accepted()] == [["bob@contoso.com"]]


def test_a_chunk_whose_recipients_are_all_refused_does_not_stop_the_other_chunks(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS='{"recipients_per_message": 2}'))
        try:
            emulator.fail_next(2, "550 5.1.10 recipient not found", stage="RCPT")
            await enqueue(relay, mail(id="chunk-5xx", to=["x1@contoso.com", "x2@contoso.com", "y1@contoso.com"]))
            results = await drain(relay)
            return results, await relay.ledger.get("chunk-5xx")
        finally:
            await relay.close()

    results, entry = run(main())
    assert [r.state for r in results] == ["sent"]
    assert entry.refused_recipients == (0, 1) and entry.chunks_sent == 2
    assert [(m.message_id, m.recipients) for m in emulator.accepted()] == [
        (message_id("chunk-5xx", "contoso.com", 1, key=b"test-hash-key"), ("y1@contoso.com",))]


def test_throttling_at_rcpt_cools_the_account_like_throttling_at_data(storage, emulator):
    # HVE throttles one recipient at RCPT and takes the other: the message goes, the account rests.
    emulator.fail_next(1, "450 4.5.104 Message rejected. Excessive message rate from sender", stage="RCPT")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_ACCOUNTS=NEWS))
        try:
            await enqueue(relay, mail(id="rcpt-throttle", to=["ann@contoso.com", "bob@contoso.com"]))
            first = await relay.handle((await anext(relay.queue.receive_messages())).content, "q")
            [state] = await relay.governor.states()
            return first, state, await relay.ledger.get("rcpt-throttle")
        finally:
            await relay.close()

    first, state, entry = run(main())
    assert first.state == "deferred" and entry.pending_recipients == (0,)
    assert [sorted(m.recipients) for m in emulator.accepted()] == [["bob@contoso.com"]]
    assert state.cooldown_until > time.time() and "4.5.104" in state.last_problem


# --- chunk progress is durable ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["paced", "plain"])
def test_a_failed_governor_call_between_chunks_never_sends_a_chunk_again(storage, emulator, path):
    """Chunk 1 goes, then the governor call for chunk 2 fails (storage blip): the function fails and
    the host delivers the message again after the `sending` lease. The retry resumes at chunk 2.
    (Paced: the governor's `acquire`; plain: the scheduler's read of the accounts' health.)"""
    recipients = [f"member{i}@contoso.com" for i in range(5)]
    limits = '{"recipients_per_message": 2, "messages_per_minute": 100000}' if path == "paced" \
        else '{"recipients_per_message": 2}'

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS=limits, SENDING_LEASE_SECONDS="0"))
        target = relay.governor if path == "paced" else relay.scheduler
        name = "acquire" if path == "paced" else "decide"
        real = getattr(target, name)
        calls = 0

        async def failing_once(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 2:
                raise ConnectionError("storage unavailable")   # what the Table client raises on a blip
            return await real(*args, **kwargs)

        setattr(target, name, failing_once)
        try:
            body = json.dumps(mail(id="chunks-durable", to=recipients))
            try:
                await relay.handle(body, "q1")
                raise AssertionError("the governor failure should have failed the invocation")
            except ConnectionError:
                pass
            between = await relay.ledger.get("chunks-durable")
            again = await relay.handle(body, "q1", 2)          # the host's redelivery
            return between, again, await relay.ledger.get("chunks-durable")
        finally:
            await relay.close()

    between, again, entry = run(main())
    assert between.chunks_sent == 1                      # recorded before the next slot was asked for
    assert again.state == "sent" and entry.chunks_sent == 3
    ids = [m.message_id for m in emulator.accepted()]
    assert sorted(ids) == sorted(message_id("chunks-durable", "contoso.com", i, key=b"test-hash-key") for i in range(3))


# --- booked requests wake early by their lateness and wait for the slot ---------------------------

def test_a_booked_request_wakes_before_its_slot_by_the_lateness_seen_and_waits_for_the_slot(storage, make_emulator):
    """This worker has seen booked requests come back 1.5 s late: the 11th external request's copy
    wakes at least 1.5 s before its slot, and when it is handled early it waits in the process
    until the slot (never sending before it); a copy handled far too early sleeps on the queue."""
    clock = VirtualClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)
    slept: list[float] = []

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_PACER_SECONDS="0"), clock=clock)
        relay.queue = queue = VirtualQueue(clock)

        async def virtual_sleep(seconds: float) -> None:
            slept.append(seconds)
            clock.t += seconds

        relay.sleep = virtual_sleep
        for _ in range(10):
            relay.return_latency.observe(1.5)
        sent_at: list[float] = []
        real_lease = relay.smtp.lease

        async def timed_lease(*args, **kwargs):   # MAIL FROM goes when a lease sends
            lease = await real_lease(*args, **kwargs)
            if isinstance(lease, SessionLease):
                real_send = lease.send

                async def timed_send(*send_args, **send_kwargs):
                    sent_at.append(clock())
                    return await real_send(*send_args, **send_kwargs)

                lease.send = timed_send
            return lease

        relay.smtp.lease = timed_lease
        try:
            bodies = [json.dumps(mail(id=f"early-{i}", to=[f"c{i}@fabrikam.example"])) for i in range(11)]
            first = [await relay.handle(b, f"q{i}") for i, b in enumerate(bodies)]
            assert [h.state for h in first] == ["sent"] * 10 + ["deferred"]
            entry = await relay.ledger.get("early-10")
            assert entry.booked_at - entry.booked_wake >= 1.5
            # A copy handled 30 s before its slot (a redelivery) goes back to sleep on the queue.
            clock.t = entry.booked_at - 30
            [copy] = queue.receive(entry.booked_wake, 16)
            far = await relay.handle(copy.body, copy.message_id)
            assert far.state == "deferred" and slept == []
            # Its next copy is handled the moment it wakes: it waits here for the slot.
            clock.t = entry.booked_at - 1.2
            [copy] = queue.receive(entry.booked_at, 16)
            last = await relay.handle(copy.body, copy.message_id)
            return last, entry, sent_at
        finally:
            await relay.close()

    last, entry, sent_at = run(main())
    assert last.state == "sent", last
    assert slept and abs(slept[0] - 1.2) < 0.01
    assert sent_at[-1] >= entry.booked_at
    assert emulator.stats()["replies"].get("4.5.104", 0) == 0


class JumpClock:
    """The real clock, moved forward by jumps: real seconds pass (a slow AUTH takes real time), and
    a minute's window can be skipped."""

    def __init__(self, start: float) -> None:
        self.jump_to(start)

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def jump_to(self, t: float) -> None:
        self.offset = t - time.monotonic()


async def _preview_relay_with_a_booking(storage, emulator, clock, prefix):
    """A preview-2024 relay on NEWS that sent a window's 10 external mails and booked the 11th
    (`{prefix}-10`) in the next window: the relay, its virtual queue and the booked row."""
    relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                              HVE_ACCOUNTS=NEWS, HVE_PACER_SECONDS="0"), clock=clock)
    relay.queue = queue = VirtualQueue(clock)
    bodies = [json.dumps(mail(id=f"{prefix}-{i}", to=[f"c{i}@fabrikam.example"])) for i in range(11)]
    first = [await relay.handle(b, f"q{i}") for i, b in enumerate(bodies)]
    assert [h.state for h in first] == ["sent"] * 10 + ["deferred"]
    return relay, queue, await relay.ledger.get(f"{prefix}-10")


def test_a_booked_slot_waited_for_in_the_process_has_its_session_ready_at_the_slot(storage, make_emulator):
    """A new session takes 1.3 s to be ready (a slow AUTH, as on a loaded host): longer than the half
    margin (1 s) a slot may be late by. A booked request woken 2.5 s before its slot makes its
    session ready while it waits, so MAIL FROM goes at the slot it booked: not lapsed, not re-dated
    (a re-dated slot crowds the next window's bookings, and then it lapses)."""
    clock = JumpClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)

    async def main():
        relay, queue, entry = await _preview_relay_with_a_booking(storage, emulator, clock, "slow")
        try:
            await relay.smtp.close()  # no idle session left: the slot's session must be opened
            emulator.slow_auth(1.3)
            clock.jump_to(entry.booked_at - 2.5)
            [copy] = queue.receive(entry.booked_at, 16)
            last = await relay.handle(copy.body, copy.message_id)
            [state] = [s for s in await relay.governor.states() if s.account == NEWS]
            return last, entry, state, relay.stats
        finally:
            await relay.close()

    last, entry, state, stats = run(main())
    assert last.state == "sent", last
    received = max(r.received_at for r in emulator.accepted())
    assert entry.booked_at <= received <= entry.booked_at + 1.0, received - entry.booked_at
    assert any(abs(s - entry.booked_at) < 1e-3 for s in state.external_slots), "the slot was re-dated"
    assert (stats.late, stats.lapsed) == (0, 0)
    assert emulator.stats()["replies"].get("4.5.104", 0) == 0


def test_a_slot_now_is_granted_only_when_the_process_has_a_session_free_for_it(storage, make_emulator):
    """One session per account, and each transaction keeps it 1.5 s (a slow back end, as on a loaded
    host): more than the half margin (1 s) a slot may be late by. Three external mails decided at
    once: a grant now on an account whose only session is taken would wait for it past that
    tolerance (then the slot is taken again, or lapses when the next window's bookings are packed
    behind it). So the second and third decisions wait in the process for the session to come free
    and are granted then: no slot is taken again, none lapses, each goes at its slot."""
    emulator = make_emulator(profile="preview-2024")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_POOL_SIZE="1", HVE_PACER_SECONDS="0"))
        rechecks = []
        recheck = relay.governor.recheck

        async def counted(*args, **kwargs):
            rechecks.append(args)
            return await recheck(*args, **kwargs)

        relay.governor.recheck = counted
        try:
            emulator.slow_data(1.5)
            bodies = [json.dumps(mail(id=f"busy-{i}", to=[f"c{i}@fabrikam.example"])) for i in range(3)]
            results = await asyncio.gather(*(relay.handle(b, f"q{i}") for i, b in enumerate(bodies)))
            [state] = await relay.governor.states()
            return results, state, relay.stats, rechecks
        finally:
            await relay.close()

    results, state, stats, rechecks = run(main())
    assert [r.state for r in results] == ["sent"] * 3, results
    assert rechecks == [] and stats.lapsed == 0
    assert stats.session_waits >= 2
    received = sorted(m.received_at for m in emulator.accepted())
    slots = sorted(state.external_slots)
    assert len(slots) == len(received) == 3
    # Each message went at its slot (within the half margin), one after the other.
    assert all(0 <= r - s <= 1.0 for s, r in zip(slots, received)), (slots, received)
    assert slots[2] - slots[0] >= 2 * 1.5
    assert emulator.stats()["replies"].get("4.5.104", 0) == 0


@pytest.mark.parametrize("margin", ["2", "0"])
def test_a_grant_now_that_reached_mail_from_late_is_taken_again_behind_the_next_windows_bookings(
    storage, make_emulator, margin
):
    """The relay's governor in Table storage (preview: 10 external a minute, one account): a
    minute's ten slots granted now, the next minute's ten booked behind them at once (a backlog),
    then the first grant's message reaches MAIL FROM 1.8 s after its slot (a CPU-starved host).
    With the default margin the bookings left room behind the slots that had come due, so the slot
    is taken again where the message really goes; packed tight (no margin, no room) it could not be,
    and the request would wait a whole window."""
    emulator = make_emulator(profile="preview-2024")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_PACING_MARGIN_SECONDS=margin,
                                                  HVE_BOOKINGS_PER_SECOND="0"))
        try:
            gov, shape = relay.governor, Shape(0, 1)
            now = START
            granted = []
            for _ in range(10):
                got = await gov.acquire(shape, now)
                assert got.at == now
                granted.append(got.at)
                now += 0.1
            booked = [(await gov.acquire(shape, now)).at for _ in range(10)]
            retaken = await gov.recheck(NEWS, granted[0], shape, granted[0] + 1.8)
            [state] = await gov.states()
            return granted, booked, retaken, state
        finally:
            await relay.close()

    granted, booked, retaken, state = run(main())
    window = 60 + float(margin)
    if margin == "2":
        assert [round(b - g, 3) for g, b in zip(granted, booked)] == [window + 2] * 10
        assert retaken == pytest.approx(granted[0] + 1.8, abs=1e-3)
        assert state.external_slots[0] == pytest.approx(granted[1], abs=1e-3)  # re-dated: now second
    else:
        assert [round(b - g, 3) for g, b in zip(granted, booked)] == [window] * 10
        assert retaken is None
    assert len(state.external_slots) == (20 if retaken is not None else 19)


def test_two_deliveries_of_a_booked_request_send_once_and_the_booked_slot_stays_counted(storage, make_emulator):
    """A duplicate delivery of a booked request holds the same booking: the copy that loses the
    ledger claim must not give the slot back, or the governor would count one message fewer than
    HVE saw in that minute and grant an 11th."""
    clock = VirtualClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)

    async def main():
        relay, queue, entry = await _preview_relay_with_a_booking(storage, emulator, clock, "dup")
        try:
            clock.t = entry.booked_at
            [copy] = queue.receive(clock.t, 16)
            both = await asyncio.gather(relay.handle(copy.body, "copy-a"), relay.handle(copy.body, "copy-b"))
            [state] = [s for s in await relay.governor.states() if s.account == NEWS]
            return both, entry, state, relay.governor.spares_held(NEWS)
        finally:
            await relay.close()

    both, entry, state, spares = run(main())
    assert sorted(h.state for h in both) == ["busy", "sent"], both
    assert len(emulator.accepted()) == 11
    assert any(abs(s - entry.booked_at) < 1e-3 for s in state.external_slots), "the booked slot was given back"
    assert state.external_today == 11 + sum(s.shape.external for s in spares)  # (+ a block's unused)


# --- the pacer ----------------------------------------------------------------------------------

def test_pacer_chains_started_while_their_pacers_were_stuck_behind_a_backlog_merge_into_one(storage, make_emulator):
    """While a backlog holds the pacer messages back, each booking a few seconds apart starts a
    new chain (the process has not seen a tick for two intervals). When the crowd of pacers comes
    back, the chains must merge: one chain per process, not one per booking for ever after."""
    clock = VirtualClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)

    def pacers_queued(queue):
        return sum(1 for _, _, m in queue._heap if "hveRelayPacer" in m.body)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_PACER_SECONDS="2"), clock=clock)
        relay.queue = queue = VirtualQueue(clock)
        try:
            def external(i):
                return json.dumps(mail(id=f"pace-{i}", to=[f"c{i}@fabrikam.example"]))
            first = await asyncio.gather(*(relay.handle(external(i), f"q{i}") for i in range(40)))
            assert sum(h.state == "sent" for h in first) == 10  # 30 booked minutes ahead
            for step in range(1, 7):                  # the backlog: nothing comes back for 30 s
                clock.t = START + 5.0 * step
                await relay.handle(external(100 + step), f"late{step}")
            started = pacers_queued(queue)
            ended = 0
            for _ in range(120):                      # then the host polls every half second
                clock.t += 0.5
                for message in queue.receive(clock.t, 32):
                    handled = await relay.handle(message.body, message.message_id)
                    ended += handled.reason.startswith("another chain")
            return started, pacers_queued(queue), ended
        finally:
            await relay.close()

    started, left, ended = run(main())
    assert started >= 5, started                     # the scenario did start several chains
    assert left == 1 and ended == started - 1, (started, left, ended)


# --- the backlog floor --------------------------------------------------------------------------

def test_no_slot_is_booked_until_a_second_reading_of_the_backlog_gives_its_drain_rate(storage, make_emulator):
    """With 2,000 fresh messages on the queue and one reading of it, how fast all instances
    together drain it is not known (this worker's own rate would put bookings as many times too
    far out as there are instances, and the windows before them would stay empty). The request
    that finds the minute full waits unbooked for its slot; once a second reading gives the rate,
    the next one is booked behind the backlog."""
    clock = VirtualClock(START)
    emulator = make_emulator(profile="preview-2024", clock=clock)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, HVE_LIMITS_PROFILE="preview-2024",
                                                  HVE_ACCOUNTS=NEWS, HVE_PACER_SECONDS="0",
                                                  HVE_BACKLOG_SAMPLE_SECONDS="1"), clock=clock)
        relay.queue = queue = VirtualQueue(clock)
        try:
            for i in range(2000):
                queue.put(json.dumps(mail(id=f"bl-{i}", to=[f"c{i}@fabrikam.example"])))
            first = [await relay.handle(m.body, m.message_id) for m in queue.receive(clock.t, 11)]
            unknown = await relay.ledger.get(first[-1].request_id)
            row = (await relay.governor.states())[0]
            clock.t += 1.0                                    # the next reading: 400 fewer
            for m in queue.receive(clock.t, 400):
                pass
            [later] = [await relay.handle(m.body, m.message_id) for m in queue.receive(clock.t, 1)]
            return first, unknown, row, await relay.ledger.get(later.request_id)
        finally:
            await relay.close()

    first, unknown, row, later = run(main())
    assert [h.state for h in first] == ["sent"] * 10 + ["deferred"]
    assert unknown.booked_account == "" and "waiting" in unknown.reason   # not booked
    assert len(row.external_slots) == 10                                  # no slot held for it
    # 1,589 left at 400/s: booked behind the backlog (about 4 s + 10%), in a window after it.
    assert later.booked_account == NEWS and later.booked_at >= START + CFG_WINDOW
