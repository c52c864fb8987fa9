"""The local host (`python -m tools.devhost`) as a separate process, for benches and tests that need
real host behaviour: its own polling back-off, batches, leases, and a process that can be killed.

    host = HostProcess(workdir, settings, host_json={...}, lease_seconds=3)
    host.start()                  # send_mail only, no HTTP (http_port=N: HTTP too); log in workdir/host-<run>.log
    ...
    host.terminate()              # graceful (SIGTERM), or host.kill() (SIGKILL, like a lost instance)

Several hosts may share one queue: give each its own workdir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from shared.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]


class HostProcess:
    """`python -m tools.devhost` with its own settings file and host.json."""

    def __init__(self, workdir: Path, settings: Mapping[str, str], *, host_json: Mapping[str, Any],
                 lease_seconds: float | None = None, log_level: str = "WARNING", functions: str = "send_mail",
                 http_port: int | None = None, env: Mapping[str, str] | None = None,
                 app: str = "function_app") -> None:
        self.workdir = workdir
        self.app = app  # the function app module (bench/next_free_app.py: the next-free experiment)
        workdir.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds  # None: the host's own default (10 minutes, like Azure)
        self.log_level = log_level
        self.functions = functions
        self.http_port = http_port  # None: no HTTP
        self.env = dict(env or {})  # extra environment (not app settings), e.g. OTEL_BSP_SCHEDULE_DELAY
        self.settings_file = workdir / "local.settings.json"
        self.settings_file.write_text(json.dumps({"IsEncrypted": False, "Values": dict(settings)}))
        self.host_json = workdir / "host.json"
        self.host_json.write_text(json.dumps(host_json))
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def log_file(self) -> Path:
        """The log of the latest run."""
        return self.workdir / f"host-{self.runs}.log"

    def start(self, *, once: bool = False) -> None:
        self.runs += 1
        # Only this run's settings: nothing from the caller's environment may override them.
        env = {k: v for k, v in os.environ.items() if k not in {s.name for s in SETTINGS}} | self.env
        http = ["--no-http"] if self.http_port is None else ["--http-port", str(self.http_port)]
        args = [sys.executable, "-m", "tools.devhost", "--app", self.app, "--settings", str(self.settings_file),
                "--host-json", str(self.host_json), *http, "--functions", self.functions,
                "--log-level", self.log_level]
        if self.lease_seconds is not None:
            args += ["--lease-seconds", str(self.lease_seconds)]
        if once:
            args.append("--once")
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no graceful shutdown, leases and SMTP sessions left as they are
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM: the host stops taking messages and lets in-flight invocations finish."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(120)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
