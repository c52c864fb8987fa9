"""Internal versus external recipients, by the tenant's accepted domains."""

from __future__ import annotations

from typing import Collection, Iterable


class InternalDomains:
    """A recipient is internal iff its domain is one of the set (case-insensitive, exact:
    a subdomain of an accepted domain is external unless listed itself)."""

    def __init__(self, domains: Collection[str]) -> None:
        self._domains = frozenset(d.strip().lower() for d in domains if d.strip())

    def is_internal(self, address: str) -> bool:
        _, at, domain = address.rpartition("@")
        return bool(at) and domain.lower() in self._domains

    def split(self, addresses: Iterable[str]) -> tuple[int, int]:
        """(internal, external) recipient counts."""
        internal = external = 0
        for address in addresses:
            if self.is_internal(address):
                internal += 1
            else:
                external += 1
        return internal, external
