"""HVE limits by era, as configuration: a named profile plus JSON overrides.

Values come from docs/hve-facts.md. `None` means "no limit enforced".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    # Whether HVE accepts external recipients at all (GA since June 2025: no).
    external_allowed: bool
    recipients_per_message: int | None
    message_bytes: int | None
    # Per account, rolling minute: messages that have at least one external recipient.
    external_messages_per_minute: int | None
    # Per account, daily window.
    external_recipients_per_day: int | None
    recipients_per_day_per_account: int | None
    # Per account, rolling minute: any message.
    messages_per_minute: int | None
    # Whole tenant, daily window.
    recipients_per_day_per_tenant: int | None


PROFILES: dict[str, Limits] = {
    "preview-2024": Limits(
        external_allowed=True,
        recipients_per_message=50,
        message_bytes=TEN_MB,
        external_messages_per_minute=10,
        external_recipients_per_day=2000,
        recipients_per_day_per_account=None,
        messages_per_minute=None,
        recipients_per_day_per_tenant=100_000,
    ),
    "ga-2026": Limits(
        external_allowed=False,
        # Not confirmed for GA; the preview figure is the safe default.
        recipients_per_message=50,
        message_bytes=TEN_MB,
        external_messages_per_minute=None,
        external_recipients_per_day=None,
        recipients_per_day_per_account=None,
        messages_per_minute=None,
        recipients_per_day_per_tenant=None,
    ),
}

_FIELD_NAMES = {f.name for f in fields(Limits)}


def resolve_limits(profile: str, overrides: Mapping[str, object] | None = None) -> Limits:
    """The profile's limits with `overrides` (from HVE_LIMITS) applied; unknown keys are errors."""
    try:
        limits = PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown limits profile {profile!r}; known: {', '.join(PROFILES)}") from None
    if not overrides:
        return limits
    unknown = set(overrides) - _FIELD_NAMES
    if unknown:
        raise ValueError(f"HVE_LIMITS has unknown keys: {', '.join(sorted(unknown))}")
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "external_allowed":
            if not isinstance(value, bool):
                raise ValueError("HVE_LIMITS.external_allowed must be true or false")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"HVE_LIMITS.{key} must be a non-negative integer or null")
        clean[key] = value
    return replace(limits, **clean)
