"""The function app with the next-free experiment switched on: every Relay the wiring builds paces
the 2024 preview by next-free time (bench/next_free.py) instead of bookings. Only for measuring:

    python -m tools.devhost --app bench.next_free_app ...

(tests/test_real_host_timing.py runs its hosts with it when REAL_HOST_PACING=next-free.)
"""

from __future__ import annotations

import os

from bench import next_free
from function_app import app
from shared.send.stage import Relay

__all__ = ["app"]

_create = Relay.create.__func__  # type: ignore[attr-defined]


async def _create_next_free(cls, settings, **kwargs):  # noqa: ANN001, ANN202
    relay = await _create(cls, settings, **kwargs)
    next_free.install(relay, float(os.environ.get("NEXT_FREE_JITTER_SECONDS", next_free.JITTER_SECONDS)))
    return relay


Relay.create = classmethod(_create_next_free)  # type: ignore[method-assign]
