"""Shared fixtures: real Azurite and the real HVE emulator, started once per session."""

pytest_plugins = ["tests.fixtures_storage", "tests.fixtures_emulator"]
