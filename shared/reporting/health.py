"""The `sample_health` timer: what the alert rules of infra/modules/alerts.bicep (docs/alerts.md)
read and the relay does not otherwise emit while it is idle. One run reads the governor's account
rows and the mail and poison queues (the report's two queue properties and two peeks) and records
OpenTelemetry gauges, then flushes them:

- `hve_relay.queue.depth` {queue}: approximate message count (a message waiting out a retry
  delay counts, though no peek sees it);
- `hve_relay.queue.oldest_age` {queue}: seconds since the oldest message visible now was put on
  the queue, 0 when none is visible;
- `hve_relay.account.unhealthy` {account}: 1 while the governor keeps the account out of rotation
  after an authentication failure (ACCOUNT_UNHEALTHY_SECONDS), else 0.

No address: queue names and HVE account names only (the account names are the app's own
configuration, also in /api/status).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.reporting.report import queue_state

log = logging.getLogger("hve_relay.health")


async def sample(*, governor: Any, mail_queue: Any, poison_queue: Any, instruments: Any, now: float) -> dict[str, Any]:
    """Read once, record the gauges; returns what was recorded (logged too)."""
    (states, _tenant), mail, poison = await asyncio.gather(
        governor.read(), queue_state(mail_queue, now), queue_state(poison_queue, now)
    )
    queues = {}
    for queue in (mail, poison):
        attributes = {"queue": queue["name"]}
        age = queue["oldestAgeSeconds"] or 0.0
        instruments.queue_depth.set(queue["depth"], attributes)
        instruments.queue_oldest_age.set(age, attributes)
        queues[queue["name"]] = {"depth": queue["depth"], "oldest_age": age}
    accounts = {}
    for state in states:
        unhealthy = 1 if state.unhealthy_until > now else 0
        instruments.account_unhealthy.set(unhealthy, {"account": state.account})
        accounts[state.account] = unhealthy
    log.info(
        "health sample: %s; unhealthy accounts: %d of %d",
        ", ".join(f"{name} depth {q['depth']} oldest {q['oldest_age']:.0f} s" for name, q in queues.items()),
        sum(accounts.values()),
        len(accounts),
    )
    return {"queues": queues, "accounts": accounts}
