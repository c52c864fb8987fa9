"""The suppression list: recipients that failed for good are not mailed again for SUPPRESSION_DAYS.

What suppresses a recipient (and its reason code):
- HVE refused it for good at RCPT (`rcpt:550 5.1.1`): a 5xx reply the relay classifies as the
  recipient's (shared/send/replies.py `Outcome.REFUSE`), not an account problem (`5.7.139`,
  `5.7.60`, ...) and not one about this message or this tenant (`5.3.4` too big, `5.5.105`
  external sending not supported);
- message trace said `failed` and getDetailsByRecipient gave a 5.x.x reason (`trace:5.1.10`);
- an operator added it (`admin`; `python -m tools.suppression add`).

Never for a transient outcome: a 4xx (at RCPT or at DATA), trace `pending`, `gettingStatus`,
`quarantined` (the message's content was held, the mailbox exists) or `filteredAsSpam` (delivered to
junk), and a `failed` whose reason is 4.x.x or has no code. Those may well succeed next time.

Storage (SUPPRESSION_TABLE): one row per recipient, by its keyed hash (HMAC-SHA256 under
RECIPIENT_HASH_KEY, the recipient index's key: shared/ledger.py `recipient_hash`), never by address.
PartitionKey is the hash's first hex digit (16 partitions), RowKey the hash; `Reason`, `Source` (the
request id, or `admin`), `First`, `Last` (times it was suppressed) and `Expires` (Last +
SUPPRESSION_DAYS). A row past `Expires` is ignored, and deleted by `purge_expired`.

Cost on the send path: one batched lookup per request, answered from an in-process snapshot read
again when it is older than SUPPRESSION_CACHE_SECONDS (requests waiting for it share the read). The
snapshot is the whole list, one query, while the list fits one page (1,000 rows: the common case);
a longer list is read per partition the request's recipients fall in instead. So a
suppression added elsewhere (another instance, the CLI, the HTTP route) takes up to that long to
bite, and one removed up to that long to stop biting; in the process that added or removed it, at
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from shared.ledger import LedgerEntry, recipient_hash
from shared.send.replies import Outcome, classify_reply
from shared.send.send_at import hold_seconds

log = logging.getLogger("hve_relay.suppression")

ADMIN = "admin"
ALL_SUPPRESSED = "all-suppressed"
DAY = 86400.0
_PARTITION_CHARS = 1
_PARTITIONS = tuple("0123456789abcdef")
_WHOLE = "*"  # the loading key of a whole-list read
# A list up to this many rows (one page of a query) is read whole: one query a snapshot.
WHOLE_LIST_ROWS = 1000
_FIELDS = ["PartitionKey", "RowKey", "Reason", "Source", "First", "Last", "Expires"]
# 5xx replies that say nothing about the recipient: this message (size), this tenant (external).
_NOT_THE_RECIPIENT = frozenset({"5.3.4", "5.5.105"})
_REPLY = re.compile(r"^\s*(\d{3})[\s-]*(.*)$", re.S)
_ENHANCED_5 = re.compile(r"(?<![\d.])(5\.\d{1,3}\.\d{1,3})(?![\d.])")


def rcpt_reason(reply: str) -> str | None:
    """The reason code a refusal at RCPT (`550 5.1.1 <...> User unknown`) suppresses with, or None."""
    match = _REPLY.match(reply or "")
    if not match or not match[1].startswith("5"):
        return None
    verdict = classify_reply(int(match[1]), match[2])
    if verdict.outcome is not Outcome.REFUSE or verdict.enhanced in _NOT_THE_RECIPIENT:
        return None
    return f"rcpt:{verdict.code} {verdict.enhanced}".strip()


def trace_reason(status: str, reason: str) -> str | None:
    """The reason code a message-trace outcome suppresses with (`failed` with a 5.x.x reason), or None."""
    if status != "failed":
        return None
    match = _ENHANCED_5.search(reason or "")
    if not match:
        return None
    enhanced = match[1]
    if enhanced in _NOT_THE_RECIPIENT or classify_reply(550, enhanced).outcome is not Outcome.REFUSE:
        return None
    return f"trace:{enhanced}"


def all_suppressed(everyone: int) -> str:
    return f"{ALL_SUPPRESSED}: all {everyone} recipient(s) are on the suppression list"


def _instant(at: Any) -> datetime:
    if isinstance(at, datetime):
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(at or 0), UTC)


@dataclass(frozen=True)
class Suppression:
    hash: str
    reason: str
    source: str
    first: datetime
    last: datetime
    expires: datetime

    def view(self) -> dict[str, Any]:
        """What the CLI and the HTTP route show: never the address (the hash is shortened)."""
        return {
            "suppressed": True,
            "reason": self.reason,
            "until": self.expires.isoformat().replace("+00:00", "Z"),
            "since": self.first.isoformat().replace("+00:00", "Z"),
            "source": self.source,
            "hash": self.hash[:16],
        }


def _from_row(row: Mapping[str, Any]) -> Suppression:
    return Suppression(
        str(row["RowKey"]),
        str(row.get("Reason") or ""),
        str(row.get("Source") or ""),
        _instant(row.get("First")),
        _instant(row.get("Last")),
        _instant(row.get("Expires")),
    )


class SuppressionList:
    """The suppression table, with a short-lived in-process snapshot per partition for the send path."""

    def __init__(
        self,
        table: Any,
        key: bytes,
        *,
        days: float = 30.0,
        cache_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        whole_list_rows: int = WHOLE_LIST_ROWS,
    ) -> None:
        self.table = table
        self.key = key
        self.days = days
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.reads = 0  # snapshot queries made, whole-list or partition (tests, telemetry)
        # Read the whole list in one query while it is short; once a read finds it longer, per
        # partition (for the life of the process: a long list does not get short in minutes).
        self.whole_list_rows = whole_list_rows
        self.whole = True
        self._cache: dict[str, tuple[float, dict[str, Suppression]]] = {}
        self._loading: dict[str, asyncio.Future[None]] = {}

    @classmethod
    async def of(cls, storage: Any, settings: Any, clock: Callable[[], float] = time.time) -> SuppressionList | None:
        """The app's list, or None when SUPPRESSION_ENABLED is false."""
        if not settings.suppression_enabled:
            return None
        return cls(
            await storage.table(settings.suppression_table),
            settings.recipient_hash_key,
            days=settings.suppression_days,
            cache_seconds=settings.suppression_cache_seconds,
            clock=clock,
        )

    def hash_of(self, address: str) -> str:
        return recipient_hash(self.key, address)

    @staticmethod
    def _partition(hashed: str) -> str:
        return hashed[:_PARTITION_CHARS]

    # --- the send path ---------------------------------------------------------------------------

    async def suppressed(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        """The addresses (of `addresses`) suppressed now, from the snapshot (read again when stale)."""
        hashes = {a: self.hash_of(a) for a in addresses}
        partitions = sorted({self._partition(h) for h in hashes.values()})
        loaded = dict(zip(partitions, await asyncio.gather(*(self._snapshot(p) for p in partitions)), strict=True))
        now = self.clock()
        found = {}
        for address, hashed in hashes.items():
            row = loaded[self._partition(hashed)].get(hashed)
            if row is not None and row.expires.timestamp() > now:
                found[address] = row
        return found

    async def _snapshot(self, partition: str) -> dict[str, Suppression]:
        cached = self._cache.get(partition)
        if cached is not None and self.clock() - cached[0] < self.cache_seconds:
            return cached[1]
        key = _WHOLE if self.whole else partition
        loading = self._loading.get(key)
        if loading is None:
            read = self._read_whole() if key == _WHOLE else self._read_partition(partition)
            loading = self._loading[key] = asyncio.ensure_future(read)
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        await asyncio.shield(loading)
        return self._cache[partition][1]

    async def _read_whole(self) -> None:
        """One query for the whole list; every partition's snapshot comes from it."""
        at = self.clock()
        found = await self._query("Expires gt @now", {"now": datetime.fromtimestamp(at, UTC)})
        if len(found) > self.whole_list_rows:
            self.whole = False
        for partition in _PARTITIONS:
            self._cache[partition] = (at, {})
        for hashed, row in found.items():
            self._cache.setdefault(self._partition(hashed), (at, {}))[1][hashed] = row

    async def _read_partition(self, partition: str) -> None:
        at = self.clock()
        found = await self._query(
            "PartitionKey eq @pk and Expires gt @now", {"pk": partition, "now": datetime.fromtimestamp(at, UTC)}
        )
        self._cache[partition] = (at, found)

    async def _query(self, query: str, parameters: dict[str, Any]) -> dict[str, Suppression]:
        rows: dict[str, Suppression] = {}
        self.reads += 1
        try:
            async for row in self.table.query_entities(query, parameters=parameters, select=_FIELDS):
                rows[row["RowKey"]] = _from_row(row)
        except ResourceNotFoundError:
            pass  # no table yet: nothing suppressed
        return rows

    async def note_refused(self, refused: Mapping[str, str], source: str) -> None:
        """Recipients HVE refused at RCPT (address -> reply): those refused for good are suppressed.
        Best effort: a failed write is logged, never a reason to fail or retry the request."""
        await self._note_all([(a, rcpt_reason(reply)) for a, reply in refused.items()], source)

    async def note_trace(self, address: str, status: str, reason: str, source: str) -> None:
        """A message-trace outcome with its reason (getDetailsByRecipient); best effort."""
        await self._note_all([(address, trace_reason(status, reason))], source)

    async def _note_all(self, found: Sequence[tuple[str, str | None]], source: str) -> None:
        async def one(address: str, reason: str) -> None:
            try:
                await self.add(address, reason, source)
            except Exception as exc:  # noqa: BLE001 - suppression never fails a send or a trace run
                log.warning("suppression not recorded (%s): %s", reason, type(exc).__name__)

        await asyncio.gather(*(one(a, r) for a, r in found if r))

    async def skip(
        self, entry: LedgerEntry, recipients: Sequence[str], chunks: Sequence[Sequence[int]], internal_domains: Any
    ) -> LedgerEntry:
        """The request's row with its suppressed recipients (by index, `SuppressedRecipients`) left
        out of its recipient counts: those still to be sent, looked up now (a suppression lifted
        since an earlier attempt no longer holds one back), and those left out of transactions
        already sent. One batched lookup; a request held for its `sendAt` is looked up when it is
        due; when the list cannot be read, the request goes without it (logged)."""
        if hold_seconds(entry.send_at, self.clock()) > 0:
            return entry
        unsent = [i for chunk in chunks[entry.chunks_sent :] for i in chunk] + list(entry.pending_recipients)
        try:
            found = await self.suppressed(recipients[i] for i in unsent)
        except Exception as exc:  # noqa: BLE001 - an unreadable list never holds mail up
            log.warning("suppression list not read (%s): sent without it", type(exc).__name__)
            return entry
        earlier = set(entry.suppressed_recipients) - set(unsent)
        skipped = sorted(earlier | set(skip_suppressed(found, recipients, unsent, entry.refused_recipients)))
        internal = sum(1 for i in skipped if recipients[i].rsplit("@", 1)[-1].lower() in internal_domains)
        return entry.evolve(
            suppressed_recipients=tuple(skipped),
            internal_recipients=max(0, entry.internal_recipients - internal),
            external_recipients=max(0, entry.external_recipients - (len(skipped) - internal)),
        )

    # --- administration (and the notes above) ----------------------------------------------------

    async def check(self, address: str) -> Suppression | None:
        """The address's suppression in force now, read from the table (not the snapshot)."""
        hashed = self.hash_of(address)
        try:
            row = _from_row(await self.table.get_entity(self._partition(hashed), hashed))
        except ResourceNotFoundError:
            return None
        return row if row.expires.timestamp() > self.clock() else None

    async def add(self, address: str, reason: str, source: str) -> Suppression:
        """Suppress `address` for SUPPRESSION_DAYS from now (an existing row keeps its `First`)."""
        now = self.clock()
        hashed = self.hash_of(address)
        existing = await self.check(address)
        row = Suppression(
            hashed,
            reason,
            source,
            existing.first if existing is not None else _instant(now),
            _instant(now),
            _instant(now + self.days * DAY),
        )
        await self.table.upsert_entity(
            {
                "PartitionKey": self._partition(hashed),
                "RowKey": hashed,
                "Reason": row.reason,
                "Source": row.source,
                "First": row.first,
                "Last": row.last,
                "Expires": row.expires,
            },
            mode="replace",
        )
        cached = self._cache.get(self._partition(hashed))
        if cached is not None:
            cached[1][hashed] = row  # bites at once in this process
        log.info("recipient suppressed until %s (%s, %s)", row.expires.isoformat(), reason, source)
        return row

    async def remove(self, address: str) -> bool:
        """Lift the address's suppression; False when there was none in force."""
        hashed = self.hash_of(address)
        was = await self.check(address)
        try:
            await self.table.delete_entity(self._partition(hashed), hashed)
        except ResourceNotFoundError:
            pass
        cached = self._cache.get(self._partition(hashed))
        if cached is not None:
            cached[1].pop(hashed, None)
        return was is not None

    async def list(self, limit: int = 1000) -> list[Suppression]:
        """The suppressions in force (by hash, never by address), longest-standing first."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        found: list[Suppression] = []
        try:
            async for row in self.table.query_entities("Expires gt @now", parameters={"now": now}, select=_FIELDS):
                found.append(_from_row(row))
                if len(found) >= limit:
                    break
        except ResourceNotFoundError:
            return []
        return sorted(found, key=lambda s: (s.first, s.hash))


def skip_suppressed(
    found: Mapping[str, Suppression], recipients: Sequence[str], unsent: Iterable[int], refused: Iterable[int]
) -> tuple[int, ...]:
    """Indices (into the request's recipient list) to leave out: suppressed, still to be sent, not
    refused already (a recipient is counted once: refused by HVE or suppressed)."""
    out = set(refused)
    return tuple(i for i in sorted(set(unsent)) if i not in out and recipients[i] in found)


# --- the HTTP routes (POST /api/suppressions/check, /remove) ------------------------------------------

MAX_BODY_BYTES = 4096


def _bad(message: str) -> tuple[int, dict[str, Any]]:
    return 400, {"error": "bad-request", "message": message}


async def admin_answer(suppressions: SuppressionList | None, action: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON document) of `POST /api/suppressions/{check,remove}` with body `{"address": ...}`
    (shared/schema/suppression-request.v1.json; answers: suppression-answer.v1.json, error.v1.json).
    The address is never echoed nor logged: a POST body, not a query string, for that reason."""
    from shared.send.contract import RequestRefused, parse_address

    if suppressions is None:
        return 404, {"error": "not-found", "message": "the suppression list is off (SUPPRESSION_ENABLED=false)"}
    if len(body) > MAX_BODY_BYTES:
        return _bad(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        return _bad("the body is not JSON")
    if not isinstance(doc, dict) or set(doc) != {"address"}:
        return _bad('the body must be {"address": "<mail address>"}')
    try:
        address = parse_address("address", doc["address"]).addr
    except RequestRefused as refusal:
        return _bad(refusal.detail)
    if action == "remove":
        removed = await suppressions.remove(address)
        log.info("suppression %s by an operator (HTTP)", "removed" if removed else "not found to remove")
        return 200, {"removed": removed, "suppressed": False, "reason": None, "until": None}
    found = await suppressions.check(address)
    if found is None:
        return 200, {"suppressed": False, "reason": None, "until": None}
    view = found.view()
    return 200, {"suppressed": True, "reason": view["reason"], "until": view["until"]}
