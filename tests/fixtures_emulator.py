"""pytest plugin: the HVE emulator, once per session, reset for every test that asks for it.

- hve_emulator: the session's emulator (ga-2026, the accounts and domains below).
- emulator: the same emulator after reset() (counters, faults, quota windows, messages() list,
  passwords/blocks/tokens back to the configuration); reset again after the test.
- make_emulator(config=None, **fields): a fresh emulator with its own state dir, stopped at test
  end; fields override EmulatorConfig fields of the defaults below (or of `config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import pytest

from tools.hve_emulator import EmulatorConfig, HveEmulator

ACCOUNTS = {
    "news@contoso.com": "news-pw",
    "alerts@contoso.com": "alerts-pw",
    "billing@contoso.com": "billing-pw",
}
INTERNAL_DOMAINS = frozenset({"contoso.com", "fabrikam-internal.com"})

MakeEmulator = Callable[..., HveEmulator]


def _default_config(tmp_path_factory: pytest.TempPathFactory) -> EmulatorConfig:
    return EmulatorConfig(
        host="127.0.0.1",
        port=0,
        accounts=dict(ACCOUNTS),
        internal_domains=INTERNAL_DOMAINS,
        profile="ga-2026",
        state_dir=tmp_path_factory.mktemp("hve-emulator"),
    )


@pytest.fixture(scope="session")
def hve_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HveEmulator]:
    with HveEmulator(_default_config(tmp_path_factory)) as emulator:
        yield emulator


@pytest.fixture
def emulator(hve_emulator: HveEmulator) -> Iterator[HveEmulator]:
    hve_emulator.reset()
    yield hve_emulator
    # Faults a test queued but never triggered must not fire in the next test.
    hve_emulator.reset()


@pytest.fixture
def make_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeEmulator]:
    started: list[HveEmulator] = []

    def make(config: EmulatorConfig | None = None, /, **fields: Any) -> HveEmulator:
        base = config if config is not None else _default_config(tmp_path_factory)
        emulator = HveEmulator(dataclasses.replace(base, **fields) if fields else base)
        emulator.start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in reversed(started):
        emulator.stop()
