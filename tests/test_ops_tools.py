"""The operations tools (tools.enqueue, .ledger, .poison, .status; .welcome and .delivery are run
through their main() in test_welcome_scan.py and test_delivery_trace.py) against Azurite: through a
connection string, and signed in the way an admin's laptop reaches production (tools/_storage.py).

The signed-in path runs each CLI as its own process against an Azurite that serves HTTPS with the
local CA of tools.hve_emulator.certs (the one the Key Vault stand-in uses) and accepts OAuth bearer
tokens (`--oauth basic`: audience, issuer and lifetime are checked, the signature is not). The token
comes from DefaultAzureCredential, here its managed identity leg talking to tools.msi_standin, chosen
with the SDK's own AZURE_TOKEN_CREDENTIALS switch; the process trusts the local CA through
SSL_CERT_FILE. Nothing in the tools knows it is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueClient, QueueServiceClient

from shared.send.stage import Relay
from shared.settings import Settings, SettingsError
from tests.relay_harness import ACCOUNTS, drain
from tools import enqueue as enqueue_cli
from tools import ledger as ledger_cli
from tools import poison as poison_cli
from tools import status as status_cli
from tools._storage import StorageTarget, add_arguments, open_storage, target_from_args
from tools.azurite import ACCOUNT_NAME, Azurite
from tools.hve_emulator.certs import ensure_certificates
from tools.msi_standin import MsiStandIn

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/local.settings.json"
STORAGE_RESOURCE = "https://storage.azure.com"
TENANT = "00000000-0000-0000-0000-0000000000aa"


def app_env(storage, **overrides: str) -> dict[str, str]:
    """The settings the relay and the tools share in these tests (no HVE session is opened by a tool)."""
    return storage.env(
        HVE_ACCOUNTS=",".join(ACCOUNTS),
        HVE_PASSWORDS=json.dumps(ACCOUNTS),
        HVE_INTERNAL_DOMAINS="contoso.com",
        RECIPIENT_HASH_KEY="test-hash-key",
        **overrides,
    )


def request(request_id: str) -> dict:
    return {"id": request_id, "to": ["Ann <ann@contoso.com>"], "subject": "Hi", "text": "Hello"}


# --- the connection-string path, each tool's main() ----------------------------------------------------

def test_each_tool_works_through_a_connection_string(storage, emulator, monkeypatch, capsys):
    env = app_env(storage, HVE_SMTP_HOST="127.0.0.1", HVE_SMTP_PORT=str(emulator.port),
                  HVE_SMTP_CA_FILE=str(emulator.ca_file))
    for name in ("AzureWebJobsStorage", "AZURE_STORAGE_ACCOUNT", "AzureWebJobsStorage__accountName"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name != "AzureWebJobsStorage":
            monkeypatch.setenv(name, value)

    # The flag, with nothing in the environment.
    assert enqueue_cli.main(["--to", "ann@contoso.com", "--subject", "Hi", "--text", "Hello", "--id", "ops-1",
                             "--settings", MISSING, "--connection-string", storage.connection_string]) == 0
    assert "enqueued 1 request(s)" in capsys.readouterr().err

    async def send_it():
        relay = await Relay.create(Settings.from_env(env))
        try:
            return await drain(relay)
        finally:
            await relay.close()

    assert [(r.state, r.request_id) for r in asyncio.run(send_it())] == [("sent", "ops-1")]

    # From here on AzureWebJobsStorage, as local.settings.json would give it.
    monkeypatch.setenv("AzureWebJobsStorage", storage.connection_string)
    assert ledger_cli.main(["summary", "--settings", MISSING]) == 0
    assert json.loads(capsys.readouterr().out)["by_state"] == {"sent": 1}

    assert ledger_cli.main(["lookup", "ann@contoso.com", "--settings", MISSING]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(r["request_id"], r["state"]) for r in found["requests"]] == [("ops-1", "sent")]

    assert ledger_cli.main(["show", "ops-1", "--settings", MISSING]) == 0
    assert capsys.readouterr().out.startswith("request ops-1: sent via ")

    assert ledger_cli.main(["report", "--json", "--settings", MISSING]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["totals"]["requests"]["sent"] == 1
    assert doc["queues"]["mail"]["name"] == storage.queue_name

    assert status_cli.main(["--json", "--settings", MISSING]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted(a["account"] for a in status["accounts"]) == sorted(ACCOUNTS)
    assert status["tenant"]["recipients_today"] == 1

    # A message the function gave up on, and its replay.
    poison = QueueClient.from_connection_string(storage.connection_string, storage.poison_queue_name)
    poison.send_message(json.dumps(request("ops-2")))
    assert poison_cli.main(["list", "--settings", MISSING]) == 0
    out = capsys.readouterr().out
    assert "id=ops-2" in out and f"1 message(s) on {storage.poison_queue_name}" in out
    assert poison_cli.main(["requeue", "--settings", MISSING]) == 0
    assert capsys.readouterr().out.strip() == (
        f"moved 1 message(s) from {storage.poison_queue_name} to {storage.queue_name}")
    mail = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    assert [json.loads(m.content)["id"] for m in mail.peek_messages(max_messages=32)] == ["ops-2"]


# --- choosing the target ---------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_then_azure_storage_account_then_the_connection_string_then_the_apps_own_form():
    local = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    assert target_from_args(parse(), local) == StorageTarget(connection_string="UseDevelopmentStorage=true")
    prod = target_from_args(parse("--account-name", "sthverelay"), local)
    assert prod.signed_in and prod.account_name == "sthverelay"
    assert prod.service_urls == {s: f"https://sthverelay.{s}.core.windows.net" for s in ("blob", "queue", "table")}
    assert target_from_args(parse(), {**local, "AZURE_STORAGE_ACCOUNT": "stenv"}).account_name == "stenv"
    assert not target_from_args(parse("--connection-string", "CS"), {"AZURE_STORAGE_ACCOUNT": "stenv"}).signed_in
    copied = {"AzureWebJobsStorage__accountName": "stapp"}
    assert target_from_args(parse(), copied).account_name == "stapp"
    china = target_from_args(parse("--account-name", "st", "--endpoint-suffix", "core.chinacloudapi.cn"), {})
    assert china.service_urls["table"] == "https://st.table.core.chinacloudapi.cn"
    private = target_from_args(parse("--account-name", "st"), {"AzureWebJobsStorage__queueServiceUri": "https://q.example"})
    assert private.service_urls["queue"] == "https://q.example" and private.service_urls["blob"].startswith("https://st.")
    with pytest.raises(SystemExit):
        parse("--account-name", "a", "--connection-string", "b")
    # Neither: the tool says what to give.
    with pytest.raises(SettingsError, match="--account-name"):
        open_storage(Settings.from_env({}), target_from_args(parse(), {}))


def test_lookup_on_a_real_account_without_the_hash_key_is_refused_before_any_request(monkeypatch, capsys):
    monkeypatch.delenv("RECIPIENT_HASH_KEY", raising=False)
    monkeypatch.delenv("AzureWebJobsStorage__accountName", raising=False)
    with pytest.raises(SystemExit) as exited:
        ledger_cli.main(["lookup", "ann@contoso.com", "--account-name", "sthverelay", "--settings", MISSING])
    assert exited.value.code == 2
    assert "RECIPIENT_HASH_KEY" in capsys.readouterr().err


# --- the signed-in path: HTTPS Azurite with OAuth, DefaultAzureCredential -------------------------------

def fake_entra_token(audience: str, lifetime: float = 3600) -> str:
    """An unsigned JWT shaped like an Entra access token (Azurite does not check signatures)."""
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")

    now = int(time.time())
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT, "nbf": now - 60,
              "iat": now - 60, "exp": now + int(lifetime), "oid": "11111111-1111-1111-1111-111111111111"}
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.bm90LWNoZWNrZWQ"


@pytest.fixture(scope="module")
def oauth_azurite(tmp_path_factory):
    certs = ensure_certificates(tmp_path_factory.mktemp("azurite-tls"))
    with Azurite(cert=certs.cert_file, key=certs.key_file, oauth=True) as az:
        az.ca_file = certs.ca_file  # type: ignore[attr-defined]
        yield az


@pytest.fixture
def msi():
    with MsiStandIn() as standin:
        yield standin


@pytest.fixture
def laptop(oauth_azurite, storage, msi, tmp_path):
    """Run a tool as its own process, signed in; the storage names are this test's."""
    az = oauth_azurite
    verify = str(az.ca_file)
    services = QueueServiceClient.from_connection_string(az.connection_string, connection_verify=verify)
    tables = TableServiceClient.from_connection_string(az.connection_string, connection_verify=verify)
    env = app_env(storage)
    # Bicep creates every queue and table in Azure; the signed-in tools create nothing.
    for queue in (storage.queue_name, storage.poison_queue_name):
        services.create_queue(queue)
    for name in ("LEDGER_TABLE", "RECIPIENT_INDEX_TABLE", "GOVERNOR_TABLE", "AGGREGATES_TABLE"):
        tables.create_table(env[name])
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    base = {k: v for k, v in env.items() if k != "AzureWebJobsStorage"}
    base.update({
        "HOME": str(tmp_path),            # no developer tool caches (VS Code, shared token cache)
        "PATH": str(empty_bin),           # no az, azd, pwsh
        "SSL_CERT_FILE": verify,
        "PYTHONPATH": str(REPO),
        "AzureWebJobsStorage__blobServiceUri": az.blob_endpoint,
        "AzureWebJobsStorage__queueServiceUri": az.queue_endpoint,
        "AzureWebJobsStorage__tableServiceUri": az.table_endpoint,
        "AZURE_TOKEN_CREDENTIALS": "ManagedIdentityCredential",
        **msi.env(),
    })

    class Laptop:
        queues = services

        def __init__(self):
            self.env = base

        def run(self, module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", module, *args, "--settings", MISSING, "--account-name", ACCOUNT_NAME],
                cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=120)

        def queue(self, name: str):
            return services.get_queue_client(name)

    yield Laptop()
    services.close()
    tables.close()


def test_the_tools_reach_a_real_account_signed_in_with_default_azure_credential(laptop, storage, msi):
    msi.set_token(STORAGE_RESOURCE, fake_entra_token(STORAGE_RESOURCE))
    announced = f"(storage account {ACCOUNT_NAME}, signed in with DefaultAzureCredential)"
    tokens_per_run = []

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        before = len(msi.issued)
        done = laptop.run(module, *args)
        assert done.returncode == 0, done.stderr
        assert announced in done.stderr
        tokens_per_run.append(len(msi.issued) - before)
        return done

    done = run("tools.enqueue", "--to", "ann@contoso.com", "--subject", "Hi", "--text", "Hello", "--id", "laptop-1")
    assert "enqueued 1 request(s)" in done.stderr

    laptop.queue(storage.poison_queue_name).send_message(json.dumps(request("laptop-2")))
    listed = run("tools.poison", "list")
    assert "id=laptop-2" in listed.stdout and f"1 message(s) on {storage.poison_queue_name}" in listed.stdout
    moved = run("tools.poison", "requeue")
    assert f"moved 1 message(s) from {storage.poison_queue_name}" in moved.stdout
    on_mail = [json.loads(m.content)["id"] for m in laptop.queue(storage.queue_name).peek_messages(max_messages=32)]
    assert on_mail == ["laptop-1", "laptop-2"]
    assert laptop.queue(storage.poison_queue_name).get_queue_properties().approximate_message_count == 0

    status = run("tools.status", "--json")
    assert sorted(a["account"] for a in json.loads(status.stdout)["accounts"]) == sorted(ACCOUNTS)

    summary = run("tools.ledger", "summary")
    assert json.loads(summary.stdout) == {"by_state": {}, "reasons": {}, "retried": 0}

    report = run("tools.ledger", "report", "--json")
    assert json.loads(report.stdout)["queues"]["mail"]["depth"] == 2

    # Every process asked the identity endpoint for a storage token (one that reads tables and
    # queues at once may ask twice), and Azurite (--oauth) let its requests through only with it.
    assert all(n >= 1 for n in tokens_per_run), tokens_per_run
    assert {(t.resource, t.client_id) for t in msi.issued} == {(STORAGE_RESOURCE, "system-assigned")}
    assert {(r.status, r.identity_header_ok, r.query["resource"]) for r in msi.requests} == {
        (200, True, STORAGE_RESOURCE)}


def test_azurite_refuses_a_token_for_another_audience_so_the_bearer_token_is_what_gets_through(laptop, msi):
    msi.set_token(STORAGE_RESOURCE, fake_entra_token("https://vault.azure.net"))
    done = laptop.run("tools.poison", "list")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: storage refused the request (403 AuthenticationFailed)" in done.stderr
    assert "Operator roles" in done.stderr
    assert [t.resource for t in msi.issued] == [STORAGE_RESOURCE]


def test_without_azure_token_credentials_the_managed_identity_is_never_asked(laptop, msi):
    """An admin's laptop (or an Azure VM with an identity of its own): the tools sign in as the
    admin, never as whatever managed identity the machine has."""
    msi.set_token(STORAGE_RESOURCE, fake_entra_token(STORAGE_RESOURCE))
    started = time.monotonic()
    done = laptop.run("tools.poison", "list", env={"AZURE_TOKEN_CREDENTIALS": ""})
    # At once, in a few lines (the storage SDK would retry an AzureError with back-off for minutes).
    assert time.monotonic() - started < 30
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: DefaultAzureCredential failed to retrieve a token" in done.stderr
    assert "AzureCliCredential" in done.stderr and "InteractiveBrowserCredential" not in done.stderr
    assert "Sign in first (az login" in done.stderr
    assert msi.requests == [] and msi.issued == []
