"""Pytest plugin: one in-memory Azurite per test session, and unique names per test.

    def test_something(storage):
        storage.connection_string     # Azurite, devstoreaccount1
        storage.queue_name            # "outbound-mail-1a2b3c4d", unique per test (and its priority lane,
                                      # storage.priority_queue_name)
        storage.table_prefix          # "t1a2b3c4d", letters and digits, starts with a letter
        storage.env(HVE_POOL_SIZE="1")  # app settings for this test (see Storage.env)

Nothing is created up front: the app (or the dev host) creates its queues, tables and
containers. Names differ per test, so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from tools.azurite import Azurite


@dataclass(frozen=True)
class Storage:
    connection_string: str
    suffix: str  # 8 lowercase hex characters, unique per test

    @property
    def queue_name(self) -> str:
        return f"outbound-mail-{self.suffix}"

    @property
    def poison_queue_name(self) -> str:
        return f"{self.queue_name}-poison"

    @property
    def priority_queue_name(self) -> str:
        return f"{self.queue_name}-priority"

    @property
    def table_prefix(self) -> str:
        return f"t{self.suffix}"

    @property
    def container_name(self) -> str:
        return f"{self.table_prefix}-payloads"

    @property
    def state_container_name(self) -> str:
        return f"{self.table_prefix}-state"

    def env(self, **overrides: str) -> dict[str, str]:
        """App settings pointing the app at this test's storage names; overrides win."""
        settings = {
            "AzureWebJobsStorage": self.connection_string,
            "MAIL_QUEUE": self.queue_name,
            "MAIL_QUEUE_PRIORITY": self.priority_queue_name,
            "LEDGER_TABLE": f"{self.table_prefix}ledger",
            "RECIPIENT_INDEX_TABLE": f"{self.table_prefix}rcpt",
            "GOVERNOR_TABLE": f"{self.table_prefix}gov",
            "AGGREGATES_TABLE": f"{self.table_prefix}agg",
            # Per test: a recipient one test's HVE refused must not be suppressed in the next test.
            "SUPPRESSION_TABLE": f"{self.table_prefix}sup",
            "CLAIM_CHECK_CONTAINER": self.container_name,
            "RELAY_STATE_CONTAINER": self.state_container_name,
        }
        settings.update(overrides)
        return settings


@pytest.fixture(scope="session")
def azurite():
    """A running in-memory Azurite for the whole session (`.connection_string`, ports)."""
    with Azurite() as az:
        yield az


@pytest.fixture
def storage(azurite) -> Storage:
    """Per-test unique queue/table/container names on the session's Azurite."""
    return Storage(connection_string=azurite.connection_string, suffix=uuid.uuid4().hex[:8])
