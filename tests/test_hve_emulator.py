"""The HVE emulator is a real SMTP server: driven here with aiosmtplib and swaks over verified TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import base64
import json
import os
import re
import shutil
import signal
import ssl
import time
import stat
import subprocess
import sys
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import aiosmtplib
import pytest
from cryptography import x509

from tools.hve_emulator import EmulatorConfig, HveEmulator, profile_limits
from tools.hve_emulator.auth import parse_xoauth2
from tools.hve_emulator.certs import ensure_certificates, server_tls_context
from tools.hve_emulator.clock import EmulatorClock
from tools.hve_emulator.domains import InternalDomains

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
NEWS, NEWS_PW = "news@contoso.com", "news-pw"
ALERTS, ALERTS_PW = "alerts@contoso.com", "alerts-pw"
# 2026-06-01T00:00:00Z: a fixed UTC day start for the quota tests.
DAY_START = datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp()

# .ci/run makes tools/setup.sh install swaks or stop (REQUIRE_SWAKS=1), and in CI a skip is a
# failure (tests/conftest.py): only a developer without swaks sees these skipped.
needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (tools/setup.sh --tests)")


class FakeClock:
    """Injected server clock: tests move time instead of sleeping."""

    def __init__(self, now: float = DAY_START + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_message(sender: str, recipients: list[str], body: str = "Hello from the relay.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients[:3])
    msg["Subject"] = "emulator test"
    msg["Message-ID"] = make_msgid(domain="contoso.com")
    msg.set_content(body)
    return msg


async def hang_up(client: aiosmtplib.SMTP) -> None:
    """QUIT, so the TLS connection is closed cleanly before the test's event loop ends."""
    if client.is_connected:
        await client.quit()


async def connect(emu: HveEmulator, *, starttls: bool = True) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=emu.port,
        tls_context=ssl.create_default_context(cafile=str(emu.ca_file)),
        start_tls=starttls,
        timeout=10,
    )
    await client.connect()
    await client.ehlo()  # STARTTLS forgets the first EHLO; raw commands need a fresh one
    return client


async def login(emu: HveEmulator, user: str = NEWS, password: str = NEWS_PW) -> aiosmtplib.SMTP:
    client = await connect(emu)
    try:
        await client.login(user, password)
    except aiosmtplib.SMTPAuthenticationError:
        await hang_up(client)
        raise
    return client


async def submit(client: aiosmtplib.SMTP, recipients: list[str], sender: str = NEWS) -> str:
    """Send one message; return the final reply text (raises on refusal)."""
    msg = make_message(sender, recipients)
    _, reply = await client.sendmail(sender, recipients, msg.as_bytes())
    return reply


async def send_one(emu: HveEmulator, recipients: list[str], user: str = NEWS, password: str = NEWS_PW) -> str:
    client = await login(emu, user, password)
    try:
        return await submit(client, recipients, sender=user)
    finally:
        await hang_up(client)


def swaks(emu: HveEmulator, *args: str, tls: bool = True, trust_ca: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["swaks", "--server", emu.host, "--port", str(emu.port), "--helo", "client.test", "--timeout", "10"]
    if tls:
        cmd += ["-tls", "--tls-verify"]
        if trust_ca:
            cmd += ["--tls-ca-path", str(emu.ca_file)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)


def swaks_send(emu: HveEmulator, mechanism: str, user: str, password: str, to: str = "team@contoso.com") -> subprocess.CompletedProcess[str]:
    return swaks(
        emu, "--auth", mechanism, "--auth-user", user, "--auth-password", password,
        "--from", user, "--to", to,
    )


# -- TLS and certificates ------------------------------------------------------------------------


def test_certificates_name_localhost_are_private_and_reused(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_file.read_bytes())
    server = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(paths.key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.glob("*.pem")) == ["ca.pem", "server-key.pem", "server.pem"]
    assert server_tls_context(paths).minimum_version == ssl.TLSVersion.TLSv1_2

    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pem")}
    ensure_certificates(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pem")} == before

    # A server certificate that no longer matches its CA is replaced, CA included.
    paths.ca_file.write_bytes(paths.cert_file.read_bytes())
    ensure_certificates(tmp_path)
    assert paths.ca_file.read_bytes() != before["ca.pem"]
    fresh_ca = x509.load_pem_x509_certificate(paths.ca_file.read_bytes())
    x509.load_pem_x509_certificate(paths.cert_file.read_bytes()).verify_directly_issued_by(fresh_ca)


def test_a_certificate_made_by_a_clock_ahead_of_this_one_is_replaced_and_new_ones_are_backdated_a_day(
        tmp_path: Path) -> None:
    """Certificates made on the real clock and reused under a clock shifted back (tools/test_hours.sh
    at 12:00 when it is 21:00) were "not yet valid": every SMTP session failed the handshake."""
    real = dt.datetime.now(dt.timezone.utc)
    paths = ensure_certificates(tmp_path, now=real)
    made = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
    assert made.not_valid_before_utc <= real - dt.timedelta(hours=23)  # a client a day behind accepts it
    behind = real - dt.timedelta(hours=30)
    ensure_certificates(tmp_path, now=behind)
    for pem in (paths.cert_file, paths.ca_file):
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        assert cert.not_valid_before_utc <= behind < cert.not_valid_after_utc
    x509.load_pem_x509_certificate(paths.cert_file.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(paths.ca_file.read_bytes()))


def test_tls_is_only_trusted_through_the_emulator_ca(emulator: HveEmulator) -> None:
    async def main() -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=emulator.port, tls_context=ssl.create_default_context(),
            start_tls=True, timeout=10,
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.connect()
        client.close()
        ok = await connect(emulator)
        assert ok.get_transport_info("sslcontext") is not None
        tls_version = ok.get_transport_info("ssl_object").version()
        assert tls_version in ("TLSv1.2", "TLSv1.3")
        await ok.quit()

    run(main())


@needs_swaks
def test_swaks_without_the_ca_cannot_verify_the_server(emulator: HveEmulator) -> None:
    result = swaks(emulator, "--to", "team@contoso.com", "--from", NEWS, trust_ca=False)
    assert result.returncode != 0
    assert "certificate verify failed" in result.stdout + result.stderr
    assert emulator.messages() == []


# -- STARTTLS before AUTH and MAIL ---------------------------------------------------------------


def test_starttls_is_required_before_auth_and_mail(emulator: HveEmulator) -> None:
    async def main() -> None:
        client = await connect(emulator, starttls=False)
        await client.ehlo()
        assert client.supports_extension("starttls")
        assert not client.supports_extension("auth")  # AUTH is only offered inside TLS
        plain = base64.b64encode(f"\0{NEWS}\0{NEWS_PW}".encode()).decode()
        auth = await client.execute_command(b"AUTH", b"PLAIN", plain.encode())
        mail = await client.execute_command(b"MAIL", f"FROM:<{NEWS}>".encode())
        assert (auth.code, auth.message) == (530, "5.7.0 Must issue a STARTTLS command first")
        assert (mail.code, mail.message) == (530, "5.7.0 Must issue a STARTTLS command first")
        await client.starttls()
        await client.ehlo()
        assert client.supports_extension("auth")
        assert set(client.server_auth_methods) == {"login", "plain", "xoauth2"}
        await client.quit()

    run(main())
    assert emulator.auth_count == 0
    assert emulator.stats()["replies"]["5.7.0"] == 2


@needs_swaks
def test_swaks_without_starttls_is_refused(emulator: HveEmulator) -> None:
    plain = swaks(emulator, "--from", NEWS, "--to", "team@contoso.com", tls=False)
    assert plain.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in plain.stdout
    no_auth_offered = swaks(
        emulator, "--auth", "LOGIN", "--auth-user", NEWS, "--auth-password", NEWS_PW,
        "--from", NEWS, "--to", "team@contoso.com", tls=False,
    )
    assert no_auth_offered.returncode != 0
    assert "did not advertise authentication" in no_auth_offered.stdout + no_auth_offered.stderr
    assert emulator.messages() == [] and emulator.auth_count == 0


# -- basic auth ------------------------------------------------------------------------------------


@needs_swaks
@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_swaks_sends_with_basic_auth_over_verified_tls(emulator: HveEmulator, mechanism: str) -> None:
    result = swaks_send(emulator, mechanism, NEWS, NEWS_PW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert re.search(r"250 2\.6\.0 <[^>]+> \[InternalId=\d+, Hostname=[^\]]+\] Queued mail for delivery", result.stdout)
    assert emulator.auth_count == 1 and len(emulator.messages()) == 1


@needs_swaks
def test_swaks_wrong_password_gets_5_7_3(emulator: HveEmulator) -> None:
    result = swaks_send(emulator, "LOGIN", NEWS, "wrong")
    assert result.returncode != 0
    assert "535 5.7.3 Authentication unsuccessful" in result.stdout
    assert emulator.stats()["auth_failures"] == 1 and emulator.messages() == []


def test_basic_auth_failures_have_hve_codes(emulator: HveEmulator) -> None:
    async def attempt(user: str, password: str) -> tuple[int, str]:
        client = await connect(emulator)
        try:
            # auth_plain, not login(): login() would retry with every advertised mechanism.
            await client.auth_plain(user, password)
            return 235, "ok"
        except aiosmtplib.SMTPAuthenticationError as error:
            return error.code, error.message
        finally:
            await hang_up(client)

    async def main() -> None:
        assert await attempt(NEWS, "wrong") == (535, "5.7.3 Authentication unsuccessful")
        assert await attempt("nobody@contoso.com", "x") == (535, "5.7.3 Authentication unsuccessful")
        emulator.block_basic_auth(ALERTS)
        # The policy is applied before the password is checked: a right password does not help.
        assert await attempt(ALERTS, ALERTS_PW) == (535, "5.7.139 Authentication unsuccessful, basic auth is blocked")
        emulator.block_basic_auth(ALERTS, False)
        assert (await attempt(ALERTS, ALERTS_PW))[0] == 235
        emulator.disable_account(ALERTS)
        assert (await attempt(ALERTS, ALERTS_PW))[0] == 535

    run(main())
    stats = emulator.stats()
    assert (stats["auth_count"], stats["auth_failures"]) == (1, 4)
    assert (stats["replies"]["5.7.3"], stats["replies"]["5.7.139"]) == (3, 1)


def test_basic_auth_blocked_from_configuration(make_emulator: Any) -> None:
    emu = make_emulator(basic_auth_blocked={NEWS})

    async def main() -> None:
        client = await connect(emu)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await client.login(NEWS, NEWS_PW)
        assert "5.7.139" in caught.value.message
        await hang_up(client)

    run(main())


def test_password_changed_mid_run_refuses_new_logins_until_reset(emulator: HveEmulator) -> None:
    async def main() -> None:
        kept = await login(emulator)  # authenticated before the change
        emulator.set_password(NEWS, "rotated")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await login(emulator)
        assert caught.value.code == 535 and "5.7.3" in caught.value.message
        # Credentials are checked at AUTH only; an open session keeps sending, as with Exchange.
        assert (await submit(kept, ["team@contoso.com"])).startswith("2.6.0")
        await kept.quit()
        fresh = await login(emulator, NEWS, "rotated")
        await fresh.quit()
        emulator.reset()
        back = await login(emulator, NEWS, NEWS_PW)
        await back.quit()

    run(main())


def test_slow_auth_delays_new_logins_only_until_reset(emulator: HveEmulator) -> None:
    """A slow front end: every AUTH is answered that much later; an open session is not slowed."""
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        kept = await login(emulator)
        emulator.slow_auth(0.6)
        started = loop.time()
        slow = await login(emulator)
        slow_seconds = loop.time() - started
        started = loop.time()
        assert (await submit(kept, ["team@contoso.com"])).startswith("2.6.0")
        kept_seconds = loop.time() - started
        emulator.reset()
        started = loop.time()
        fast = await login(emulator)
        fast_seconds = loop.time() - started
        for client in (kept, slow, fast):
            await hang_up(client)
        return slow_seconds, kept_seconds, fast_seconds

    slow_seconds, kept_seconds, fast_seconds = run(main())
    assert slow_seconds >= 0.6
    assert kept_seconds < 0.6 and fast_seconds < 0.6
    with pytest.raises(ValueError):
        emulator.slow_auth(-1)


def test_slow_data_delays_the_reply_not_the_judging_until_reset(emulator: HveEmulator) -> None:
    """A slow back end: the DATA reply comes that much later; the message is stored with the time
    it was judged, and a reset answers at once again."""
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        client = await login(emulator)
        emulator.slow_data(0.6)
        started, wall = loop.time(), time.time()
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")
        slow_seconds = loop.time() - started
        judged = emulator.accepted()[-1].received_at - wall
        emulator.reset()
        started = loop.time()
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")
        fast_seconds = loop.time() - started
        await hang_up(client)
        return slow_seconds, judged, fast_seconds

    slow_seconds, judged, fast_seconds = run(main())
    assert slow_seconds >= 0.6 and judged < 0.5
    assert fast_seconds < 0.6
    with pytest.raises(ValueError):
        emulator.slow_data(-1)


# -- XOAUTH2 ---------------------------------------------------------------------------------------


def test_xoauth2_accepts_a_token_of_the_account_and_refuses_the_rest(make_emulator: Any) -> None:
    clock = FakeClock()
    emu = make_emulator(
        clock=clock,
        oauth_tokens={"good-token": NEWS, "alerts-token": ALERTS},
    )
    emu.set_oauth_token("expiring-token", NEWS, expires_at=clock.now + 60)
    emu.set_oauth_token("no-mail-send", NEWS, mail_send=False)

    async def xoauth2(user: str, token: str) -> tuple[int, str]:
        client = await connect(emu)
        try:
            response = await client.auth_xoauth2(user, token)
            if response.code == 235:
                assert (await submit(client, ["team@contoso.com"], sender=user)).startswith("2.6.0")
            return response.code, response.message
        except aiosmtplib.SMTPAuthenticationError as error:
            return error.code, error.message
        finally:
            await hang_up(client)

    async def main() -> None:
        assert await xoauth2(NEWS, "good-token") == (235, "2.7.0 Authentication successful")
        assert (await xoauth2(NEWS, "expiring-token"))[0] == 235
        clock.now += 61
        code, text = await xoauth2(NEWS, "expiring-token")
        assert (code, text.split()[0]) == (535, "5.7.143")
        # A token whose app is allowed on another HVE account (Add-HVEAppAccess).
        code, text = await xoauth2(NEWS, "alerts-token")
        assert (code, text.split()[0]) == (550, "5.7.240")
        code, text = await xoauth2(NEWS, "no-mail-send")
        assert (code, text.split()[0]) == (535, "5.7.144")
        assert await xoauth2(NEWS, "never-issued") == (535, "5.7.3 Authentication unsuccessful")
        emu.revoke_oauth_token("good-token")
        assert (await xoauth2(NEWS, "good-token"))[0] == 535

    run(main())
    assert emu.auth_count == 2
    assert emu.stats()["accounts"][NEWS]["messages"] == 2


def test_xoauth2_malformed_and_challenge_forms(make_emulator: Any) -> None:
    emu = make_emulator(oauth_tokens={"good-token": NEWS})

    async def main() -> None:
        client = await connect(emu)
        for blob in (b"not-base64!", base64.b64encode(b"user=news@contoso.com\x01\x01"),
                     base64.b64encode(b"user=news@contoso.com\x01auth=Basic abc\x01\x01")):
            response = await client.execute_command(b"AUTH", b"XOAUTH2", blob)
            assert (response.code, response.message.split()[0]) == (501, "5.5.121")
        # Without an initial response the server sends an empty challenge first.
        first = await client.execute_command(b"AUTH", b"XOAUTH2")
        assert first.code == 334
        sasl = base64.b64encode(f"user={NEWS}\x01auth=Bearer good-token\x01\x01".encode())
        second = await client.execute_command(sasl)
        assert (second.code, second.message) == (235, "2.7.0 Authentication successful")
        await client.quit()

    run(main())
    assert emu.auth_count == 1
    assert emu.stats()["replies"]["5.5.121"] == 3


def test_parse_xoauth2() -> None:
    creds = parse_xoauth2(b"user=a@b.c\x01auth=Bearer eyJ0=x.y\x01\x01")
    assert creds is not None and (creds.user, creds.token) == ("a@b.c", "eyJ0=x.y")
    assert parse_xoauth2(b"user=a@b.c\x01auth=Bearer t\x01") is None
    assert parse_xoauth2(b"auth=Bearer t\x01\x01") is None
    assert parse_xoauth2(b"\xff\xfe") is None


# -- envelope rules ---------------------------------------------------------------------------------


def test_mail_from_must_be_the_authenticated_account(emulator: HveEmulator) -> None:
    async def main() -> None:
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            await submit(client, ["team@contoso.com"], sender=ALERTS)
        assert (caught.value.code, caught.value.message) == (
            550, "5.7.60 SMTP; Client does not have permissions to send as this sender"
        )
        # The address is matched case-insensitively, as Exchange does.
        assert (await submit(client, ["team@contoso.com"], sender=NEWS.upper())).startswith("2.6.0")
        await client.quit()

        anonymous = await connect(emulator)  # TLS but no AUTH
        mail = await anonymous.execute_command(b"MAIL", f"FROM:<{NEWS}>".encode())
        assert (mail.code, mail.message) == (530, "5.7.57 Client not authenticated to send mail")
        await anonymous.quit()

    run(main())
    assert len(emulator.messages()) == 1


def test_internal_domains_are_exact_and_case_insensitive() -> None:
    domains = InternalDomains({"contoso.com", "Fabrikam-Internal.com"})
    assert domains.is_internal("a@CONTOSO.com") and domains.is_internal("b@fabrikam-internal.COM")
    assert not domains.is_internal("c@sub.contoso.com")
    assert not domains.is_internal("d@contoso.com.evil.example")
    assert not domains.is_internal("no-domain")
    assert domains.split(["a@contoso.com", "x@gmail.com", "y@sub.contoso.com"]) == (1, 2)


def test_ga_2026_refuses_external_recipients_at_rcpt(emulator: HveEmulator) -> None:
    async def main() -> None:
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
            await submit(client, ["someone@gmail.com"])
        refused = caught.value.recipients[0]
        assert (refused.code, refused.message) == (
            550, "5.5.105 External sending is not supported for High Volume Email accounts"
        )
        mixed = ["a@contoso.com", "b@FABRIKAM-INTERNAL.com", "c@sub.contoso.com", "d@gmail.com"]
        errors, reply = await client.sendmail(NEWS, mixed, make_message(NEWS, mixed).as_bytes())
        assert reply.startswith("2.6.0")
        assert sorted(errors) == ["c@sub.contoso.com", "d@gmail.com"]
        assert {e.code for e in errors.values()} == {550}
        await client.quit()

    run(main())
    [stored] = emulator.accepted()
    assert stored.recipients == ("a@contoso.com", "b@FABRIKAM-INTERNAL.com")
    assert (stored.internal_recipients, stored.external_recipients) == (2, 0)
    stats = emulator.stats()
    assert stats["replies"]["5.5.105"] == 3 and stats["external_recipients"] == 0


def test_recipients_beyond_the_per_message_limit_get_452(emulator: HveEmulator) -> None:
    recipients = [f"user{i}@contoso.com" for i in range(51)]

    async def main() -> tuple[dict[str, Any], str]:
        client = await login(emulator)
        try:
            return await client.sendmail(NEWS, recipients, make_message(NEWS, recipients).as_bytes())
        finally:
            await client.quit()

    errors, reply = run(main())
    assert reply.startswith("2.6.0")
    assert list(errors) == ["user50@contoso.com"]
    assert (errors["user50@contoso.com"].code, errors["user50@contoso.com"].message) == (452, "4.5.3 Too many recipients")
    assert emulator.stats()["accounts"][NEWS]["internal_recipients"] == 50


def test_message_over_the_size_limit_gets_552_5_3_4(make_emulator: Any, emulator: HveEmulator) -> None:
    emu = make_emulator(limits=profile_limits("ga-2026", max_message_bytes=4000))

    async def main() -> None:
        client = await login(emu)
        assert client.esmtp_extensions["size"] == "4000"
        msg = make_message(NEWS, ["team@contoso.com"], body=("y" * 70 + "\n") * 80)  # ~5.7 kB
        # Declared: aiosmtplib's sendmail sends SIZE=, refused at MAIL already.
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as declared:
            await client.sendmail(NEWS, ["team@contoso.com"], msg.as_bytes())
        assert (declared.value.code, declared.value.message) == (552, "5.3.4 Message size exceeds fixed maximum message size")
        # Undeclared: the server counts the DATA itself and refuses after the content.
        await client.mail(NEWS)
        await client.rcpt("team@contoso.com")
        with pytest.raises(aiosmtplib.SMTPDataError) as counted:
            await client.data(msg.as_bytes())
        assert (counted.value.code, counted.value.message) == (552, "5.3.4 Message size exceeds fixed maximum message size")
        # The session stays usable.
        await client.rset()
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")
        await client.quit()

        default = await login(emulator)
        assert default.esmtp_extensions["size"] == str(10 * 1024 * 1024)
        await default.quit()

    run(main())
    assert len(emu.messages()) == 1
    assert emu.stats()["replies"]["5.3.4"] == 2


# -- preview-2024 quotas ----------------------------------------------------------------------------


def test_preview_11th_external_message_in_a_minute_gets_4_5_104_then_the_window_reopens(make_emulator: Any) -> None:
    clock = FakeClock()
    start = clock.now
    emu = make_emulator(profile="preview-2024", clock=clock)

    async def main() -> None:
        client = await login(emu)
        for i in range(10):  # t = 0..9 s
            clock.now = start + i
            assert (await submit(client, ["someone@gmail.com"])).startswith("2.6.0")
        clock.now = start + 30
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await submit(client, ["someone@gmail.com", "team@contoso.com"])
        assert caught.value.code == 450
        assert caught.value.message == (
            "4.5.104 Message rejected. Excessive message rate from sender news@contoso.com, "
            "rate limit for external emails has been exceeded"
        )
        # Internal-only mail is not rate limited, and other accounts have their own window.
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")
        assert (await send_one(emu, ["someone@gmail.com"], ALERTS, ALERTS_PW)).startswith("2.6.0")
        clock.now = start + 60  # the t=0 submission leaves the rolling minute
        assert (await submit(client, ["someone@gmail.com"])).startswith("2.6.0")
        clock.now = start + 60.5  # t=1..9 and t=60 fill the window again
        with pytest.raises(aiosmtplib.SMTPDataError):
            await submit(client, ["someone@gmail.com"])
        clock.now = start + 61
        assert (await submit(client, ["someone@gmail.com"])).startswith("2.6.0")
        await client.quit()

    run(main())
    stats = emu.stats()
    assert stats["replies"]["4.5.104"] == 2
    assert stats["accounts"][NEWS] == {"messages": 13, "internal_recipients": 1, "external_recipients": 12}
    assert stats["accounts"][ALERTS]["messages"] == 1


def test_speedup_turns_real_seconds_into_minutes() -> None:
    source = FakeClock(1000.0)
    clock = EmulatorClock(source, speedup=60)
    assert clock.now() == 1000.0
    source.now = 1001.0
    assert clock.now() == 1000.0 + 60
    with pytest.raises(ValueError):
        EmulatorClock(source, speedup=0)


def test_speedup_reopens_the_rate_window_after_a_fraction_of_a_source_second(make_emulator: Any) -> None:
    # speedup 600: a rolling minute lasts 0.1 seconds of the source clock. The source is injected,
    # so the test says exactly how much time passes between submissions, however busy the machine.
    source = FakeClock(DAY_START + 3600)
    emu = make_emulator(profile="preview-2024", speedup=600.0, clock=source,
                        limits=profile_limits("preview-2024", external_messages_per_window=1))

    async def main() -> None:
        client = await login(emu)
        assert (await submit(client, ["someone@gmail.com"])).startswith("2.6.0")
        source.now += 0.09  # 54 emulated seconds: still inside the minute
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await submit(client, ["someone@gmail.com"])
        assert caught.value.message.startswith("4.5.104")
        source.now += 0.011  # 60.6 emulated seconds after the first: the window has reopened
        assert (await submit(client, ["someone@gmail.com"])).startswith("2.6.0")
        await client.quit()

    run(main())
    assert emu.stats()["replies"]["4.5.104"] == 1


def test_preview_daily_external_quota_gets_4_5_102_until_the_next_utc_day(make_emulator: Any) -> None:
    clock = FakeClock(DAY_START + 60)
    emu = make_emulator(profile="preview-2024", clock=clock)  # default: 2,000 per account per day
    batch = [f"person{i}@gmail.com" for i in range(50)]

    async def main() -> None:
        client = await login(emu)
        for _ in range(40):  # 40 x 50 = 2,000 external recipients, 7 s apart (under 10/min)
            clock.now += 7
            assert (await submit(client, batch)).startswith("2.6.0")
        clock.now += 7
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await submit(client, ["one.more@gmail.com"])
        assert caught.value.code == 450
        assert caught.value.message == (
            "4.5.102 Message rejected. Excessive message rate from sender news@contoso.com, "
            "sender's submission tenant quota for external recipients was exceeded"
        )
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")  # internal still flows
        clock.now = DAY_START + 86_400 + 1  # next UTC day
        assert (await submit(client, ["one.more@gmail.com"])).startswith("2.6.0")
        await client.quit()

    run(main())
    stats = emu.stats()
    assert stats["replies"]["4.5.102"] == 1
    assert stats["accounts"][NEWS]["external_recipients"] == 2001


def test_preview_tenant_daily_recipient_quota(make_emulator: Any) -> None:
    clock = FakeClock()
    emu = make_emulator(profile="preview-2024", clock=clock,
                        limits=profile_limits("preview-2024", tenant_recipients_per_day=3))

    async def main() -> None:
        assert (await send_one(emu, ["a@contoso.com", "b@contoso.com"])).startswith("2.6.0")
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await send_one(emu, ["c@contoso.com", "d@contoso.com"], ALERTS, ALERTS_PW)
        assert (caught.value.code, caught.value.message.split()[0]) == (450, "4.5.199")
        assert (await send_one(emu, ["c@contoso.com"], ALERTS, ALERTS_PW)).startswith("2.6.0")

    run(main())


# -- storage and counters ----------------------------------------------------------------------------


def test_accepted_message_is_stored_as_eml_and_counted(emulator: HveEmulator) -> None:
    msg = make_message(NEWS, ["team@contoso.com"])

    async def main() -> str:
        client = await login(emulator)
        _, reply = await client.sendmail(NEWS, ["team@contoso.com", "ops@fabrikam-internal.com"], msg.as_bytes())
        await client.quit()
        return reply

    reply = run(main())
    match = re.fullmatch(r"2\.6\.0 (<[^>]+>) \[InternalId=(\d+), Hostname=hve-emulator\.localhost\] Queued mail for delivery", reply)
    assert match and match.group(1) == msg["Message-ID"]
    [path] = emulator.messages()
    assert path.parent == emulator.messages_dir and path.suffix == ".eml"
    assert path.name == f"{int(match.group(2)):06d}-news@contoso.com.eml"
    assert path.read_bytes().replace(b"\r\n", b"\n") == msg.as_bytes().replace(b"\r\n", b"\n")
    [record] = emulator.accepted()
    assert record.message_id == msg["Message-ID"] and record.account == NEWS
    stats = emulator.stats()
    assert stats["accounts"] == {NEWS: {"messages": 1, "internal_recipients": 2, "external_recipients": 0}}
    assert stats["accepted_messages"] == 1 and stats["replies"]["2.6.0"] == 1
    assert stats["connections_opened"] == 1 and stats["auth_count"] == 1


def test_reused_state_dir_keeps_the_ca_and_continues_the_message_counter(make_emulator: Any, tmp_path: Path) -> None:
    first = make_emulator(state_dir=tmp_path)
    run(send_one(first, ["team@contoso.com"]))
    ca = first.ca_file.read_bytes()
    first.stop()
    second = make_emulator(state_dir=tmp_path)
    run(send_one(second, ["team@contoso.com"]))
    assert second.ca_file.read_bytes() == ca
    assert [p.name for p in second.messages()] == ["000002-news@contoso.com.eml"]
    assert sorted(p.name for p in (tmp_path / "messages").iterdir()) == [
        "000001-news@contoso.com.eml", "000002-news@contoso.com.eml"
    ]


def test_two_messages_on_one_connection_count_one_connection_and_one_auth(emulator: HveEmulator) -> None:
    async def main() -> None:
        client = await login(emulator)
        await submit(client, ["team@contoso.com"])
        await submit(client, ["ops@contoso.com"])
        await client.quit()

    run(main())
    assert (emulator.connections_opened, emulator.auth_count, len(emulator.messages())) == (1, 1, 2)
    run(send_one(emulator, ["team@contoso.com"]))
    assert (emulator.connections_opened, emulator.auth_count) == (2, 2)


# -- fault injection ---------------------------------------------------------------------------------


def test_fail_next_answers_the_given_reply_at_each_stage(emulator: HveEmulator) -> None:
    emulator.fail_next()  # default: stage DATA, 451 4.7.0
    emulator.fail_next(1, "452 4.3.1 Insufficient system resources", stage="MAIL")
    emulator.fail_next(2, "450 4.2.0 Recipient temporarily unavailable", stage="RCPT")
    assert emulator.stats()["faults_pending"] == {"CONNECT": 0, "AUTH": 0, "MAIL": 1, "RCPT": 2, "DATA": 1}
    recipients = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]

    async def main() -> None:
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as mail:
            await submit(client, ["team@contoso.com"])
        assert (mail.value.code, mail.value.message) == (452, "4.3.1 Insufficient system resources")
        # One fault per RCPT command: a and b are refused, c is taken; then DATA fails after
        # the content, as an end-of-data reply does.
        with pytest.raises(aiosmtplib.SMTPDataError) as data:
            await client.sendmail(NEWS, recipients, make_message(NEWS, recipients).as_bytes())
        assert (data.value.code, data.value.message) == (451, "4.7.0 Temporary server error, please try again later")
        assert (await submit(client, ["team@contoso.com"])).startswith("2.6.0")
        await client.quit()

    run(main())
    stats = emulator.stats()
    assert set(stats["faults_pending"].values()) == {0}
    assert stats["replies"]["4.3.1"] == 1 and stats["replies"]["4.2.0"] == 2 and stats["replies"]["4.7.0"] == 1
    assert len(emulator.messages()) == 1


def test_fail_next_validates_its_arguments(emulator: HveEmulator) -> None:
    with pytest.raises(ValueError):
        emulator.fail_next(1, "250 OK")
    with pytest.raises(ValueError):
        emulator.fail_next(1, stage="EHLO")
    with pytest.raises(ValueError):
        emulator.drop_next(1, stage="MAIL", after_accept=True)
    with pytest.raises(ValueError):
        emulator.fail_next(0)


def test_fail_next_at_auth(emulator: HveEmulator) -> None:
    emulator.fail_next(1, "454 4.7.0 Temporary authentication failure", stage="AUTH")

    async def main() -> None:
        client = await connect(emulator)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
            await client.auth_plain(NEWS, NEWS_PW)
        assert (caught.value.code, caught.value.message) == (454, "4.7.0 Temporary authentication failure")
        await client.login(NEWS, NEWS_PW)
        await client.quit()

    run(main())
    assert emulator.auth_count == 1


@pytest.mark.parametrize("reply", ["421 4.3.2 Service not available, closing transmission channel",
                                   "554 5.7.1 Service unavailable; Client host blocked"])
def test_fail_next_at_connect_replaces_the_greeting_then_closes(emulator: HveEmulator, reply: str) -> None:
    emulator.fail_next(1, reply, stage="CONNECT")

    async def main() -> None:
        client = aiosmtplib.SMTP(hostname=emulator.host, port=emulator.port, start_tls=True,
                                 tls_context=emulator.client_ssl_context(), timeout=10)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as caught:
            await client.connect()
        assert (caught.value.code, caught.value.message) == (int(reply[:3]), reply[4:])
        assert not client.is_connected
        # Only that connection: the next one is greeted as usual.
        assert (await send_one(emulator, ["team@contoso.com"])).startswith("2.6.0")

    run(main())
    assert emulator.connections_opened == 2 and emulator.auth_count == 1
    assert emulator.stats()["faults_pending"]["CONNECT"] == 0


def test_drop_next_at_connect_closes_before_the_greeting(emulator: HveEmulator) -> None:
    emulator.drop_next(1, stage="CONNECT")

    async def main() -> None:
        client = aiosmtplib.SMTP(hostname=emulator.host, port=emulator.port, start_tls=True,
                                 tls_context=emulator.client_ssl_context(), timeout=10)
        with pytest.raises(aiosmtplib.SMTPConnectError, match="Unexpected EOF"):
            await client.connect()
        assert (await send_one(emulator, ["team@contoso.com"])).startswith("2.6.0")

    run(main())
    assert emulator.connections_opened == 2


def test_drop_next_closes_the_connection_without_a_reply(emulator: HveEmulator) -> None:
    emulator.drop_next(1, stage="DATA")
    emulator.drop_next(1, stage="MAIL")

    async def main() -> None:
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await submit(client, ["team@contoso.com"])
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await submit(client, ["team@contoso.com"])
        # The server carries on for the next connection.
        assert (await send_one(emulator, ["team@contoso.com"])).startswith("2.6.0")

    run(main())
    assert len(emulator.messages()) == 1
    assert emulator.connections_opened == 3
    assert emulator.stats()["faults_pending"]["DATA"] == 0


def test_drop_after_accept_stores_the_message_the_client_never_heard_about(emulator: HveEmulator) -> None:
    emulator.drop_next(1, stage="DATA", after_accept=True)

    async def main() -> None:
        client = await login(emulator)
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await submit(client, ["team@contoso.com"])

    run(main())
    assert len(emulator.messages()) == 1
    stats = emulator.stats()
    assert stats["accepted_messages"] == 1 and "2.6.0" not in stats["replies"]


def test_reset_restores_configuration_and_clears_counters(emulator: HveEmulator) -> None:
    run(send_one(emulator, ["team@contoso.com"]))
    emulator.set_password(NEWS, "changed")
    emulator.block_basic_auth(ALERTS)
    emulator.fail_next(3, stage="RCPT")
    emulator.reset()
    assert emulator.messages() == []
    stats = emulator.stats()
    assert stats["connections_opened"] == 0 and stats["accounts"] == {} and stats["replies"] == {}
    assert set(stats["faults_pending"].values()) == {0}
    assert run(send_one(emulator, ["team@contoso.com"], ALERTS, ALERTS_PW)).startswith("2.6.0")
    assert run(send_one(emulator, ["team@contoso.com"])).startswith("2.6.0")


# -- command line ------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm_and_logs_without_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "HVE_PASSWORDS": json.dumps({NEWS: "cli-secret-pw"}), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.hve_emulator", "--port", "0", "--internal-domains", "contoso.com",
         "--profile", "ga-2026", "--state-dir", str(tmp_path), "--max-message-bytes", "100000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"HVE emulator listening host=127\.0\.0\.1 port=(\d+) ca_file=(\S+) profile=ga-2026\n", line)
        assert match, line
        port, ca_file = int(match.group(1)), Path(match.group(2))
        assert ca_file == tmp_path / "ca.pem" and ca_file.exists()

        async def main() -> tuple[str, str]:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10,
                                     tls_context=ssl.create_default_context(cafile=str(ca_file)))
            await client.connect()
            await client.ehlo()
            assert client.esmtp_extensions["size"] == "100000"
            await client.login(NEWS, "cli-secret-pw")
            errors, reply = await client.sendmail(NEWS, ["secret.person@contoso.com", "x@gmail.com"],
                                                  make_message(NEWS, ["secret.person@contoso.com"]).as_bytes())
            await client.quit()
            return reply, str(errors)

        reply, errors = run(main())
        assert reply.startswith("2.6.0") and "5.5.105" in errors
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "transaction account=news@contoso.com reply=250 2.6.0 internal=1 external=0" in stderr
    assert "refused stage=RCPT account=news@contoso.com reply=550 5.5.105" in stderr
    assert "cli-secret-pw" not in stderr and "secret.person" not in stderr and "x@gmail.com" not in stderr
    assert len(list((tmp_path / "messages").glob("*.eml"))) == 1


def test_cli_refuses_to_start_without_accounts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HVE_PASSWORDS"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "tools.hve_emulator", "--port", "0", "--state-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "no accounts" in result.stderr


def test_cli_config_parsing() -> None:
    from tools.hve_emulator.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "--accounts", "news@contoso.com:p:w,alerts@contoso.com:x", "--internal-domains", "contoso.com, fabrikam.com",
        "--profile", "preview-2024", "--limit", "recipients_per_message=5", "--limit", "tenant_recipients_per_day=none",
        "--speedup", "60",
    ])
    config = config_from_args(args, {"HVE_OAUTH_TOKENS": json.dumps({"tok": NEWS})})
    assert config.accounts == {"news@contoso.com": "p:w", "alerts@contoso.com": "x"}
    assert set(config.internal_domains) == {"contoso.com", "fabrikam.com"}
    limits = config.effective_limits()
    assert (limits.recipients_per_message, limits.tenant_recipients_per_day) == (5, None)
    assert limits.external_messages_per_window == 10 and config.speedup == 60
    assert config.oauth_tokens["tok"].account == NEWS  # type: ignore[union-attr]
    with pytest.raises(ValueError) as caught:
        config_from_args(build_parser().parse_args(["--accounts", "only-a-password"]), {})
    assert "only-a-password" not in str(caught.value)


def test_config_rejects_unknown_profiles(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(profile="preview-2023", state_dir=tmp_path)
    with pytest.raises(ValueError):
        profile_limits("ga-2026", no_such_limit=1)  # type: ignore[arg-type]
