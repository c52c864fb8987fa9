"""The queue's timing as one worker sees it. Pure: the caller feeds it observations and the clock.

`ReturnLatency`: how late a booked message is handled after its visibility delay ends (the host's
polling, a batch ahead of it, its own downloads). A booked message that comes back after its slot
by more than half the pacing margin cannot use it; when every booked message is late by a few
seconds, every booking would be given back and taken again, for ever. So a booking is put back
on the queue to wake that much before its slot, and a message that is then a little early waits
for its slot in the process (at most HVE_SLOT_WAIT_SECONDS).

`BacklogEstimator`: how long the queue's visible backlog will take to drain: the earliest a
booking is worth making for.

Why: the queue hands out messages roughly in the order they became visible. A booking made while
thousands of fresh messages are waiting becomes visible behind them, so it comes back late and its
slot passes unused (a ghost), while the fresh messages that could have taken the slot at once are
booked further out. Booking no earlier than the end of the backlog leaves the near slots to the
backlog itself and lets bookings come back on time.

The backlog is what the queue holds minus what the governor knows is booked ahead (a booked
message is on the queue but invisible until its slot): `approximate_message_count` counts both.
The drain rate is the fall of that backlog between samples (all instances together, net of new
arrivals), and never less than this process's own rate of handling messages, which is what a
first sample, with nothing to compare, can go by.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Rates are measured over this much recent time, from at least this many messages handled here.
RATE_SPAN_SECONDS = 30.0
MIN_HANDLED_FOR_RATE = 16
# The drain estimate errs long by this much (see `lead`).
LEAD_SAFETY_FRACTION = 0.1
LEAD_SAFETY_SECONDS = 2.0
# Return latencies remembered, and the share of them a booking's early wake covers.
LATENCY_SAMPLES = 64
LATENCY_QUANTILE = 0.95
# A latency past this is not the queue's timing (a host that died, a redelivery) and is ignored.
LATENCY_IGNORED_ABOVE = 120.0


@dataclass
class ReturnLatency:
    max_seconds: float  # the longest early wake (and in-process wait) allowed
    _seen: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def observe(self, seconds: float) -> None:
        """A booked message was handled `seconds` after its visibility delay ended."""
        if 0.0 <= seconds <= LATENCY_IGNORED_ABOVE:
            self._seen.append(seconds)

    def early_wake(self) -> float:
        """How long before its slot a booked message should become visible again: most returns
        (the 95th percentile of recent ones) then land before the slot and wait the rest here."""
        if self.max_seconds <= 0:
            return 0.0
        if not self._seen:
            # Nothing seen yet (bookings made while a first backlog drains, minutes before any
            # comes back): assume the worst this process is prepared to wait for.
            return self.max_seconds
        ordered = sorted(self._seen)
        return min(self.max_seconds, ordered[min(len(ordered) - 1, int(LATENCY_QUANTILE * len(ordered)))])


@dataclass
class BacklogEstimator:
    sample_seconds: float  # how often the queue is asked (0: the estimator is off)
    min_messages: int  # a backlog this small is a poll or two, not congestion
    max_lead_seconds: float  # never put bookings further out than this for a backlog
    _samples: deque = field(default_factory=deque)  # (t, backlog)
    _handled: deque = field(default_factory=deque)  # t of each message this process handled
    _asked: float = float("-inf")  # when a reading was last asked for

    @property
    def enabled(self) -> bool:
        return self.sample_seconds > 0

    def sample_due(self, now: float) -> bool:
        return self.enabled and now - self._asked >= self.sample_seconds

    def asking(self, now: float) -> None:
        """A reading is on its way: handlers running meanwhile do not ask again."""
        self._asked = now

    def note_handled(self, now: float) -> None:
        if not self.enabled:
            return
        self._handled.append(now)
        while self._handled and self._handled[0] < now - RATE_SPAN_SECONDS:
            self._handled.popleft()

    def observe(self, now: float, queued: int, booked_ahead: int) -> None:
        """A reading of the queue: `queued` messages in all (visible or not), of which about
        `booked_ahead` are bookings still invisible."""
        self._asked = max(self._asked, now)
        self._samples.append((now, max(0, queued - booked_ahead)))
        while len(self._samples) > 2 and self._samples[0][0] < now - RATE_SPAN_SECONDS:
            self._samples.popleft()

    def drain_rate(self, now: float) -> float:
        """Messages per second leaving the backlog (0 when unknown)."""
        rates = [0.0]
        if len(self._samples) >= 2:
            (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
            if t1 - t0 > 0:
                rates.append((v0 - v1) / (t1 - t0))
        recent = [t for t in self._handled if t >= now - RATE_SPAN_SECONDS]
        if len(recent) >= MIN_HANDLED_FOR_RATE:
            rates.append(len(recent) / max(now - recent[0], 0.1))
        return max(rates)

    def lead(self, now: float, *, padded: bool = True) -> float | None:
        """Seconds from now until the visible backlog is expected to be drained; 0 when there is
        none to speak of, or nothing is known about the rate; None while there is one and only a
        single reading: how fast all instances together drain it is not known yet (this worker's
        own rate would make the estimate as many times too long as there are instances), so
        nothing should be booked for a moment (the next reading is a sample interval away).
        `padded=False`: the plain estimate, without the safety that makes it err long."""
        if not self._samples:
            return 0.0
        t, backlog = self._samples[-1]
        if backlog <= self.min_messages:
            return 0.0
        if len(self._samples) < 2:
            return None
        rate = self.drain_rate(now)
        if rate <= 0:
            return 0.0
        # The backlog has been draining since the sample was taken. A booking due before the end
        # is a slot lost (its message is still behind the backlog), one due after it only leaves
        # the accounts idle for that long: so the estimate errs long.
        drain = backlog / rate
        if padded:
            drain = drain * (1 + LEAD_SAFETY_FRACTION) + LEAD_SAFETY_SECONDS
        return max(0.0, min(self.max_lead_seconds, drain - (now - t)))
