"""The welcome scan's state in Table storage (WELCOME_STATE_TABLE, default `hvewelcome`).

- PartitionKey "scan", RowKey "watermark": the time the last completed scan started. It is written
  only after every request of that scan is on the queue, and it never moves backwards.
- PartitionKey "user", RowKey <Entra object id>: one row per new user the scan has decided about:
  state pending | enqueued | skipped, reason, first_seen, created, retry_until, request_id.

Like the ledger, no addresses or names: a user is known here by object id only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from shared.welcome.policy import STATE_PENDING, utc

_SCAN, _WATERMARK, _USER = "scan", "watermark", "user"
_MAX_TEXT = 500


@dataclass(frozen=True)
class UserRow:
    user_id: str
    state: str  # pending | enqueued | skipped
    first_seen: datetime
    updated: datetime
    created: datetime | None = None
    reason: str = ""
    request_id: str = ""
    retry_until: datetime | None = None

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": _USER,
            "RowKey": self.user_id,
            "state": self.state,
            "reason": self.reason[:_MAX_TEXT],
            "first_seen": self.first_seen,
            "updated": self.updated,
            "request_id": self.request_id,
        }
        if self.created is not None:
            entity["created"] = self.created
        if self.retry_until is not None:
            entity["retry_until"] = self.retry_until
        return entity

    @classmethod
    def from_entity(cls, entity: Any) -> UserRow:
        def when(name: str) -> datetime | None:
            value = entity.get(name)
            return utc(value) if isinstance(value, datetime) else None

        return cls(
            user_id=entity["RowKey"],
            state=str(entity.get("state", "")),
            reason=str(entity.get("reason", "")),
            first_seen=when("first_seen") or datetime.fromtimestamp(0, UTC),
            updated=when("updated") or datetime.fromtimestamp(0, UTC),
            created=when("created"),
            request_id=str(entity.get("request_id", "")),
            retry_until=when("retry_until"),
        )


class WelcomeState:
    """Reads and writes of the state table. `read_only` (dry run): nothing is created or written,
    and a table that does not exist yet reads as empty."""

    def __init__(self, table_client: Any, *, read_only: bool = False) -> None:
        self._table = table_client
        self.read_only = read_only

    @classmethod
    async def open(cls, storage: Any, table_name: str, *, read_only: bool = False) -> WelcomeState:
        if read_only:
            return cls(storage.tables.get_table_client(table_name), read_only=True)
        return cls(await storage.table(table_name))

    async def watermark(self) -> datetime | None:
        try:
            entity = await self._table.get_entity(_SCAN, _WATERMARK)
        except ResourceNotFoundError:
            return None
        value = entity.get("watermark")
        return utc(value) if isinstance(value, datetime) else None

    async def advance_watermark(self, value: datetime, **stats: Any) -> datetime:
        """Set the watermark to `value` unless it is already later (a concurrent or clock-skewed
        run); returns the watermark now stored."""
        self._writable()
        current = await self.watermark()
        new = max(utc(value), current) if current else utc(value)
        await self._table.upsert_entity(
            {
                "PartitionKey": _SCAN,
                "RowKey": _WATERMARK,
                "watermark": new,
                "updated": datetime.now(UTC),
                **stats,
            }
        )
        return new

    async def rows(self, created_since: datetime) -> dict[str, UserRow]:
        """User rows of users created since `created_since`, and every pending row whatever its age."""
        rows: dict[str, UserRow] = {}
        query = "PartitionKey eq @pk and ( created ge @since or state eq @pending )"  # the SDK needs the spaces
        try:
            async for entity in self._table.query_entities(
                query, parameters={"pk": _USER, "since": utc(created_since), "pending": STATE_PENDING}
            ):
                row = UserRow.from_entity(entity)
                rows[row.user_id] = row
        except ResourceNotFoundError:
            if not self.read_only:
                raise
        return rows

    async def get(self, user_id: str) -> UserRow | None:
        try:
            return UserRow.from_entity(await self._table.get_entity(_USER, user_id))
        except ResourceNotFoundError:
            return None

    async def save(self, row: UserRow) -> None:
        from azure.data.tables import UpdateMode  # imported when used: the tables SDK is a heavy import

        self._writable()
        # Replace, not merge: a row that leaves "pending" must not keep its retry_until.
        await self._table.upsert_entity(row.to_entity(), mode=UpdateMode.REPLACE)

    def _writable(self) -> None:
        if self.read_only:
            raise RuntimeError("the welcome state was opened read-only (dry run)")
