"""Start and stop Azurite (blob, queue and table emulator) from the repo's node_modules.

Python API::

    from tools.azurite import Azurite

    with Azurite() as az:                  # in memory, free loopback ports
        az.connection_string               # devstoreaccount1, explicit endpoints
        az.blob_port, az.queue_port, az.table_port

    Azurite(location=Path(".local/azurite"))    # persist to a folder instead
    Azurite(cert=pem, key=key_pem, oauth=True)  # HTTPS, and OAuth bearer tokens accepted (Azurite
                                                # checks audience, issuer and lifetime, not signatures)
    az = Azurite().start(); ...; az.stop()      # without a with-block

CLI::

    python -m tools.azurite [--location DIR] [--blob-port N --queue-port N --table-port N]

prints the connection string on stdout and runs until Ctrl-C (or SIGTERM).

Ports default to 0: Azurite binds free ports itself and we read the ports back from
its "successfully listening at" lines, so two instances never race for a port. Start-up
takes about half a second; `start()` returns once all three ports accept connections.

Azurite runs in its own process group and is stopped with SIGTERM, then SIGKILL, on
`stop()`, on interpreter exit, and by a watchdog inside the node process that exits as
soon as its parent process is gone (so a SIGKILLed test run leaves no Azurite behind).
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path

__all__ = [
    "Azurite",
    "AzuriteError",
    "ACCOUNT_NAME",
    "ACCOUNT_KEY",
    "connection_string",
    "find_azurite_entry",
]

ACCOUNT_NAME = "devstoreaccount1"
# The well-known, public development storage key (documented by Microsoft; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

REPO_ROOT = Path(__file__).resolve().parents[1]

# Longer than aiohttp's 15 s keep-alive: the client, not the server, closes idle connections.
_KEEP_ALIVE_SECONDS = 60

_LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at \S+?:(\d+)")

# Run azurite.js through a small wrapper: process.argv then looks exactly as if node had been
# started on azurite.js, and a timer exits the process when its parent pid changes (the
# parent died). Azurite handles SIGTERM by closing its servers; the 5 s timer is a backstop.
_WATCHDOG = (
    "const p0 = process.ppid;"
    "setInterval(() => {"
    "  if (process.ppid !== p0) {"
    "    try { process.kill(process.pid, 'SIGTERM'); } catch (e) {}"
    "    setTimeout(() => process.exit(1), 5000).unref();"
    "  }"
    "}, 500).unref();"
    "require(process.argv[1]);"
)


class AzuriteError(RuntimeError):
    """Azurite is missing, failed to start, or did not become ready in time."""


def connection_string(blob_port: int, queue_port: int, table_port: int, host: str = "127.0.0.1",
                      scheme: str = "http") -> str:
    """The devstoreaccount1 connection string with explicit endpoints on `host`."""
    return (
        f"DefaultEndpointsProtocol={scheme};"
        f"AccountName={ACCOUNT_NAME};"
        f"AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint={scheme}://{host}:{blob_port}/{ACCOUNT_NAME};"
        f"QueueEndpoint={scheme}://{host}:{queue_port}/{ACCOUNT_NAME};"
        f"TableEndpoint={scheme}://{host}:{table_port}/{ACCOUNT_NAME};"
    )


def find_azurite_entry(root: Path | None = None) -> Path:
    """Path of azurite.js in `root`/node_modules (default: the repo root, then the cwd)."""
    roots = [Path(root)] if root is not None else [REPO_ROOT, Path.cwd()]
    for base in roots:
        entry = base / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"
        if entry.is_file():
            return entry
    raise AzuriteError(
        "Azurite is not installed: node_modules/azurite is missing in "
        + " or ".join(str(r) for r in roots)
        + ". Run `npm install` in the repo root (package.json lists azurite)."
    )


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_live: "weakref.WeakSet[Azurite]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for az in list(_live):
        az.stop(timeout=3)


class Azurite:
    """One Azurite process serving blobs, queues and tables on loopback.

    `location=None` keeps all data in memory (`--inMemoryPersistence`); a path persists
    it in that folder (created if missing). Port 0 (the default) lets Azurite pick a free
    port. Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(
        self,
        location: Path | str | None = None,
        *,
        blob_port: int = 0,
        queue_port: int = 0,
        table_port: int = 0,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        node: str | None = None,
        entry: Path | str | None = None,
        debug_log: Path | str | None = None,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        oauth: bool = False,
    ) -> None:
        # HTTPS with this certificate (PEM) and key; `oauth` (needs HTTPS) also accepts bearer tokens.
        if (cert is None) != (key is None) or (oauth and cert is None):
            raise ValueError("cert and key go together, and oauth needs them (bearer tokens only over HTTPS)")
        self.cert = Path(cert) if cert is not None else None
        self.key = Path(key) if key is not None else None
        self.oauth = oauth
        # Azurite's own log of every request it serves (`--debug FILE`): what the benches count.
        self.debug_log = Path(debug_log) if debug_log is not None else None
        self.location = Path(location) if location is not None else None
        self.host = host
        self.startup_timeout = startup_timeout
        self._requested = {"Blob": blob_port, "Queue": queue_port, "Table": table_port}
        self._ports: dict[str, int] = {}
        self._node = node
        self._entry = Path(entry) if entry is not None else None
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=200)
        self._port_seen = threading.Condition()
        self._reader: threading.Thread | None = None

    # -- ports and connection string ---------------------------------------------------

    def _port(self, service: str) -> int:
        if service not in self._ports:
            raise AzuriteError("Azurite is not running; call start() or use it as a context manager")
        return self._ports[service]

    @property
    def blob_port(self) -> int:
        return self._port("Blob")

    @property
    def queue_port(self) -> int:
        return self._port("Queue")

    @property
    def table_port(self) -> int:
        return self._port("Table")

    @property
    def scheme(self) -> str:
        return "https" if self.cert is not None else "http"

    @property
    def blob_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.blob_port}/{ACCOUNT_NAME}"

    @property
    def queue_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.queue_port}/{ACCOUNT_NAME}"

    @property
    def table_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.table_port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.table_port, self.host, self.scheme)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def output(self) -> str:
        """The last lines Azurite printed (for error messages)."""
        return "\n".join(self._output)

    # -- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        node = self._node or shutil.which("node")
        if not node:
            raise AzuriteError("`node` is not on PATH; Azurite needs Node.js (>= 18)")
        entry = self._entry or find_azurite_entry()
        args = [node, "-e", _WATCHDOG, str(entry)]
        for service, port in self._requested.items():
            lower = service.lower()
            args += [f"--{lower}Host", self.host, f"--{lower}Port", str(port)]
        args += ["--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]
        # Node closes an idle keep-alive connection after 5 s; aiohttp (the SDKs' transport) keeps
        # one for 15 s, so a request sent just as Node closes it is reset (a test's flake, not the
        # relay's). With the server waiting longer than the client, the client closes first.
        for service in ("blob", "queue", "table"):
            args += [f"--{service}KeepAliveTimeout", str(_KEEP_ALIVE_SECONDS)]
        if self.debug_log is not None:
            args += ["--debug", str(self.debug_log)]
        if self.cert is not None and self.key is not None:
            args += ["--cert", str(self.cert), "--key", str(self.key)]
        if self.oauth:
            args += ["--oauth", "basic"]
        if self.location is None:
            args.append("--inMemoryPersistence")
        else:
            args += ["--location", str(self.location)]
        return args

    def start(self) -> "Azurite":
        if self.running:
            return self
        cmd = self.command()
        cwd = REPO_ROOT
        if self.location is not None:
            self.location.mkdir(parents=True, exist_ok=True)
            cwd = self.location
        self._ports = {}
        self._output.clear()
        self._proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # own process group: Ctrl-C goes to us, we stop it
        )
        _live.add(self)
        self._reader = threading.Thread(target=self._read_output, name="azurite-output", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop(timeout=3)
            raise
        return self

    def _read_output(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            self._output.append(line)
            match = _LISTENING.search(line)
            if match:
                with self._port_seen:
                    self._ports[match.group(1)] = int(match.group(2))
                    self._port_seen.notify_all()
        with self._port_seen:
            self._port_seen.notify_all()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with self._port_seen:
            while len(self._ports) < 3:
                if self._proc is None or self._proc.poll() is not None:
                    code = self._proc.returncode if self._proc else None
                    raise AzuriteError(f"Azurite exited during start-up (exit code {code}):\n{self.output}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AzuriteError(f"Azurite did not report its ports within {self.startup_timeout:.0f} s:\n{self.output}")
                self._port_seen.wait(min(remaining, 0.2))
        for service, port in self._ports.items():
            while not _port_open(self.host, port):
                if self._proc.poll() is not None:
                    raise AzuriteError(f"Azurite exited during start-up:\n{self.output}")
                if time.monotonic() > deadline:
                    raise AzuriteError(f"Azurite {service} port {port} does not accept connections")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        else:
            # Node may be gone while something it started still runs in its group.
            self._signal_group(proc, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(2)
        if proc.stdout is not None:
            proc.stdout.close()
        self._ports = {}

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # pgid == pid thanks to start_new_session
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Azurite":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"ports={self._ports}" if self.running else "stopped"
        return f"<Azurite {state} location={self.location or 'memory'}>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.azurite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--location", type=Path, help="persist data in this folder (default: in memory)")
    parser.add_argument("--blob-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--queue-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--table-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    az = Azurite(
        args.location,
        blob_port=args.blob_port,
        queue_port=args.queue_port,
        table_port=args.table_port,
        host=args.host,
    )
    try:
        az.start()
    except AzuriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(az.connection_string, flush=True)
        print(
            f"Azurite: blob {az.blob_port}, queue {az.queue_port}, table {az.table_port} on {az.host} "
            f"({az.location or 'in memory'}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            if not az.running:
                print(f"error: Azurite exited:\n{az.output}", file=sys.stderr)
                return 1
        return 0
    finally:
        az.stop()


if __name__ == "__main__":
    sys.exit(main())
