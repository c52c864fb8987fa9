"""The SMTP adapter's security promises, against real servers on loopback."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Iterator

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult

from shared.hve.credentials import LocalPasswords
from shared.hve.smtp import BasicAuth, HveSmtp, tls_context
from shared.send.replies import Outcome

MESSAGE = b"From: news@contoso.com\r\nTo: ann@contoso.com\r\nSubject: t\r\n\r\nhi\r\n"


class Recorder:
    """A plain SMTP server with no STARTTLS that offers AUTH PLAIN/LOGIN in the clear and accepts
    any credentials: records every command it is sent, AUTH included (the mechanism and whether
    the connection was encrypted, never the credentials)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.commands.append("EHLO")
        return responses

    async def handle_AUTH(self, server, session, envelope, args):
        self.commands.append(f"AUTH {args[0]} {'tls' if session.ssl else 'clear'}")
        return MISSING  # aiosmtpd carries on with the exchange and calls the authenticator

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.commands.append("MAIL")
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.commands.append("DATA")
        return "250 OK"

    @property
    def auth_lines(self) -> list[str]:
        return [c for c in self.commands if c.startswith("AUTH")]


class RecorderController(Controller):
    """Binds port 0 itself and reads the port the OS chose, so no other process can take it
    between choosing and binding."""

    def _create_server(self) -> Any:
        return self._bind()

    async def _bind(self) -> asyncio.AbstractServer:
        server = await super()._create_server()
        self.port = server.sockets[0].getsockname()[1]
        return server


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, int]]:
    handler = Recorder()
    controller = RecorderController(handler, hostname="127.0.0.1", port=0, auth_require_tls=False,
                                    authenticator=lambda *args: AuthResult(success=True))
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def submitter(port: int, context: ssl.SSLContext) -> HveSmtp:
    return HveSmtp(host="127.0.0.1", port=port, context=context, timeout=5,
                   authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))


async def submit_once(smtp: HveSmtp):
    try:
        return await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
    finally:
        await smtp.close()


def test_the_recorder_logs_auth_sent_in_the_clear(recorder):
    """The control for the tests below: a client that does authenticate in the clear is seen."""
    handler, port = recorder

    async def main():
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await client.connect()
        await client.ehlo()
        await client.auth_plain("news@contoso.com", "news-pw")
        await client.quit()

    asyncio.run(main())
    assert handler.auth_lines == ["AUTH PLAIN clear"]


def test_no_auth_and_no_mail_on_a_server_without_starttls(recorder):
    handler, port = recorder
    result = asyncio.run(submit_once(submitter(port, tls_context())))
    assert result.verdict.outcome is not Outcome.SENT
    assert handler.commands == ["EHLO"]  # it talked to the server, and stopped there
    assert "STARTTLS" in result.verdict.text


def test_no_auth_in_the_clear_even_from_a_client_that_would_settle_for_plain_text(recorder, monkeypatch):
    """The adapter's own guard, not aiosmtplib's STARTTLS check: the SMTP client is made to settle
    for plain text when the server offers no STARTTLS (start_tls=None, what a "make it work with
    my local server" change would do). The guard must still refuse to send credentials."""
    handler, port = recorder

    class SettlesForPlainText(aiosmtplib.SMTP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "start_tls": None})

    monkeypatch.setattr(aiosmtplib, "SMTP", SettlesForPlainText)
    result = asyncio.run(submit_once(submitter(port, tls_context())))
    assert handler.auth_lines == [] and "MAIL" not in handler.commands
    assert handler.commands == ["EHLO"]  # the connection did get that far: in the clear
    assert result.verdict.outcome is Outcome.ACCOUNT and "not encrypted" in result.verdict.text


def test_an_untrusted_certificate_is_refused_before_any_credential_is_sent(emulator):
    async def main():
        smtp = submitter(emulator.port, tls_context())  # system CAs only: the emulator's CA is not trusted
        try:
            return await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
        finally:
            await smtp.close()

    result = asyncio.run(main())
    assert result.verdict.outcome is Outcome.DEFER and "CERTIFICATE_VERIFY_FAILED" in result.verdict.text
    assert emulator.auth_count == 0 and emulator.messages() == []


def test_tls_context_requires_tls_1_2_and_checks_names(emulator):
    context = tls_context(str(emulator.ca_file))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED


def test_a_burst_for_an_account_with_a_wrong_password_is_not_a_burst_of_logins(emulator):
    emulator.set_password("news@contoso.com", "rotated")

    async def main():
        smtp = HveSmtp(host="127.0.0.1", port=emulator.port, context=tls_context(str(emulator.ca_file)), timeout=5,
                       pool_size=2, authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))
        try:
            first = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            failures_of_one_login = emulator.stats()["auth_failures"]
            burst = await asyncio.gather(*(smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE) for _ in range(8)))
            return [first, *burst], failures_of_one_login
        finally:
            await smtp.close()

    results, failures_of_one_login = asyncio.run(main())
    assert all(r.verdict.outcome is Outcome.ACCOUNT and r.verdict.enhanced == "5.7.3" for r in results)
    assert failures_of_one_login == 1 and emulator.stats()["auth_failures"] == 1


def test_sessions_are_reused_then_closed_when_idle_too_long(emulator):
    now = [1000.0]

    async def main():
        smtp = HveSmtp(host="127.0.0.1", port=emulator.port, context=tls_context(str(emulator.ca_file)), timeout=5,
                       idle_seconds=60, clock=lambda: now[0],
                       authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw"})))
        try:
            for _ in range(3):
                assert (await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)).verdict.outcome is Outcome.SENT
            reused = emulator.connections_opened
            now[0] += 61  # news@ has been idle past the limit
            await smtp.submit("alerts@contoso.com", ["ann@contoso.com"], MESSAGE.replace(b"news@", b"alerts@"))
            idle_news = len(smtp._pools["news@contoso.com"].idle)
            await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            return reused, idle_news, smtp.stats
        finally:
            await smtp.close()

    reused, idle_news, stats = asyncio.run(main())
    assert reused == 1                      # three messages, one connection, one AUTH
    assert idle_news == 0                   # closed while another account was busy
    assert emulator.connections_opened == 3 and stats.sessions_reused == 2


def test_a_pooled_session_found_dead_is_replaced_once_and_the_message_still_goes(emulator):
    """The server dropped the idle session: the next command on it gets no reply at all. The
    adapter opens one fresh session and sends; a second dead connection in a row is not chased."""
    async def main():
        smtp = submitter(emulator.port, tls_context(str(emulator.ca_file)))
        try:
            first = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            emulator.drop_next(1, stage="MAIL")  # the pooled session dies before answering
            second = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            opened_after_second = emulator.connections_opened
            emulator.drop_next(2, stage="MAIL")  # the pooled one and its replacement both die
            third = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            return first, second, opened_after_second, third, smtp.stats
        finally:
            await smtp.close()

    first, second, opened_after_second, third, stats = asyncio.run(main())
    assert first.verdict.outcome is Outcome.SENT and second.verdict.outcome is Outcome.SENT
    assert opened_after_second == 2 and len(emulator.messages()) == 2
    assert third.verdict.outcome is Outcome.DEFER and third.verdict.code == 0
    assert emulator.connections_opened == 3  # one replacement, not a loop of them
    assert stats.sessions_reused == 2


def test_a_lease_called_off_returns_its_session_and_one_whose_check_raised_closes_it(emulator):
    """The adapter lends a ready session and calls nothing of the caller's: leaving the block
    without sending gives the session back to the pool (nothing sent, the next message reuses it);
    a check that raised inside the block closes it (the next message opens a fresh one). The pool
    slot comes back either way (pool size 1)."""
    async def main():
        smtp = HveSmtp(host="127.0.0.1", port=emulator.port, context=tls_context(str(emulator.ca_file)), timeout=5,
                       pool_size=1, pool_wait=1,
                       authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))
        try:
            lease = await smtp.lease("news@contoso.com")
            async with lease:
                pass                                          # called off: the claim was lost
            after_call_off = (emulator.connections_opened, len(emulator.messages()))
            sent = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            reused = smtp.stats.sessions_reused
            lease = await smtp.lease("news@contoso.com")
            with pytest.raises(ConnectionError):
                async with lease:
                    raise ConnectionError("storage unavailable")  # the caller's check failed
            again = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            return after_call_off, sent, reused, again
        finally:
            await smtp.close()

    after_call_off, sent, reused, again = asyncio.run(main())
    assert after_call_off == (1, 0)
    assert sent.verdict.outcome is Outcome.SENT and reused == 1
    assert again.verdict.outcome is Outcome.SENT
    assert emulator.connections_opened == 2 and len(emulator.messages()) == 2


def test_leases_taken_ahead_leave_one_session_of_the_pool_for_a_message_whose_moment_is_now(emulator):
    """A booked slot a moment away takes its session ahead; with pool size 3 at most two are held
    ahead at once, so a message due now still gets the third. A lease sent on, or given back,
    makes room for the next one taken ahead."""
    async def main():
        smtp = HveSmtp(host="127.0.0.1", port=emulator.port, context=tls_context(str(emulator.ca_file)), timeout=5,
                       pool_size=3, pool_wait=1,
                       authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))
        try:
            first = await smtp.lease_ahead("news@contoso.com")
            second = await smtp.lease_ahead("news@contoso.com")
            third = await smtp.lease_ahead("news@contoso.com")       # would leave none for now
            now = await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            async with first:
                sent = await first.send(["bob@contoso.com"], MESSAGE)
            again = await smtp.lease_ahead("news@contoso.com")       # room again
            async with second:
                pass
            async with again:
                pass
            return third, now, sent, again
        finally:
            await smtp.close()

    third, now, sent, again = asyncio.run(main())
    assert third is None and again is not None
    assert now.verdict.outcome is Outcome.SENT and sent.verdict.outcome is Outcome.SENT


def test_a_session_given_back_while_a_caller_was_still_deciding_wakes_it_at_once(emulator):
    """A caller sees every pool busy, decides (a Table write, which takes a while), then waits for a
    place to come back. A place given back during the decision counts: with the mark read before
    it, the wait ends at once; without, the caller would have slept through it to its timeout."""
    async def main():
        smtp = HveSmtp(host="127.0.0.1", port=emulator.port, context=tls_context(str(emulator.ca_file)), timeout=5,
                       pool_size=1, pool_wait=1,
                       authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))
        loop = asyncio.get_running_loop()
        try:
            taken = await smtp.lease("news@contoso.com")
            assert smtp.busy("news@contoso.com")
            mark = smtp.places_given_back
            async with taken:  # given back "while the other caller decides"
                pass
            started = loop.time()
            woke = await smtp.place_given_back(5.0, since=mark)
            waited = loop.time() - started
            missed = await smtp.place_given_back(0.2)  # no mark: only a place given back from now on
            return woke, waited, missed
        finally:
            await smtp.close()

    woke, waited, missed = asyncio.run(main())
    assert woke is True and waited < 0.5
    assert missed is False
