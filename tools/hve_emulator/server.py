"""The SMTP side: aiosmtpd's SMTP and Controller, extended through their documented hooks.

- HveHandler: handle_AUTH/MAIL/RCPT/DATA hooks and the `authenticator` callback carry the HVE
  rules (send-as, internal domains, quotas, faults).
- HveSMTP: an SMTP subclass for what hooks cannot do: the XOAUTH2 mechanism, Exchange wording
  of aiosmtpd's own replies, counting connections and replies, and dropping a connection.
- HveController: a Controller that reports the real port when asked for port 0.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from base64 import b64decode
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from . import replies
from .auth import AccountStore, AuthDecision, XOAuth2Credentials, parse_xoauth2
from .clock import EmulatorClock
from .config import Limits
from .domains import InternalDomains
from .faults import FaultInjector
from .limits import SubmissionLimiter
from .store import MessageStore, Stats

log = logging.getLogger("hve_emulator")


def _code(reply: str) -> str:
    """'450 4.5.104' from a full reply: enough to log, never a recipient or message id."""
    return " ".join(reply.split()[:2])


class HveSMTP(SMTP):
    """One client connection (aiosmtpd creates one SMTP instance per connection)."""

    def __init__(self, handler: "HveHandler", **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._hve = handler
        self._last_reply = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS; only the first call is a new TCP connection.
        if self._original_transport is None:
            self._hve.stats.connection_opened()
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        # A CONNECT fault replaces the 220 greeting (or drops the connection) and ends the session.
        fault = self._hve.faults.take("CONNECT")
        if fault is None:
            await super()._handle_client()
            return
        log.info("fault stage=CONNECT reply=%s", "connection dropped" if fault.drops else _code(str(fault.reply)))
        transport = self._original_transport or self.transport
        if fault.drops:
            if transport is not None:
                transport.abort()
            return
        await self.push(str(fault.reply))
        if transport is not None:
            transport.close()

    async def push(self, status: Any) -> None:
        # str replies are final or intermediate status lines; bytes are AUTH challenges (334).
        if isinstance(status, str):
            status = replies.STOCK_REWRITES.get(status, status)
            self._last_reply = status
            self._hve.stats.reply_sent(status)
        await super().push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Wrapped so that every outcome of a transaction is logged once, including the size
        # refusal aiosmtpd makes itself without calling handle_DATA.
        session, envelope = self.session, self.envelope
        await super().smtp_DATA(arg)
        if session is not None and envelope is not None:
            self._hve.log_transaction(session, envelope, self._last_reply)

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2, as an initial response or after an empty 334 challenge."""
        if len(args) == 1:
            raw = await self.challenge_auth("")
            if raw is MISSING:
                return AuthResult(success=False, handled=True)  # aiosmtpd has replied already
            assert isinstance(raw, bytes)
        else:
            try:
                raw = b64decode(args[1], validate=True)
            except ValueError:
                raw = b""
        credentials = parse_xoauth2(raw)
        if credentials is None:
            self._hve.stats.auth_result(False)
            await self.push(replies.XOAUTH2_MALFORMED)
            return AuthResult(success=False, handled=True)
        return self._authenticate("XOAUTH2", credentials)

    async def drop_connection(self) -> None:
        """Close the TCP connection abruptly without a reply, as a crashed front end would."""
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()
        assert self._handler_coroutine is not None
        self._handler_coroutine.cancel()
        # The cancellation is delivered here and unwinds aiosmtpd's command loop: no reply.
        await asyncio.sleep(0)


class HveHandler:
    """aiosmtpd handler: every HVE rule is decided here, on the server's event loop."""

    def __init__(
        self,
        *,
        accounts: AccountStore,
        domains: InternalDomains,
        limits: Limits,
        limiter: SubmissionLimiter,
        faults: FaultInjector,
        store: MessageStore,
        stats: Stats,
        clock: EmulatorClock,
        hostname: str,
    ) -> None:
        self.accounts = accounts
        self.domains = domains
        self.limits = limits
        self.limiter = limiter
        self.faults = faults
        self.store = store
        self.stats = stats
        self.clock = clock
        self.hostname = hostname
        # Seconds every AUTH waits before it is answered (a slow front end: a new session takes
        # that much longer to be ready). Set by tests through HveEmulator.slow_auth. (Not named
        # auth_*: aiosmtpd offers every handler attribute so named as an AUTH mechanism.)
        self.slow_auth_seconds = 0.0
        # Seconds the reply to DATA waits after the message was judged (a slow back end: the
        # session stays busy that much longer). Set through HveEmulator.slow_data.
        self.slow_data_seconds = 0.0

    # -- aiosmtpd authenticator callback ------------------------------------------------------

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            decision = self.accounts.check_password(
                auth_data.login.decode("utf-8", "replace"), auth_data.password.decode("utf-8", "replace")
            )
        elif isinstance(auth_data, XOAuth2Credentials):
            decision = self.accounts.check_token(auth_data, self.clock.now())
        else:
            decision = AuthDecision(None, replies.AUTH_FAILED)
        self.stats.auth_result(decision.account is not None)
        if decision.account is None:
            log.info("auth refused mechanism=%s reply=%s", mechanism, _code(decision.reply))
            return AuthResult(success=False, handled=False, message=decision.reply)
        log.info("auth ok mechanism=%s account=%s", mechanism, decision.account)
        # auth_data ends up in session.auth_data: the account this connection may send as.
        return AuthResult(success=True, auth_data=decision.account, message=decision.reply)

    # -- aiosmtpd hooks -----------------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must set it itself
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_AUTH(self, server: HveSMTP, session: Session, envelope: Envelope, args: list[str]) -> Any:
        if self.slow_auth_seconds > 0:
            await asyncio.sleep(self.slow_auth_seconds)
        fault = await self._apply_fault(server, session, "AUTH")
        return fault if fault is not None else MISSING

    async def handle_MAIL(
        self, server: HveSMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        fault = await self._apply_fault(server, session, "MAIL")
        if fault is not None:
            return fault
        account = session.auth_data if session.authenticated else None
        if account is None:
            reply = replies.NOT_AUTHENTICATED
        elif address.lower() != str(account).lower():
            reply = replies.SEND_AS_DENIED
        else:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return replies.SENDER_OK
        log.info("refused stage=MAIL account=%s reply=%s", account, _code(reply))
        return reply

    async def handle_RCPT(
        self, server: HveSMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        fault = await self._apply_fault(server, session, "RCPT")
        if fault is not None:
            return fault
        cap = self.limits.recipients_per_message
        if cap is not None and len(envelope.rcpt_tos) >= cap:
            reply = replies.TOO_MANY_RECIPIENTS
        elif not self.limits.external_allowed and not self.domains.is_internal(address):
            reply = replies.EXTERNAL_NOT_SUPPORTED
        else:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return replies.RECIPIENT_OK
        log.info("refused stage=RCPT account=%s reply=%s", session.auth_data, _code(reply))
        return reply

    async def handle_DATA(self, server: HveSMTP, session: Session, envelope: Envelope) -> str:
        fault = self.faults.take("DATA")
        if fault is not None and not fault.after_accept:
            if fault.drops:
                await self._drop(server, session, "DATA")
            return str(fault.reply)
        account = str(session.auth_data)
        internal, external = self.domains.split(envelope.rcpt_tos)
        now = self.clock.now()
        reply = self.limiter.admit(account, internal, external, now)
        if reply is None:
            content = envelope.original_content or b""
            message_id = _message_id(content) or f"<{uuid.uuid4().hex}@{self.hostname}>"
            internal_id = self.store.next_id()
            self.store.save(
                internal_id, account, str(envelope.mail_from), tuple(envelope.rcpt_tos),
                (internal, external), content, message_id, now,
            )
            self.stats.accepted(account, internal, external)
            reply = replies.queued(message_id, internal_id, self.hostname)
        if fault is not None:  # drop after the server's decision: the client never learns it
            self.log_transaction(session, envelope, reply)
            await self._drop(server, session, "DATA")
        elif self.slow_data_seconds > 0:
            await asyncio.sleep(self.slow_data_seconds)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that does not trust our CA: expected in tests, not worth a traceback.
            # aiosmtpd closes such a connection without sending this reply.
            log.info("TLS handshake failed: %s", error.__cause__)
        else:
            log.error("SMTP session error", exc_info=error)
        return f"500 Error: ({error.__class__.__name__}) {error}"

    # -- helpers ------------------------------------------------------------------------------

    def log_transaction(self, session: Session, envelope: Envelope, reply: str) -> None:
        internal, external = self.domains.split(envelope.rcpt_tos)
        size = len(envelope.original_content or b"")
        log.info(
            "transaction account=%s reply=%s internal=%d external=%d bytes=%d",
            session.auth_data, _code(reply), internal, external, size,
        )

    async def _apply_fault(self, server: HveSMTP, session: Session, stage: str) -> str | None:
        """The queued fault reply for this stage, or None; a queued drop never returns."""
        fault = self.faults.take(stage)
        if fault is None:
            return None
        if fault.drops:
            await self._drop(server, session, stage)
        log.info("fault stage=%s account=%s reply=%s", stage, session.auth_data, _code(str(fault.reply)))
        return fault.reply

    async def _drop(self, server: HveSMTP, session: Session, stage: str) -> None:
        log.info("fault stage=%s account=%s connection dropped", stage, session.auth_data)
        await server.drop_connection()


def _message_id(content: bytes) -> str | None:
    headers = BytesHeaderParser(policy=compat32).parsebytes(content, headersonly=True)
    value = headers.get("Message-ID")
    return " ".join(str(value).split()) if value else None


class HveController(Controller):
    def factory(self) -> HveSMTP:
        return HveSMTP(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        # Controller's own readiness probe connects to self.port, so with port 0 the port the
        # OS picked must be known as soon as the socket is bound.
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await super()._create_server()
        self.port = server.sockets[0].getsockname()[1]
        return server
