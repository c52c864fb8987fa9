"""The queue's side of booked slots (paced path only): the pacer chain that keeps the host polling,
and the readings of the queue's backlog that keep bookings out of it."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING

from shared.send.decode import PACER_KEY
from shared.send.outcome import Handled

if TYPE_CHECKING:
    from shared.send.stage import Relay

log = logging.getLogger("hve_relay.sender")

# The pacer reads the governor again when what this process knows of the bookings is this old.
PACER_STATE_MAX_AGE_SECONDS = 30.0


class Pacer:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._seen = -math.inf  # when a pacer last ticked (or a chain was started) in this process

    # --- keeping the host's polling short while bookings are ahead ------------------------------

    async def keep_host_polling(self, booked_at: float) -> None:
        """The Functions host backs its polling off to maxPollingInterval (a minute on Azure) while
        the queue looks empty, and booked messages then come back late. While bookings are ahead, a
        tiny pacer message comes back every HVE_PACER_SECONDS, so some instance keeps polling often.
        A chain is started when none has ticked here for two intervals (its pacers may be stuck
        behind a backlog); chains that meet in one process merge, so a process keeps about one.
        A chain ends once the process handling its pacer knows of no booking ahead."""
        interval = self.relay.settings.pacer_seconds
        now = self.relay.clock()
        if interval <= 0 or booked_at - now <= interval or now - self._seen < 2 * interval:
            return
        self._seen = now
        await self._send(interval)

    async def tick(self) -> Handled:
        """A pacer message came back: the next one is sent while bookings are ahead."""
        r = self.relay
        interval = r.settings.pacer_seconds
        now = r.clock()
        previous, self._seen = self._seen, now
        if interval <= 0:
            return Handled("pacer", "pacer", "pacing is off")
        if now - previous < interval / 2:
            # Two chains ticking here together (pacers held back behind a backlog come back as a
            # crowd, and each booking meanwhile started a chain): one is enough, this one ends.
            return Handled("pacer", "pacer", "another chain ticked here moments ago: this one ends")
        if r.governor.snapshot_age() > PACER_STATE_MAX_AGE_SECONDS:
            await r.governor.refresh(older_than=PACER_STATE_MAX_AGE_SECONDS)
        if r.governor.latest_slot() <= now + interval:
            return Handled("pacer", "pacer", "no booking ahead: the chain ends")
        await self._send(interval)
        return Handled("pacer", "pacer", f"next tick in {interval:g} s")

    async def _send(self, interval: float) -> None:
        await self.relay.queue.send_message(
            json.dumps({PACER_KEY: 1}),
            visibility_timeout=math.ceil(interval),
            time_to_live=max(60, math.ceil(10 * interval)),
        )

    # --- the queue's backlog --------------------------------------------------------------------

    async def backlog_lead(self, now: float) -> float | None:
        """Seconds until the queue's visible backlog is drained (0 when none, None when not known
        yet)."""
        if self.relay.backlog.sample_due(now):
            await self.sample_backlog(now)
        return self.relay.backlog.lead(now)

    async def sample_backlog(self, now: float) -> None:
        """One queue read per HVE_BACKLOG_SAMPLE_SECONDS per process while it handles messages."""
        r = self.relay
        r.backlog.asking(now)
        try:
            queued = (await r.queue.get_queue_properties()).approximate_message_count or 0
        except Exception as exc:  # an estimate: without it, bookings are made as before
            log.debug("queue length unknown: %s", exc)
            return
        ahead = r.governor.booked_ahead(now)
        fresh_enough = r.backlog.sample_seconds / 2
        if queued - ahead > r.backlog.min_messages and r.governor.snapshot_age() > fresh_enough:
            # While there is a backlog, the bookings are read with each reading: other instances'
            # bookings this process has not read yet look like backlog (four instances book
            # hundreds a second while they drain one), and a view up to the governor's snapshot
            # age would skew both the backlog and its fall.
            await r.governor.refresh(older_than=fresh_enough)
            ahead = r.governor.booked_ahead(now)
        r.backlog.observe(now, queued, ahead)
