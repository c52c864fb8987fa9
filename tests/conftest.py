"""Shared fixtures: real Azurite and the real HVE emulator, started once per session."""

pytest_plugins = ["tests.fixtures_storage", "tests.fixtures_emulator"]


# Property tests: a fixed, repeatable search in CI; `HYPOTHESIS_PROFILE=explore` searches far wider.
import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings as _hypothesis  # noqa: E402

_hypothesis.register_profile("ci", max_examples=300, derandomize=True, deadline=None)
_hypothesis.register_profile("explore", max_examples=20_000, deadline=None)
_hypothesis.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# In CI (CI=true) every test must run: a skip there means a missing tool or service, so it is
# reported as a failure. Test node ids that may still skip in CI go here, each with its reason.
ALLOWED_CI_SKIPS: dict[str, str] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if report.nodeid in ALLOWED_CI_SKIPS:
        return
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI=true), which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())
