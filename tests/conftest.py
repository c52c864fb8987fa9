"""Shared fixtures: real Azurite and the real HVE emulator, started once per session."""

pytest_plugins = ["tests.fixtures_storage", "tests.fixtures_emulator"]


# Property tests: a fixed, repeatable search in CI; `HYPOTHESIS_PROFILE=explore` searches far wider.
import os  # noqa: E402

from hypothesis import settings as _hypothesis  # noqa: E402

_hypothesis.register_profile("ci", max_examples=300, derandomize=True, deadline=None)
_hypothesis.register_profile("explore", max_examples=20_000, deadline=None)
_hypothesis.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
