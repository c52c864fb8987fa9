"""SMTP submission to HVE: STARTTLS, validated certificates, AUTH, and a per-account session pool.

The pool lives as long as the worker process (one per event loop), so consecutive invocations
reuse authenticated sessions instead of paying TCP + TLS + AUTH for every message.
Failures never raise out of `submit`, `lease` or `SessionLease.send`: they come back as a `Verdict`
carrying the SMTP code. A caller with something to check at the moment that counts at HVE (the send
stage: its slot, its ledger claim) takes a `lease` on a session ready for MAIL FROM, checks, then
sends or gives the session back; the adapter never calls back into it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from shared.hve.credentials import CredentialError, PasswordSource, TokenSource
from shared.send.replies import Outcome, Verdict, classify_reply, connection_lost

log = logging.getLogger("hve_relay.smtp")

# A session idle longer than this may have been dropped by the server: probe it with RSET first.
PROBE_AFTER_IDLE_SECONDS = 10.0
# After an account fails AUTH, this process answers for it without logging in again for a while
# (at most this long, and never longer than the governor rests the account): a burst of messages
# must not become a burst of failed logins, which can lock an account out.
AUTH_FAILURE_HOLD_SECONDS = 10.0


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """System trust plus an optional extra CA (a local emulator); TLS 1.2 or newer; names checked."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class AuthError(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.text)
        self.verdict = verdict


class Authenticator(Protocol):
    async def authenticate(self, smtp: aiosmtplib.SMTP, account: str) -> None: ...


class BasicAuth:
    """AUTH LOGIN/PLAIN with the account's password."""

    def __init__(self, passwords: PasswordSource) -> None:
        self._passwords = passwords

    async def authenticate(self, smtp: aiosmtplib.SMTP, account: str) -> None:
        password = await self._passwords.password(account)
        # One mechanism, not aiosmtplib's login() which tries the next one after a 535: a wrong
        # password must cost one failed login, not two.
        if not smtp.server_auth_methods:  # aiosmtplib says EHLO again after STARTTLS only when asked
            await smtp.ehlo()
        methods = smtp.server_auth_methods
        try:
            if "plain" in methods:
                await smtp.auth_plain(account, password)
            elif "login" in methods:
                await smtp.auth_login(account, password)
            else:
                raise AuthError(Verdict(Outcome.ACCOUNT, 0, "", "the server offers neither AUTH PLAIN nor AUTH LOGIN"))
        except aiosmtplib.SMTPAuthenticationError:
            # The password may have been rotated in Key Vault: read it again next time.
            self._passwords.forget(account)
            raise


class OAuthAuth:
    """AUTH XOAUTH2 with an app-only token; on 5.7.142/5.7.143 the token is refreshed once."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def authenticate(self, smtp: aiosmtplib.SMTP, account: str) -> None:
        try:
            await smtp.auth_xoauth2(account, await self._tokens.token())
        except aiosmtplib.SMTPAuthenticationError as exc:
            if not classify_reply(exc.code, exc.message).token_expired:
                raise
            await smtp.auth_xoauth2(account, await self._tokens.token(force_refresh=True))


@dataclass
class _Session:
    smtp: aiosmtplib.SMTP
    last_used: float
    dirty: bool = False  # last transaction failed: RSET before the next one


@dataclass
class _AccountPool:
    slots: asyncio.Semaphore
    idle: list[_Session] = field(default_factory=list)
    ahead: int = 0  # leases taken ahead of their moment (`HveSmtp.lease_ahead`) not given back yet


@dataclass(frozen=True)
class SubmitResult:
    verdict: Verdict
    # Recipients the server refused for good (5xx at RCPT) while accepting the message for others.
    refused: dict[str, str] = field(default_factory=dict)
    # Recipients the server refused for now (4xx at RCPT): they need another transaction.
    deferred: dict[str, Verdict] = field(default_factory=dict)
    # Whether HVE may have the message: the DATA command was sent and no final reply proved
    # otherwise. False means "definitely not delivered" (safe to give the slot back, safe to
    # resend at once).
    maybe_delivered: bool = False


@dataclass
class PoolStats:
    connections_opened: int = 0
    sessions_reused: int = 0
    transactions: int = 0


def _split(reply: str) -> tuple[int, str]:
    code, _, text = reply.partition(" ")
    return int(code), text


class SessionLease:
    """An authenticated session, ready for MAIL FROM, held for one transaction with its pool slot.

    `HveSmtp.lease` returns it at the moment that counts at HVE; the caller makes its own checks
    (its slot, its claim) and then either calls `send` once or leaves the `async with` block
    without sending: the session goes back to the pool (reset before its next use), or is closed
    when the block raised. The adapter never calls back into the caller."""

    def __init__(self, owner: HveSmtp, pool: _AccountPool, account: str, session: _Session, reused: bool) -> None:
        self._owner = owner
        self._pool = pool
        self._account = account
        self._session: _Session | None = session
        self._reused = reused
        self.ahead = False  # counted in the pool's leases taken ahead until given back

    async def __aenter__(self) -> SessionLease:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        session, self._session = self._session, None
        try:
            if session is not None:  # not sent: called off, or the caller's check raised
                if exc_type is None:
                    self._owner._keep(self._pool, session, dirty=True)
                else:
                    session.smtp.close()  # not leaked (the caller's check failed: storage down)
        finally:
            self._owner._give_place(self._pool)
            if self.ahead:
                self.ahead = False
                self._pool.ahead -= 1

    async def send(self, recipients: Sequence[str], message: bytes) -> SubmitResult:
        """The transaction: MAIL FROM, RCPT, DATA. A reused session found dead before DATA is
        replaced once (nothing was sent on it)."""
        session = self._session
        if session is None:
            raise RuntimeError("a session lease carries one transaction")
        owner = self._owner
        result, keep = await owner._transaction(session, self._account, recipients, message)
        self._session = None
        if not self._reused or keep or result.verdict.code != 0 or result.maybe_delivered:
            # A reply lost after DATA is never resent here: the caller defers it through the
            # ledger, so the resend is governed and counted.
            return owner._finish(self._pool, session, result, keep)
        session.smtp.close()
        # The reused session was dead before DATA: one fresh session is safe.
        fresh = await owner._open_or_fail(self._account)
        if isinstance(fresh, SubmitResult):
            return fresh
        result, keep = await owner._transaction(fresh, self._account, recipients, message)
        return owner._finish(self._pool, fresh, result, keep)


class HveSmtp:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        authenticator: Authenticator,
        context: ssl.SSLContext,
        timeout: float = 30.0,
        pool_size: int = 4,
        idle_seconds: float = 60.0,
        auth_failure_hold: float = AUTH_FAILURE_HOLD_SECONDS,
        pool_wait: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host, self._port = host, port
        self._auth = authenticator
        self._context = context
        self._timeout = timeout
        self._pool_size = pool_size
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._pools: dict[str, _AccountPool] = {}
        self._auth_failed: dict[str, tuple[float, Verdict]] = {}
        self._auth_failure_hold = auth_failure_hold
        self._pool_wait = pool_wait
        self._room_waiters: list[asyncio.Future[None]] = []
        self._places_given_back = 0
        self.stats = PoolStats()

    def _pool(self, account: str) -> _AccountPool:
        pool = self._pools.get(account)
        if pool is None:
            pool = self._pools[account] = _AccountPool(asyncio.Semaphore(self._pool_size))
        return pool

    def busy(self, account: str) -> bool:
        """Whether a `lease` of `account` would have to wait for another caller's session now."""
        return self._pool(account).slots.locked()

    @property
    def places_given_back(self) -> int:
        """How many places callers have given back to the pools so far (a mark for
        `place_given_back`)."""
        return self._places_given_back

    async def place_given_back(self, timeout: float, since: int | None = None) -> bool:
        """Wait until some caller gives a place back in any account's pool (True), or `timeout`
        seconds (False). For a caller that saw every account it could use `busy`. `since`: a mark
        (`places_given_back`) read before the caller looked; a place given back after it counts,
        also one given back before this call (while the caller was still deciding)."""
        if since is not None and self._places_given_back > since:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout=timeout)
        except TimeoutError:
            return False
        finally:
            if waiter in self._room_waiters:
                self._room_waiters.remove(waiter)
        return True

    def _give_place(self, pool: _AccountPool) -> None:
        pool.slots.release()
        self._places_given_back += 1
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _open(self, account: str) -> _Session:
        smtp = aiosmtplib.SMTP(
            hostname=self._host, port=self._port, start_tls=True, tls_context=self._context, timeout=self._timeout
        )
        await smtp.connect()
        self.stats.connections_opened += 1
        try:
            if smtp.get_transport_info("ssl_object") is None:
                # Never send credentials in clear text, whatever the server offered.
                raise AuthError(
                    Verdict(Outcome.ACCOUNT, 0, "", "refusing to authenticate: the connection is not encrypted")
                )
            await self._auth.authenticate(smtp, account)
        except BaseException:
            smtp.close()
            raise
        return _Session(smtp, self._clock())

    async def submit(self, account: str, recipients: Sequence[str], message: bytes) -> SubmitResult:
        """One transaction for `recipients`, on a pooled session (for callers with nothing to
        check before MAIL FROM; the send stage takes a `lease` and checks first)."""
        lease = await self.lease(account)
        if isinstance(lease, SubmitResult):
            return lease
        async with lease:
            return await lease.send(recipients, message)

    async def lease(self, account: str) -> SessionLease | SubmitResult:
        """A session of `account` ready for MAIL FROM (reused, or opened: TCP, STARTTLS, AUTH), or
        why there is none (no session free within the pool wait, AUTH refused, connection failed)."""
        pool = self._pool(account)
        if not pool.slots.locked():
            # A place is free: taken before this call first yields to the event loop, so a caller
            # that saw `busy(account)` false a moment ago (with no await since) gets it.
            await pool.slots.acquire()
        else:
            try:
                # Bounded: a message must not wait on a busy pool past its slot (and its ledger lease).
                await asyncio.wait_for(pool.slots.acquire(), timeout=self._pool_wait)
            except TimeoutError:
                return SubmitResult(
                    Verdict(Outcome.DEFER, 0, "", f"no SMTP session free for {account} within {self._pool_wait:g} s")
                )
        try:
            ready = await self._ready(pool, account)
        except BaseException:
            self._give_place(pool)
            raise
        if isinstance(ready, SubmitResult):
            self._give_place(pool)
        return ready

    async def lease_ahead(self, account: str) -> SessionLease | SubmitResult | None:
        """`lease`, for a caller that takes its session before the moment it sends (a booked slot a
        moment away), or None when that would leave no session of the pool for callers whose
        moment is now: at most pool size - 1 leases are held ahead at once."""
        pool = self._pool(account)
        if pool.ahead >= self._pool_size - 1:
            return None
        pool.ahead += 1
        try:
            lease = await self.lease(account)
        except BaseException:
            pool.ahead -= 1
            raise
        if isinstance(lease, SubmitResult):
            pool.ahead -= 1
        else:
            lease.ahead = True
        return lease

    async def _ready(self, pool: _AccountPool, account: str) -> SessionLease | SubmitResult:
        held = self._auth_failed.get(account)
        if held is not None and self._clock() < held[0]:
            return SubmitResult(held[1])
        # Every account's idle sessions are checked, so a quiet account's sessions close too.
        for each in self._pools.values():
            self._close_expired(each)
        if pool.idle:
            self.stats.sessions_reused += 1
            return SessionLease(self, pool, account, pool.idle.pop(), reused=True)
        opened = await self._open_or_fail(account)
        if isinstance(opened, SubmitResult):
            return opened
        return SessionLease(self, pool, account, opened, reused=False)

    async def _open_or_fail(self, account: str) -> _Session | SubmitResult:
        try:
            return await self._open(account)
        except AuthError as exc:
            return SubmitResult(exc.verdict)
        except aiosmtplib.SMTPAuthenticationError as exc:
            verdict = classify_reply(exc.code, exc.message)
            self._auth_failed[account] = (self._clock() + self._auth_failure_hold, verdict)
            return SubmitResult(verdict)
        except aiosmtplib.SMTPResponseException as exc:
            return SubmitResult(classify_reply(exc.code, exc.message))
        except CredentialError as exc:
            # Code 0: a local failure (Key Vault, managed identity), not a reply about the account.
            return SubmitResult(Verdict(Outcome.ACCOUNT, 0, "", f"credential: {exc}"[:300]))
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            return SubmitResult(connection_lost(f"{type(exc).__name__}: {exc}"))

    def _keep(self, pool: _AccountPool, session: _Session, *, dirty: bool) -> None:
        session.last_used = self._clock()
        session.dirty = dirty
        pool.idle.append(session)

    def _finish(self, pool: _AccountPool, session: _Session, result: SubmitResult, keep: bool) -> SubmitResult:
        if keep:
            self._keep(pool, session, dirty=result.verdict.outcome is not Outcome.SENT)
        else:
            session.smtp.close()
        return result

    async def _transaction(
        self, session: _Session, account: str, recipients: Sequence[str], message: bytes
    ) -> tuple[SubmitResult, bool]:
        """MAIL, one RCPT per recipient, DATA, each step on its own so a failure is known to be
        before DATA (nothing delivered) or after it (maybe delivered). Returns the result and
        whether the session can be reused."""
        smtp = session.smtp
        self.stats.transactions += 1
        data_sent = False
        try:
            if session.dirty or self._clock() - session.last_used > PROBE_AFTER_IDLE_SECONDS:
                await smtp.rset()
            options = [f"SIZE={len(message)}"] if "size" in smtp.esmtp_extensions else []
            await smtp.mail(account, options=options)
            refused: dict[str, str] = {}
            deferred: dict[str, Verdict] = {}
            for recipient in recipients:
                try:
                    await smtp.rcpt(recipient)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    verdict = classify_reply(exc.code, exc.message)
                    if exc.code == 421:
                        raise aiosmtplib.SMTPResponseException(exc.code, exc.message) from exc
                    if 400 <= exc.code < 500:
                        deferred[recipient] = verdict
                    else:
                        refused[recipient] = f"{exc.code} {exc.message}"
            if len(refused) + len(deferred) == len(recipients):
                # Nobody to send to: the first temporary refusal (it may be throttling) wins.
                first = next(iter(deferred.values()), None) or classify_reply(*_split(next(iter(refused.values()))))
                await smtp.rset()
                return SubmitResult(first, refused, deferred), True
            data_sent = True
            reply = await smtp.data(message)
        except (TimeoutError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            return SubmitResult(connection_lost(f"{type(exc).__name__}: {exc}"), maybe_delivered=data_sent), False
        except aiosmtplib.SMTPResponseException as exc:
            # A reply, so the server's answer is known: not delivered.
            verdict = classify_reply(exc.code, exc.message)
            return SubmitResult(verdict), exc.code != 421 and smtp.is_connected
        except aiosmtplib.SMTPException as exc:
            return SubmitResult(connection_lost(f"{type(exc).__name__}: {exc}"), maybe_delivered=data_sent), False
        return SubmitResult(classify_reply(reply.code, reply.message), refused, deferred, maybe_delivered=True), True

    def _close_expired(self, pool: _AccountPool) -> None:
        now = self._clock()
        keep = []
        for session in pool.idle:
            if now - session.last_used > self._idle_seconds or not session.smtp.is_connected:
                session.smtp.close()
            else:
                keep.append(session)
        pool.idle[:] = keep

    async def close(self) -> None:
        for pool in self._pools.values():
            for session in pool.idle:
                try:
                    await asyncio.wait_for(session.smtp.quit(), timeout=2)
                except Exception:
                    session.smtp.close()
            pool.idle.clear()
