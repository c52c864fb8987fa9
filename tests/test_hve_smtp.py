"""The SMTP adapter's security promises, against real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl

from aiosmtpd.controller import Controller

from shared.credentials import LocalPasswords
from shared.hve_smtp import BasicAuth, HveSmtp, tls_context
from shared.replies import Outcome

MESSAGE = b"From: news@contoso.com\r\nTo: ann@contoso.com\r\nSubject: t\r\n\r\nhi\r\n"


class Recorder:
    """A plain SMTP server with no STARTTLS: records every command it is sent."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.commands.append("EHLO")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.commands.append("MAIL")
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.commands.append("DATA")
        return "250 OK"


def submitter(port: int, context: ssl.SSLContext) -> HveSmtp:
    return HveSmtp(host="127.0.0.1", port=port, context=context, timeout=5,
                   authenticator=BasicAuth(LocalPasswords({"news@contoso.com": "news-pw"})))


def test_no_auth_and_no_mail_on_a_server_without_starttls():
    recorder = Recorder()
    with socket.socket() as probe:  # a free port: aiosmtpd's Controller cannot start on port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(recorder, hostname="127.0.0.1", port=port, auth_require_tls=False)
    controller.start()
    try:
        async def main():
            smtp = submitter(port, tls_context())
            try:
                return await smtp.submit("news@contoso.com", ["ann@contoso.com"], MESSAGE)
            finally:
                await smtp.close()
        result = asyncio.run(main())
    finally:
        controller.stop()
    assert result.verdict.outcome is not Outcome.SENT
    assert recorder.commands == ["EHLO"]  # it talked to the server, and stopped there
    assert "STARTTLS" in result.verdict.text


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
