"""Command line: run the emulator for the local dev stack until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Mapping, Sequence

from .config import PROFILES, EmulatorConfig, Limits, OAuthToken, profile_limits
from .emulator import HveEmulator

log = logging.getLogger("hve_emulator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.hve_emulator",
        description="Local Exchange Online High Volume Email (HVE) SMTP emulator.",
        epilog=(
            "Without --accounts, accounts come from HVE_PASSWORDS (JSON object account -> "
            "password). XOAUTH2 tokens come from HVE_OAUTH_TOKENS (JSON object token -> account)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525, help="0 picks a free port (printed)")
    parser.add_argument("--accounts", help="account:password[,account:password...]")
    parser.add_argument("--internal-domains", default="", help="comma-separated accepted domains")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ga-2026")
    parser.add_argument("--state-dir", type=Path, default=Path(".local/hve-emulator"))
    parser.add_argument("--speedup", type=float, default=1.0, help="60: a real second counts as a minute")
    parser.add_argument("--max-message-bytes", type=int, help="override the profile's message size limit")
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override one limit ({', '.join(f.name for f in dataclasses.fields(Limits))}); "
        "VALUE 'none' switches it off",
    )
    parser.add_argument("--basic-auth-blocked", default="", help="comma-separated accounts refused with 5.7.139")
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> EmulatorConfig:
    overrides: dict[str, object] = dict(_parse_limit(item) for item in args.limit)
    if args.max_message_bytes is not None:
        overrides["max_message_bytes"] = args.max_message_bytes
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        accounts=_accounts(args.accounts, environ),
        oauth_tokens={
            token: OAuthToken(account=str(account))
            for token, account in _json_object(environ, "HVE_OAUTH_TOKENS").items()
        },
        internal_domains=frozenset(_csv(args.internal_domains)),
        profile=args.profile,
        limits=profile_limits(args.profile, **overrides) if overrides else None,
        basic_auth_blocked=frozenset(_csv(args.basic_auth_blocked)),
        state_dir=args.state_dir,
        speedup=args.speedup,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # aiosmtpd's own INFO lines name every recipient and its warnings repeat a deprecation on
    # each AUTH; our logger writes one line per transaction instead.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    try:
        config = config_from_args(args, os.environ if environ is None else environ)
    except ValueError as error:
        parser.error(str(error))
    if not config.accounts:
        parser.error("no accounts: pass --accounts or set HVE_PASSWORDS")

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with HveEmulator(config) as emulator:
        print(
            f"HVE emulator listening host={emulator.host} port={emulator.port} "
            f"ca_file={emulator.ca_file} profile={config.profile}",
            flush=True,
        )
        log.info(
            "accounts=%s internal_domains=%s messages_dir=%s",
            ",".join(config.accounts), ",".join(sorted(config.internal_domains)), emulator.messages_dir,
        )
        stop.wait()
        log.info("stopping")
    return 0


def _accounts(spec: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    if spec is None:
        return {str(k): str(v) for k, v in _json_object(environ, "HVE_PASSWORDS").items()}
    accounts = {}
    for position, item in enumerate(_csv(spec), start=1):
        # Split at the first ':' only: addresses have none, passwords may.
        address, sep, password = item.partition(":")
        if not sep or not address:
            # The entry itself is not echoed: it may be a password.
            raise ValueError(f"--accounts entry {position} must be account:password")
        accounts[address] = password
    return accounts


def _parse_limit(item: str) -> tuple[str, object]:
    name, sep, raw = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Limits)}
    if not sep or name not in fields:
        raise ValueError(f"--limit must be NAME=VALUE with NAME one of {', '.join(fields)}")
    lowered = raw.strip().lower()
    if lowered == "none":
        return name, None
    if name == "external_allowed":
        return name, lowered in ("1", "true", "yes")
    if name == "rate_window_seconds":
        return name, float(raw)
    return name, int(raw)


def _json_object(environ: Mapping[str, str], name: str) -> dict[str, object]:
    raw = environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]

