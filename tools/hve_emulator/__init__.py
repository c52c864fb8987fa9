"""Local emulator of Exchange Online High Volume Email (HVE) SMTP submission.

A real SMTP server (aiosmtpd) on 127.0.0.1 with STARTTLS, LOGIN/PLAIN/XOAUTH2 and HVE's rules
and replies (docs/hve-facts.md), for tests and the local dev stack. Never deployed.
"""

from .config import PROFILES, EmulatorConfig, Limits, OAuthToken, profile_limits
from .emulator import HveEmulator
from .store import StoredMessage

__all__ = [
    "PROFILES",
    "EmulatorConfig",
    "HveEmulator",
    "Limits",
    "OAuthToken",
    "StoredMessage",
    "profile_limits",
]
