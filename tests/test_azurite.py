"""tools.azurite and the storage fixtures, against a real Azurite."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from tools.azurite import REPO_ROOT, Azurite, AzuriteError, find_azurite_entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); check its state.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_fixture_serves_queues_tables_and_blobs(storage):
    env = storage.env()
    queue = QueueClient.from_connection_string(env["AzureWebJobsStorage"], env["MAIL_QUEUE"])
    queue.create_queue()
    queue.send_message("hello")
    assert [m.content for m in queue.receive_messages()] == ["hello"]

    tables = TableServiceClient.from_connection_string(storage.connection_string)
    table = tables.create_table(env["LEDGER_TABLE"])
    table.create_entity({"PartitionKey": "p", "RowKey": "r", "n": 1})
    assert table.get_entity("p", "r")["n"] == 1

    blobs = BlobServiceClient.from_connection_string(storage.connection_string)
    container = blobs.create_container(env["CLAIM_CHECK_CONTAINER"])
    container.upload_blob("b", b"payload")
    assert container.download_blob("b").readall() == b"payload"


def test_names_are_unique_per_test_and_valid(azurite, storage):
    from tests.fixtures_storage import Storage

    other = Storage(azurite.connection_string, "0" * 8)
    assert storage.queue_name != other.queue_name
    env = storage.env(MAIL_QUEUE="custom")
    assert env["MAIL_QUEUE"] == "custom"
    assert env["LEDGER_TABLE"].isalnum() and env["LEDGER_TABLE"][0].isalpha()
    assert env["CLAIM_CHECK_CONTAINER"] == env["CLAIM_CHECK_CONTAINER"].lower()


def test_stop_kills_the_process_and_location_persists(tmp_path):
    with Azurite(location=tmp_path / "data") as az:
        pid = az.pid
        QueueClient.from_connection_string(az.connection_string, "persisted").create_queue()
    assert not _alive(pid)
    assert any((tmp_path / "data").glob("__azurite_db_queue__*"))

    with Azurite(location=tmp_path / "data") as az:
        queue = QueueClient.from_connection_string(az.connection_string, "persisted")
        assert queue.get_queue_properties().name == "persisted"


def test_azurite_dies_with_its_parent():
    code = (
        "import os, sys; from tools.azurite import Azurite\n"
        "az = Azurite().start(); print(az.pid, flush=True); os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_missing_node_modules_says_npm_install(tmp_path):
    with pytest.raises(AzuriteError, match="npm install"):
        find_azurite_entry(tmp_path)
