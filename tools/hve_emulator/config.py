"""Emulator configuration: accounts, OAuth tokens, internal domains and the limits of an HVE era.

Every limit is data with a default taken from docs/hve-facts.md, never a constant in the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one HVE era enforces. None switches a limit off."""

    # ga-2026 refuses any external recipient at RCPT with 550 5.5.105.
    external_allowed: bool
    # Accepted messages with at least one external recipient, per account, in a rolling window.
    external_messages_per_window: int | None = None
    rate_window_seconds: float = 60.0
    # External recipients per account per UTC day.
    external_recipients_per_day: int | None = None
    # All recipients (internal and external) of all accounts per UTC day.
    tenant_recipients_per_day: int | None = None
    recipients_per_message: int | None = 50
    # Bytes of the DATA as received (MIME-encoded message), like HVE's 10 MB.
    max_message_bytes: int = 10 * MIB


PROFILES: dict[str, Limits] = {
    # GA: external sending refused; no published tenant cap (billed per recipient instead);
    # 50 recipients per message is carried over from the preview docs (unconfirmed for GA).
    "ga-2026": Limits(external_allowed=False),
    "preview-2024": Limits(
        external_allowed=True,
        external_messages_per_window=10,
        external_recipients_per_day=2_000,
        tenant_recipients_per_day=100_000,
    ),
}


def profile_limits(profile: str, **overrides: object) -> Limits:
    """The limits of a profile with single values replaced, e.g. recipients_per_message=5."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    known = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(PROFILES[profile], **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OAuthToken:
    """An app-only access token as HVE would judge it."""

    # The HVE account the app was allowed on (Add-HVEAppAccess); any other user= gets 5.7.240.
    account: str
    # Emulator epoch seconds; None never expires.
    expires_at: float | None = None
    # False models an app without the Mail.Send application permission (5.7.144).
    mail_send: bool = True


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port, read it from HveEmulator.port
    accounts: Mapping[str, str] = field(default_factory=dict)  # address -> password
    oauth_tokens: Mapping[str, str | OAuthToken] = field(default_factory=dict)  # token -> account
    internal_domains: Collection[str] = field(default_factory=frozenset)
    profile: str = "ga-2026"
    limits: Limits | None = None  # None: the profile's defaults
    basic_auth_blocked: Collection[str] = field(default_factory=frozenset)  # 535 5.7.139
    state_dir: Path = Path(".local/hve-emulator")
    clock: Callable[[], float] | None = None  # epoch seconds; None: time.time
    speedup: float = 1.0  # 60: one clock second counts as a minute
    hostname: str = "hve-emulator.localhost"  # greeting and Hostname= in the 250 reply

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; known: {', '.join(sorted(PROFILES))}")
        if self.speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.state_dir = Path(self.state_dir)

    def effective_limits(self) -> Limits:
        return self.limits if self.limits is not None else PROFILES[self.profile]
