"""HveEmulator: the object tests and the local dev stack start, inspect and steer."""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from . import replies
from .auth import AccountStore
from .certs import CertPaths, ensure_certificates, server_tls_context
from .clock import EmulatorClock
from .config import EmulatorConfig, Limits, OAuthToken
from .domains import InternalDomains
from .faults import FaultInjector
from .limits import SubmissionLimiter
from .server import HveController, HveHandler
from .store import MessageStore, Stats, StoredMessage

MESSAGES_DIR = "messages"


class HveEmulator:
    """A local HVE endpoint on its own thread. Every public method is safe to call from any thread.

    Usage::

        with HveEmulator(EmulatorConfig(accounts={"news@contoso.com": "pw"})) as emu:
            connect_to(emu.host, emu.port, cafile=emu.ca_file)
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.limits: Limits = self.config.effective_limits()
        self.state_dir = self.config.state_dir.resolve()
        self.clock = EmulatorClock(self.config.clock, self.config.speedup)
        self._accounts = AccountStore(
            self.config.accounts, self.config.oauth_tokens, self.config.basic_auth_blocked
        )
        self._faults = FaultInjector()
        self._limiter = SubmissionLimiter(self.limits)
        self._store = MessageStore(self.state_dir / MESSAGES_DIR)
        self._stats = Stats()
        self._controller: HveController | None = None
        self._handler: HveHandler | None = None
        self._slow_auth_seconds = 0.0
        self._slow_data_seconds = 0.0
        self._certs: CertPaths | None = None
        self._lifecycle = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "HveEmulator":
        with self._lifecycle:
            if self._controller is not None:
                raise RuntimeError("HVE emulator already running")
            # aiosmtpd logs every recipient at INFO and a deprecation warning on each AUTH.
            logging.getLogger("mail.log").setLevel(logging.ERROR)
            self._certs = ensure_certificates(self.state_dir)
            self._store.open()
            handler = HveHandler(
                accounts=self._accounts,
                domains=InternalDomains(self.config.internal_domains),
                limits=self.limits,
                limiter=self._limiter,
                faults=self._faults,
                store=self._store,
                stats=self._stats,
                clock=self.clock,
                hostname=self.config.hostname,
            )
            handler.slow_auth_seconds = self._slow_auth_seconds
            handler.slow_data_seconds = self._slow_data_seconds
            self._handler = handler
            controller = HveController(
                handler,
                hostname=self.config.host,
                port=self.config.port,
                server_hostname=self.config.hostname,
                ident=replies.GREETING_IDENT,
                tls_context=server_tls_context(self._certs),
                require_starttls=True,
                auth_require_tls=True,
                authenticator=handler.authenticate,
                data_size_limit=self.limits.max_message_bytes,
                enable_SMTPUTF8=True,
                decode_data=False,
            )
            controller.start()
            # Controller.start() opens one probe connection of its own; it is not a client's.
            self._stats.reset()
            self._controller = controller
        return self

    def stop(self) -> None:
        with self._lifecycle:
            if self._controller is not None:
                self._controller.stop()
                self._controller = None

    def __enter__(self) -> "HveEmulator":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    # -- where to connect ----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The listening port (the OS-chosen one when configured as 0)."""
        return self._controller.port if self._controller is not None else self.config.port

    @property
    def ca_file(self) -> Path:
        """PEM of the CA that signed the server certificate; trust it, never disable checks."""
        return self._certs.ca_file if self._certs is not None else self.state_dir / "ca.pem"

    @property
    def messages_dir(self) -> Path:
        return self._store.directory

    def client_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- what happened -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Plain dict: connections_opened, auth_count, auth_failures, accepted_messages,
        internal_recipients, external_recipients, accounts{addr: {messages, internal_recipients,
        external_recipients}}, replies{enhanced code: count}, faults_pending{stage: count}."""
        snapshot = self._stats.snapshot()
        snapshot["faults_pending"] = self._faults.pending()
        return snapshot

    def messages(self) -> list[Path]:
        """Paths of the .eml files accepted since start (or the last reset()), oldest first."""
        return [record.path for record in self._store.records()]

    def accepted(self) -> list[StoredMessage]:
        """The accepted messages with their envelope, Message-ID and InternalId."""
        return self._store.records()

    @property
    def connections_opened(self) -> int:
        return self._stats.connections_opened

    @property
    def auth_count(self) -> int:
        """Successful AUTH commands."""
        return self._stats.auth_count

    def now(self) -> float:
        """The emulator's clock (injected clock, sped up), in epoch seconds."""
        return self.clock.now()

    # -- steering (faults and accounts) ------------------------------------------------------

    def fail_next(self, count: int = 1, reply: str = replies.DEFAULT_FAULT, stage: str = "DATA") -> None:
        """The next `count` commands of `stage` (AUTH, MAIL, RCPT or DATA) get `reply`.
        DATA faults answer after the message content, like a real end-of-data reply.
        Stage CONNECT: the next `count` connections are greeted with `reply` instead of 220, then closed."""
        self._faults.fail_next(count, reply, stage)

    def drop_next(self, count: int = 1, stage: str = "DATA", *, after_accept: bool = False) -> None:
        """The next `count` commands of `stage` close the TCP connection without any reply.
        At DATA the content has been read; after_accept=True stores and counts the message
        first, so the client loses a 250 it never saw."""
        self._faults.drop_next(count, stage, after_accept=after_accept)

    def slow_auth(self, seconds: float) -> None:
        """Every AUTH from now on is answered `seconds` later (0: at once), as a slow front end would:
        a new session (TCP, STARTTLS, AUTH) takes that much longer to be ready for MAIL FROM.
        Sessions already authenticated are not slowed."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._slow_auth_seconds = float(seconds)
        if self._handler is not None:
            self._handler.slow_auth_seconds = self._slow_auth_seconds

    def slow_data(self, seconds: float) -> None:
        """Every reply to DATA from now on comes `seconds` after the message was judged (and, when
        accepted, stored with the time of judging), as a slow back end would: each transaction
        keeps its session that much longer. 0: at once."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._slow_data_seconds = float(seconds)
        if self._handler is not None:
            self._handler.slow_data_seconds = self._slow_data_seconds

    def set_password(self, account: str, password: str) -> None:
        self._accounts.set_password(account, password)

    def block_basic_auth(self, account: str, blocked: bool = True) -> None:
        self._accounts.block_basic_auth(account, blocked)

    def disable_account(self, account: str, disabled: bool = True) -> None:
        self._accounts.disable_account(account, disabled)

    def set_oauth_token(
        self, token: str, account: str, *, expires_at: float | None = None, mail_send: bool = True
    ) -> None:
        self._accounts.set_oauth_token(token, OAuthToken(account, expires_at, mail_send))

    def revoke_oauth_token(self, token: str) -> None:
        self._accounts.set_oauth_token(token, None)

    def reset(self) -> None:
        """Counters, faults, the AUTH and DATA delays, quota windows and the messages() list back to empty;
        accounts, passwords and tokens back to the configuration. Files on disk stay."""
        self._faults.clear()
        self.slow_auth(0.0)
        self.slow_data(0.0)
        self._accounts.reset()
        self._limiter.reset()
        self._store.forget()
        self._stats.reset()
