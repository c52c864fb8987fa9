"""Shared fixtures: real Azurite and the real HVE emulator, started once per session."""

pytest_plugins = ["tests.fixtures_storage", "tests.fixtures_emulator"]


# Property tests: a fixed, repeatable search in CI; `HYPOTHESIS_PROFILE=explore` searches far wider.
import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings as _hypothesis  # noqa: E402

_hypothesis.register_profile("ci", max_examples=300, derandomize=True, deadline=None)
_hypothesis.register_profile("explore", max_examples=20_000, deadline=None)
# `./tools/test.sh -m unit` (a quick local loop) searches less; the full suite and CI use "ci".
_hypothesis.register_profile("quick", max_examples=30, derandomize=True, deadline=None)
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


# Tiers: every test is exactly one of `unit` (pure code, no process or server), `integration`
# (against real peers: Azurite, the HVE emulator, the Graph stand-in, the other stand-ins, the
# Bicep parsers) or `system` (the local Functions host, a browser, whole scripts and benchmarks).
#   ./tools/test.sh -m unit         # seconds
#   ./tools/test.sh -m "not system"
# A test is `system` by its module, `integration` when it uses a real-peer fixture (directly or
# through another fixture) or its module starts peers itself, `unit` otherwise.
SYSTEM_MODULES = {
    "test_bench_scripts", "test_crash_and_faults", "test_dashboard_browser", "test_dashboard_page", "test_demo",
    "test_deploy_script",
    "test_devhost", "test_function_app", "test_http_api", "test_real_host_timing", "test_report_api", "test_simulation",
    "test_telemetry_otlp",
}
# Single tests of another tier than their module's (a whole script run from an integration module).
SYSTEM_TESTS = {"test_delivery_trace.py::test_the_delivery_bench_runs_end_to_end",
                "test_producers_doc.py::test_the_curl_and_python_examples_send_their_first_mail_through_the_local_host",
                "test_priority_lane.py::test_a_priority_request_is_sent_before_the_bulk_backlog_drains",
                "test_priority_lane.py::"
                "test_a_priority_request_that_keeps_failing_lands_in_the_lanes_poison_queue_and_is_replayed_onto_the_lane"}
INTEGRATION_MODULES = {"test_azurite", "test_ci_policy", "test_hve_emulator", "test_hve_smtp", "test_infra",
                       "test_requirements_lock",
                       "test_packaging", "test_repo_stands_alone", "test_graph_client", "test_identity_adapters"}
REAL_PEER_FIXTURES = {"azurite", "storage", "emulator", "graph_standin"}
TIERS = ("unit", "integration", "system")


def tier_of(module: str, fixtures: set[str], test: str = "") -> str:
    if module in SYSTEM_MODULES or f"{module}.py::{test}" in SYSTEM_TESTS:
        return "system"
    if module in INTEGRATION_MODULES or fixtures & REAL_PEER_FIXTURES:
        return "integration"
    return "unit"


def pytest_configure(config: pytest.Config) -> None:
    for name, what in (("unit", "pure code: no process, no server"),
                       ("integration", "against real peers (Azurite, the HVE emulator, stand-ins)"),
                       ("system", "the local Functions host, a browser, whole scripts")):
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        test = getattr(item, "originalname", item.name)
        item.add_marker(getattr(pytest.mark, tier_of(module, set(getattr(item, "fixturenames", ())), test)))
