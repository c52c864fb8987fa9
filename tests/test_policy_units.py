"""Pure pieces of the send path: limits, backoff, MIME, governor choice, settings."""

import random
from email import message_from_bytes, policy

import pytest

from shared.send.contract import ValidationPolicy, validate_request
from shared.hve.limits import PROFILES, resolve_limits
from shared.send.mime import build_message, message_id
from shared.send.retry import MAX_VISIBILITY_SECONDS, retry_delay, visibility_for
from shared.settings import SETTINGS, Settings, SettingsError


def test_profiles_carry_the_documented_limits():
    preview, ga = PROFILES["preview-2024"], PROFILES["ga-2026"]
    assert (preview.external_messages_per_minute, preview.external_recipients_per_day, preview.recipients_per_day_per_tenant) == (10, 2000, 100_000)
    assert ga.external_allowed is False and preview.external_allowed is True
    assert ga.message_bytes == 10 * 1024 * 1024


def test_limit_overrides_apply_and_unknown_keys_fail():
    assert resolve_limits("ga-2026", {"recipients_per_message": 20}).recipients_per_message == 20
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_limits("ga-2026", {"recipients_per_mesage": 20})
    with pytest.raises(ValueError):
        resolve_limits("ga-2026", {"recipients_per_message": -1})


def test_backoff_grows_and_is_capped_with_jitter():
    rng = random.Random(1)
    delays = [retry_delay(a, 30, 3600, rng) for a in range(1, 12)]
    assert 15 <= delays[0] <= 30
    assert all(d <= 3600 for d in delays) and delays[-1] >= 1800
    assert visibility_for(10 ** 9) <= MAX_VISIBILITY_SECONDS
    assert visibility_for(0, rng=rng) >= 0
    assert 20 * 3600 <= visibility_for(20 * 3600, rng=rng) <= 20 * 3600 + 30  # day-long waits: small jitter
    assert visibility_for(12.5, jitter_fraction=0.0) == 13                  # bookings: exact, whole seconds


def test_message_id_is_deterministic_per_request_and_distinct_per_chunk():
    assert message_id("r-1", "contoso.com", key=b"k") == message_id("r-1", "Contoso.com", key=b"k")
    assert message_id("r-1", "contoso.com", key=b"k") != message_id("r-2", "contoso.com", key=b"k")
    assert message_id("r-1", "contoso.com", chunk=2, key=b"k") != message_id("r-1", "contoso.com", key=b"k")


def test_mime_has_account_as_from_and_no_bcc_header():
    pol = ValidationPolicy(frozenset({"news@contoso.com"}), frozenset({"contoso.com"}), False, 500)
    req = validate_request({"to": ["Zoë <z@contoso.com>"], "bcc": ["hidden@contoso.com"], "subject": "Grüße",
                            "text": "plain", "html": "<b>rich</b>", "headers": {"X-Campaign": "c1"}}, pol)
    raw = build_message(req, request_id="r-1", account="news@contoso.com", sender_name="Contoso News",
                        message_id_domain="contoso.com", message_id_key=b"k", attachments=[("r.pdf", "application/pdf", b"%PDF")])
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["From"] == "Contoso News <news@contoso.com>"
    assert "hidden@contoso.com" not in raw.decode() and msg["Bcc"] is None
    assert msg["Subject"] == "Grüße" and msg["X-Campaign"] == "c1"
    assert msg["Message-ID"] == message_id("r-1", "contoso.com", key=b"k")
    assert b"\r\n" in raw and [p.get_content_type() for p in msg.walk()][:4] == ["multipart/mixed", "multipart/alternative", "text/plain", "text/html"]
    assert [a.get_filename() for a in msg.iter_attachments()] == ["r.pdf"]


def test_settings_read_with_defaults_and_names_the_bad_setting():
    s = Settings.from_env({"HVE_ACCOUNTS": "News@Contoso.com, alerts@contoso.com", "AzureWebJobsStorage": "x"})
    assert s.accounts == ("news@contoso.com", "alerts@contoso.com")
    assert (s.mail_queue, s.poison_queue, s.smtp_host, s.smtp_port) == ("outbound-mail", "outbound-mail-poison", "smtp.hve.mx.microsoft", 587)
    assert s.limits_profile == "ga-2026" and s.auth_mode == "basic"
    with pytest.raises(SettingsError, match="HVE_AUTH"):
        Settings.from_env({"HVE_AUTH": "ntlm"})
    with pytest.raises(SettingsError, match="HVE_SMTP_PORT"):
        Settings.from_env({"HVE_SMTP_PORT": "abc"})
    with pytest.raises(SettingsError, match="HVE_PASSWORDS"):
        Settings.from_env({"HVE_PASSWORDS": "[1]"})


def test_every_setting_has_a_unique_name_and_a_description():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)) and all(s.description for s in SETTINGS)


def test_secrets_are_not_in_settings_repr():
    s = Settings.from_env({"HVE_PASSWORDS": '{"a@c.com": "hunter2"}', "RECIPIENT_HASH_KEY": "k3y"})
    assert "hunter2" not in repr(s) and "k3y" not in repr(s)


def test_unresolved_key_vault_reference_for_the_hash_key_is_refused():
    with pytest.raises(SettingsError, match="unresolved Key Vault reference"):
        Settings.from_env({"RECIPIENT_HASH_KEY": "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/x)"})
    with pytest.raises(SettingsError, match="RECIPIENT_HASH_KEY is empty"):
        Settings.from_env({"AzureWebJobsStorage__accountName": "stacct"})
