"""Faults queued by tests: the next N commands of a stage fail with a reply or lose the connection."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from . import replies

# CONNECT: the greeting itself (e.g. "421 4.3.2 Service not available", "554 5.7.1 ..."); the
# connection is closed after the reply, as a front end refusing a connection does.
STAGES: tuple[str, ...] = ("CONNECT", "AUTH", "MAIL", "RCPT", "DATA")


@dataclass(frozen=True)
class Fault:
    # Reply sent instead of the normal one; None means drop the connection without a reply.
    reply: str | None
    # DATA only: store and count the message first, then drop (the client never sees the 250).
    after_accept: bool = False

    @property
    def drops(self) -> bool:
        return self.reply is None


class FaultInjector:
    """One FIFO per stage; each command of that stage consumes at most one fault."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {stage: deque() for stage in STAGES}

    def fail_next(self, count: int = 1, reply: str = replies.DEFAULT_FAULT, stage: str = "DATA") -> None:
        if not replies.is_valid_reply(reply):
            raise ValueError(f"fault reply must start with a 4xx or 5xx code: {reply!r}")
        self._add(stage, count, Fault(reply))

    def drop_next(self, count: int = 1, stage: str = "DATA", *, after_accept: bool = False) -> None:
        if after_accept and stage.upper() != "DATA":
            raise ValueError("after_accept only applies to stage DATA")
        self._add(stage, count, Fault(None, after_accept=after_accept))

    def take(self, stage: str) -> Fault | None:
        with self._lock:
            queue = self._queues[stage]
            return queue.popleft() if queue else None

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {stage: len(queue) for stage, queue in self._queues.items()}

    def clear(self) -> None:
        with self._lock:
            for queue in self._queues.values():
                queue.clear()

    def _add(self, stage: str, count: int, fault: Fault) -> None:
        stage = stage.upper()
        if stage not in self._queues:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._queues[stage].extend([fault] * count)
