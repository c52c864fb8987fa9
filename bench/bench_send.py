"""Send-path throughput: hve-relay's full local stack versus the seed article's pattern, same run.

    .venv/bin/python -m bench.bench_send [--messages 400]

A. seed pattern: one message at a time, each on a new connection with STARTTLS and AUTH
   (what a PowerShell loop around Send-MailMessage does), straight to the HVE emulator.
B. hve-relay: requests on the Azurite queue -> send_mail under the local host (host.json
   concurrency) -> pooled, authenticated SMTP sessions -> ledger rows in Table storage.

Both talk to the same emulator over verified TLS on 127.0.0.1. Prints both rates and the ratio.
B does strictly more work per message (queue, ledger, governor, recipient index).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from shared.hve.smtp import tls_context
from shared.ledger import Ledger
from shared.send.producer import enqueue_requests
from shared.wiring import close_relays, get_relay
from shared.settings import Settings
from shared.storage import StorageClients
from bench.latency_proxy import LatencyProxy
from tools.azurite import Azurite, connection_string as azurite_connection_string
from tools.devhost import DevHost, _background_loop

ROOT = Path(__file__).resolve().parents[1]
ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw", "billing@contoso.com": "billing-pw"}


class EmulatorProcess:
    """The HVE emulator in its own process, as the real endpoint would be (no shared GIL)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def __enter__(self) -> "EmulatorProcess":
        accounts = ",".join(f"{a}:{p}" for a, p in ACCOUNTS.items())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.hve_emulator", "--port", "0", "--accounts", accounts,
             "--internal-domains", "contoso.com", "--state-dir", str(self.state_dir), "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        self.port, self.ca_file = int(fields["port"]), Path(fields["ca_file"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def request(i: int) -> dict:
    return {"id": f"bench-{i}", "to": [f"user{i % 50}@contoso.com"], "subject": f"Message {i}",
            "text": f"Hello number {i}\n" * 20, "category": "bench"}


async def seed_pattern(emulator: "_Endpoint", n: int) -> float:
    context = tls_context(str(emulator.ca_file))
    account, password = next(iter(ACCOUNTS.items()))
    started = time.perf_counter()
    for i in range(n):
        message = (f"From: {account}\r\nTo: user{i % 50}@contoso.com\r\nSubject: Message {i}\r\n"
                   f"Message-ID: <seed-{i}@contoso.com>\r\n\r\n" + f"Hello number {i}\r\n" * 20)
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=emulator.port, start_tls=True, tls_context=context)
        await smtp.connect()
        await smtp.login(account, password)
        await smtp.sendmail(account, [f"user{i % 50}@contoso.com"], message.encode())
        await smtp.quit()
    return time.perf_counter() - started


async def _enqueue(settings: Settings, n: int) -> None:
    storage = StorageClients(settings)
    try:
        await enqueue_requests(storage, settings.mail_queue, settings.claim_check_container, [request(i) for i in range(n)])
    finally:
        await storage.close()


async def _sent(settings: Settings) -> int:
    storage = StorageClients(settings)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table), b"")
        return (await ledger.summary())["by_state"].get("sent", 0)
    finally:
        await storage.close()


def relay_stack(connection_string: str, emulator: "_Endpoint", n: int, tag: str) -> tuple[float, int]:
    values = {
        "AzureWebJobsStorage": connection_string, "MAIL_QUEUE": f"bench-mail-{tag}",
        "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(emulator.port), "HVE_SMTP_CA_FILE": str(emulator.ca_file),
        "HVE_ACCOUNTS": ",".join(ACCOUNTS), "HVE_PASSWORDS": json.dumps(ACCOUNTS), "HVE_INTERNAL_DOMAINS": "contoso.com",
        "RECIPIENT_HASH_KEY": "bench", "LEDGER_TABLE": f"benchledger{tag}", "RECIPIENT_INDEX_TABLE": f"benchrcpt{tag}",
        "GOVERNOR_TABLE": f"benchgov{tag}",
    }
    settings = Settings.from_env(values)
    asyncio.run(_enqueue(settings, n))
    host = DevHost(ROOT / "function_app.py", values, functions=["send_mail"])
    started = time.perf_counter()
    host.start()
    try:
        host.wait_until_idle(timeout=600)
        elapsed = time.perf_counter() - started
        connections = asyncio.run_coroutine_threadsafe(_connections(), _background_loop()).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)
        host.stop()
    sent = asyncio.run(_sent(settings))
    if sent != n:
        raise SystemExit(f"relay sent {sent} of {n}")
    return elapsed, connections


async def _connections() -> int:
    return (await get_relay()).smtp.stats.connections_opened


def scenario(azurite: Azurite, emulator: EmulatorProcess, n: int, smtp_rtt: float, storage_rtt: float,
             tag: str) -> tuple[float, float, int, int]:
    """(seed rate, relay rate, seed messages, relay SMTP connections) with the given round-trip times."""
    with contextlib.ExitStack() as stack:
        smtp_port = emulator.port
        if smtp_rtt:
            smtp_port = stack.enter_context(LatencyProxy(emulator.port, smtp_rtt)).port
        conn = azurite.connection_string
        if storage_rtt:
            ports = [stack.enter_context(LatencyProxy(p, storage_rtt)).port
                     for p in (azurite.blob_port, azurite.queue_port, azurite.table_port)]
            conn = azurite_connection_string(*ports)
        target = _Endpoint(smtp_port, emulator.ca_file)
        # The seed loop is slow over a real network: time fewer messages, the rate is per message.
        n_seed = n if smtp_rtt == 0 else min(n, 60)
        seed_s = asyncio.run(seed_pattern(target, n_seed))
        relay_s, connections = relay_stack(conn, target, n, tag)
    return n_seed / seed_s, n / relay_s, n_seed, connections


@dataclass
class _Endpoint:
    port: int
    ca_file: Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--smtp-rtt-ms", default="0,20", help="round-trip times to the SMTP endpoint to test")
    parser.add_argument("--storage-rtt-ms", type=float, default=2.0, help="round trip to storage when SMTP RTT > 0")
    args = parser.parse_args()
    n = args.messages
    rows = []
    with tempfile.TemporaryDirectory() as state, Azurite() as azurite, EmulatorProcess(Path(state)) as emulator:
        for i, rtt in enumerate(float(x) for x in args.smtp_rtt_ms.split(",")):
            storage_rtt = args.storage_rtt_ms if rtt else 0.0
            seed_rate, relay_rate, n_seed, connections = scenario(azurite, emulator, n, rtt, storage_rtt, f"s{i}")
            rows.append((rtt, storage_rtt, seed_rate, relay_rate, n_seed, connections))
    print(f"hve-relay send path vs the seed pattern; {n} relay messages per scenario; emulator over verified TLS; "
          f"{os.cpu_count()} cores")
    print("A = seed pattern: sequential, new connection + STARTTLS + AUTH per message")
    print("B = hve-relay: queue -> send_mail under the local host -> pooled SMTP sessions -> ledger, governor")
    print(f"{'SMTP RTT':>9} {'storage RTT':>12} {'A msg/s':>9} {'B msg/s':>9} {'B/A':>7}  notes")
    for rtt, storage_rtt, seed_rate, relay_rate, n_seed, connections in rows:
        print(f"{rtt:7.0f}ms {storage_rtt:10.0f}ms {seed_rate:9.1f} {relay_rate:9.1f} {relay_rate / seed_rate:6.2f}x"
              f"  (A timed on {n_seed} messages; B used {connections} SMTP connections)")


if __name__ == "__main__":
    main()
