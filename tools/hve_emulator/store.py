"""What the emulator accepted: .eml files on disk and counters for tests and the dev stack."""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .replies import enhanced_code

_UNSAFE = re.compile(r"[^A-Za-z0-9@._-]")
_NUMBERED = re.compile(r"^(\d+)-")


@dataclass(frozen=True)
class StoredMessage:
    path: Path
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    internal_recipients: int
    external_recipients: int
    message_id: str
    internal_id: int
    received_at: float  # emulator clock


class MessageStore:
    """One .eml per accepted message, named <counter>-<account>.eml, content exactly as received.

    The counter continues after the files already in the directory, so a reused state dir
    never overwrites an earlier run's messages.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._records: list[StoredMessage] = []
        self._counter = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        numbers = (
            int(match.group(1))
            for path in self.directory.glob("*.eml")
            if (match := _NUMBERED.match(path.name))
        )
        self._counter = max(numbers, default=0)

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def save(
        self,
        internal_id: int,
        account: str,
        mail_from: str,
        recipients: tuple[str, ...],
        counts: tuple[int, int],
        content: bytes,
        message_id: str,
        received_at: float,
    ) -> StoredMessage:
        path = self.directory / f"{internal_id:06d}-{_UNSAFE.sub('_', account)}.eml"
        path.write_bytes(content)
        record = StoredMessage(
            path, account, mail_from, recipients, counts[0], counts[1], message_id, internal_id, received_at
        )
        with self._lock:
            self._records.append(record)
        return record

    def records(self) -> list[StoredMessage]:
        with self._lock:
            return list(self._records)

    def forget(self) -> None:
        """Start a new list for tests; the files stay on disk."""
        with self._lock:
            self._records.clear()


class Stats:
    """Counters read by tests from another thread; stats() hands out a plain-dict copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._connections = 0
            self._auths = 0
            self._auth_failures = 0
            self._accounts: dict[str, Counter[str]] = {}
            self._replies: Counter[str] = Counter()

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1

    def auth_result(self, success: bool) -> None:
        with self._lock:
            if success:
                self._auths += 1
            else:
                self._auth_failures += 1

    def reply_sent(self, reply: str) -> None:
        code = enhanced_code(reply)
        if code is not None:
            with self._lock:
                self._replies[code] += 1

    def accepted(self, account: str, internal: int, external: int) -> None:
        with self._lock:
            counts = self._accounts.setdefault(account, Counter())
            counts["messages"] += 1
            counts["internal_recipients"] += internal
            counts["external_recipients"] += external

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._connections

    @property
    def auth_count(self) -> int:
        with self._lock:
            return self._auths

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            accounts = {
                account: {
                    "messages": counts["messages"],
                    "internal_recipients": counts["internal_recipients"],
                    "external_recipients": counts["external_recipients"],
                }
                for account, counts in self._accounts.items()
            }
            return {
                "connections_opened": self._connections,
                "auth_count": self._auths,
                "auth_failures": self._auth_failures,
                "accepted_messages": sum(a["messages"] for a in accounts.values()),
                "internal_recipients": sum(a["internal_recipients"] for a in accounts.values()),
                "external_recipients": sum(a["external_recipients"] for a in accounts.values()),
                "accounts": accounts,
                "replies": dict(self._replies),
            }
