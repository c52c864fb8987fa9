"""The alert rules of infra/modules/alerts.bicep (docs/alerts.md) against what the app emits.

Every rule is a KQL query over Application Insights' `customMetrics`: an OpenTelemetry instrument's
name is the row's `name`, its attributes are `customDimensions`. Here:

- the names and attribute keys the code records are collected twice: from the code (the
  instruments of shared/telemetry.py and every `.add(...)` / `.set(...)` call on them in shared/,
  read with ast) and from an in-memory OpenTelemetry reader after running the code paths that
  record the alert signals (the `sample_health` timer's sample, a delivery-trace run);
- every query must read exactly the metric names the rules are about, each one emitted, and only
  attribute keys (and values) the code records;
- the rules exist only when `enableAlerts` is true (the missing-trace rule only with the trace on),
  and the `sample_health` timer is disabled with them.

The templates parse and checkov stays clean in tools/iac_check.sh.
"""

from __future__ import annotations

import ast
import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shared.delivery.policy import AccountCursor
from shared.delivery.trace import Reconciler
from shared.governor.pacing import AccountState
from shared.ledger import DEAD
from shared.reporting.health import sample
from shared.settings import Settings
from shared.telemetry import Instruments
from tests.test_infra import _body, _condition, _resources, _timer_functions, _unquote, evaluate
from tests.test_infra import bicep  # noqa: F401, F811  (fixture: every .bicep file, parsed)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"

# The signal each rule reads (docs/alerts.md).
RULE_METRICS = {
    "poisonQueue": "hve_relay.queue.depth",
    "deadRequest": "hve_relay.messages",
    "accountUnhealthy": "hve_relay.account.unhealthy",
    "oldestMessage": "hve_relay.queue.oldest_age",
    "deliveryTraceStalled": "hve_relay.delivery_trace.runs",
}


# ------------------------------------------------------------------ what the code emits


def _reader() -> tuple[Instruments, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return Instruments(meter_provider=MeterProvider(metric_readers=[reader])), reader


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    found: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found.setdefault(metric.name, []).append((dict(point.attributes), point.value))
    return found


def instrument_names() -> dict[str, str]:
    """Attribute of Instruments -> the instrument's metric name."""
    instruments, _ = _reader()
    return {attr: inst.name for attr, inst in vars(instruments).items() if hasattr(inst, "name") and attr != "tracer"}


def recorded_in_code() -> dict[str, set[str]]:
    """Metric name -> attribute keys of every `.add(n, {...})` / `.set(v, {...})` on an instrument
    of shared/telemetry.py anywhere in shared/ (the dict literal's keys)."""
    names = instrument_names()
    keys: dict[str, set[str]] = {}
    for path in SHARED.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("add", "set") and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr in names and len(node.args) == 2):
                continue
            attrs = node.args[1]
            if isinstance(attrs, ast.Name):  # a local dict built just before (health.py: attributes)
                continue
            assert isinstance(attrs, ast.Dict), f"{path}: attributes of {node.func.value.attr} are not a literal"
            keys.setdefault(names[node.func.value.attr], set()).update(k.value for k in attrs.keys)
    return keys


class _Queue:
    def __init__(self, name: str, depth: int, oldest: datetime | None):
        self.queue_name, self._depth, self._oldest = name, depth, oldest

    async def get_queue_properties(self):
        return SimpleNamespace(approximate_message_count=self._depth)

    async def peek_messages(self, max_messages: int = 1):
        return [SimpleNamespace(inserted_on=self._oldest)] if self._oldest else []


class _Governor:
    def __init__(self, states):
        self.states = states

    async def read(self):
        return self.states, None


def run_health_sample(now: datetime) -> tuple[dict[str, Any], dict[str, list]]:
    instruments, reader = _reader()
    ts = now.timestamp()
    result = asyncio.run(sample(
        governor=_Governor([AccountState("hve-a@fabrikam.com", unhealthy_until=ts + 600),
                            AccountState("hve-b@fabrikam.com", unhealthy_until=ts - 1)]),
        mail_queue=_Queue("outbound-mail", 7, now - timedelta(minutes=42)),
        poison_queue=_Queue("outbound-mail-poison", 2, None),
        instruments=instruments, now=ts))
    return result, _points(reader)


class _ThrottledStore:
    """Graph asked every account to wait: the run ends at once, finished (stopped)."""

    def __init__(self, until: datetime):
        self.until = until

    async def cursor(self, account: str) -> AccountCursor:
        return AccountCursor(account, not_before=self.until)


def run_delivery_trace(now: datetime) -> dict[str, list]:
    instruments, reader = _reader()
    settings = Settings.from_env({"HVE_ACCOUNTS": "hve-a@fabrikam.com", "RECIPIENT_HASH_KEY": "k",
                                  "DELIVERY_TRACE_ENABLED": "true"})
    reconciler = Reconciler(settings, None, _ThrottledStore(now + timedelta(minutes=5)), None, None,
                            clock=now.timestamp, instruments=instruments)
    tally = asyncio.run(reconciler.run())
    assert tally.stopped.startswith("throttled")
    reconciler._finished(SimpleNamespace(stopped="", summary=lambda: "complete"))
    return _points(reader)


@pytest.fixture(scope="module")
def emitted() -> dict[str, set[str]]:
    """Metric name -> attribute keys, from the code and from running the alert signals' paths."""
    keys = recorded_in_code()
    now = datetime.now(UTC)
    _, health = run_health_sample(now)
    for points in (health, run_delivery_trace(now)):
        for name, rows in points.items():
            keys.setdefault(name, set()).update(k for attrs, _ in rows for k in attrs)
    return keys


def test_the_health_sample_records_queue_depth_age_and_account_health():
    now = datetime.now(UTC)
    result, points = run_health_sample(now)
    depth = {a["queue"]: v for a, v in points["hve_relay.queue.depth"]}
    assert depth == {"outbound-mail": 7, "outbound-mail-poison": 2}
    age = {a["queue"]: v for a, v in points["hve_relay.queue.oldest_age"]}
    assert 42 * 60 - 5 <= age["outbound-mail"] <= 42 * 60 + 5
    assert age["outbound-mail-poison"] == 0, "nothing visible: age 0"
    assert {a["account"]: v for a, v in points["hve_relay.account.unhealthy"]} == \
        {"hve-a@fabrikam.com": 1, "hve-b@fabrikam.com": 0}
    assert result["accounts"] == {"hve-a@fabrikam.com": 1, "hve-b@fabrikam.com": 0}


def test_a_finished_delivery_trace_run_is_counted_by_result():
    points = run_delivery_trace(datetime.now(UTC))
    runs = {a["result"]: v for a, v in points["hve_relay.delivery_trace.runs"]}
    assert runs == {"stopped": 1, "complete": 1}


def test_the_code_records_every_alert_signal(emitted):
    assert emitted["hve_relay.messages"] == {"outcome", "account"}
    assert emitted["hve_relay.queue.depth"] == {"queue"} == emitted["hve_relay.queue.oldest_age"]
    assert emitted["hve_relay.account.unhealthy"] == {"account"}
    assert emitted["hve_relay.delivery_trace.runs"] == {"result"}


# ------------------------------------------------------------------ the queries


def _queries(bicep) -> dict[str, str]:
    """Rule (resource name in alerts.bicep) -> its KQL, the variable's text."""
    doc = bicep["modules/alerts.bicep"]
    variables = doc["variables"]
    found = {}
    for name, res in _resources(doc, "Microsoft.Insights/scheduledQueryRules").items():
        [criterion] = _body(res["config"])["properties"]["criteria"]["allOf"]
        query = criterion["query"]
        if isinstance(query, dict):
            fn = query["function"]
            assert fn["type"] == "format"
            query = fn["parameters"]["format_string"]
        found[name] = variables[query]["value"]
    return found


def test_every_query_reads_exactly_its_metric_and_only_recorded_dimensions(bicep, emitted):
    queries = _queries(bicep)
    assert set(queries) == set(RULE_METRICS), "one rule per documented alert"
    read = set()
    for rule, kql in queries.items():
        names = set(re.findall(r'\bname\s*==\s*"([^"]+)"', kql))
        assert names == {RULE_METRICS[rule]}, f"{rule} reads {names}"
        name = names.pop()
        read.add(name)
        assert name in emitted, f"{rule}: the app never records {name}"
        assert re.search(r"^customMetrics$", kql, re.MULTILINE), f"{rule}: the app's metrics are in customMetrics"
        dims = set(re.findall(r'customDimensions\["([^"]+)"\]', kql))
        assert dims <= emitted[name], f"{rule} reads dimensions {dims - emitted[name]} that {name} does not have"
        assert "customDimensions." not in kql, "dimension names in brackets (dots are in metric names)"
    assert read == set(RULE_METRICS.values())


def test_the_filtered_values_are_the_ones_the_code_records(bicep):
    queries = _queries(bicep)
    assert 'outcome == "dead"' in queries["deadRequest"] and DEAD == "dead"
    assert 'where queue == "{0}"' in queries["poisonQueue"] and 'where queue == "{0}"' in queries["oldestMessage"]
    main = bicep["main.bicep"]
    module = _body(next(m for m in main["modules"].values() if m["detail"]["path"] == "modules/alerts.bicep")["config"])
    settings = Settings.from_env({})
    assert evaluate(module["params"]["mailQueueName"], main) == settings.mail_queue
    assert evaluate(module["params"]["poisonQueueName"], main) == settings.poison_queue
    rules = {n: _body(r["config"]) for n, r in _resources(bicep["modules/alerts.bicep"],
                                                           "Microsoft.Insights/scheduledQueryRules").items()}
    formats = {n: r["properties"]["criteria"]["allOf"][0]["query"] for n, r in rules.items()}
    assert formats["poisonQueue"]["function"]["parameters"]["arg_1"] == "poisonQueueName"
    assert formats["oldestMessage"]["function"]["parameters"]["arg_1"] == "mailQueueName"


def test_rule_thresholds_and_windows(bicep):
    doc = bicep["modules/alerts.bicep"]
    rules = {n: _body(r["config"])["properties"] for n, r in _resources(doc, "Microsoft.Insights/scheduledQueryRules").items()}
    crit = {n: p["criteria"]["allOf"][0] for n, p in rules.items()}
    assert (crit["poisonQueue"]["operator"], crit["poisonQueue"]["threshold"]) == ("GreaterThan", 0)
    assert crit["poisonQueue"]["metricMeasureColumn"] == "depth"
    assert (crit["deadRequest"]["timeAggregation"], crit["deadRequest"]["threshold"]) == ("Total", 0)
    assert rules["deadRequest"]["windowSize"] == "PT1H", "a dead request in the last hour"
    assert crit["oldestMessage"]["threshold"] == "oldestMessageMinutes"
    assert crit["oldestMessage"]["metricMeasureColumn"] == "oldest_minutes"
    assert (crit["deliveryTraceStalled"]["timeAggregation"], crit["deliveryTraceStalled"]["operator"],
            crit["deliveryTraceStalled"]["threshold"]) == ("Count", "LessThan", 1), "no row in the window fires"
    assert rules["deliveryTraceStalled"]["windowSize"] == "PT1H"
    assert "let threshold = 15m;" in _queries(bicep)["accountUnhealthy"]
    assert [d["name"] for d in crit["accountUnhealthy"]["dimensions"]] == ["account"], "one alert per account"
    # Each rule's measure column is a column its query projects or summarizes.
    for name, c in crit.items():
        if "metricMeasureColumn" in c:
            assert re.search(rf"\b{c['metricMeasureColumn']}\s*=", _queries(bicep)[name]), name
    # The gauges are sampled every 5 minutes: each window holds at least two samples.
    schedule = _timer_functions()["sample_health"]
    assert schedule == "0 */5 * * * *"
    for name in ("poisonQueue", "oldestMessage", "accountUnhealthy"):
        assert rules[name]["windowSize"] in ("PT15M", "PT30M"), name
    for props in rules.values():
        assert props["scopes"] == ["applicationInsightsId"]
        assert props["actions"]["actionGroups"] == [{"operator": {"type": "property_accessor", "operands": {
            "operand_1": "actionGroup", "operand_2": "id"}}}]
        assert props["autoMitigate"] is True


# ------------------------------------------------------------------ only when enableAlerts


def test_alert_resources_exist_only_when_enabled(bicep):
    main = bicep["main.bicep"]
    assert main["parameters"]["enableAlerts"]["default"] is False
    assert main["parameters"]["alertEmail"]["default"] == ""
    [module] = [m for m in main["modules"].values() if m["detail"]["path"] == "modules/alerts.bicep"]
    condition = _condition(module["config"])
    assert condition == "enableAlerts"
    assert evaluate(condition, main) is False
    assert evaluate(condition, main, {"enableAlerts": True}) is True
    # Nothing else creates alert resources.
    for file, doc in bicep.items():
        for rtype in ("Microsoft.Insights/scheduledQueryRules", "Microsoft.Insights/actionGroups",
                      "Microsoft.Insights/metricAlerts"):
            if _resources(doc, rtype):
                assert file == "modules/alerts.bicep", f"{file} creates {rtype} outside the alerts module"
    # The missing-run rule only while the trace runs.
    alerts = bicep["modules/alerts.bicep"]
    stalled = _resources(alerts, "Microsoft.Insights/scheduledQueryRules")["deliveryTraceStalled"]
    assert _condition(stalled["config"]) == "deliveryTraceEnabled"
    assert evaluate(_body(module["config"])["params"]["deliveryTraceEnabled"], main) is False
    assert evaluate(_body(module["config"])["params"]["deliveryTraceEnabled"], main, {"deliveryTraceEnabled": True})
    # The timer the rules read runs only with them.
    switches = _unquote(main["variables"]["timerSettings"]["value"])
    key = "AzureWebJobs.sample_health.Disabled"
    assert evaluate(switches[key], main) == "true"
    assert evaluate(switches[key], main, {"enableAlerts": True}) == "false"


def test_the_action_group_mails_only_a_given_address(bicep):
    doc = bicep["modules/alerts.bicep"]
    [group] = _resources(doc, "Microsoft.Insights/actionGroups").values()
    body = _body(group["config"])
    assert body["location"] == "global"
    assert len(evaluate(body["properties"]["groupShortName"], doc)) <= 12
    receivers = body["properties"]["emailReceivers"]
    assert evaluate(receivers, doc, {"alertEmail": ""}) == []
    mailed = evaluate(receivers, doc, {"alertEmail": "ops@fabrikam.com"})
    assert [r["emailAddress"] for r in mailed] == ["ops@fabrikam.com"]


def test_docs_describe_every_rule():
    text = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
    readme = (ROOT / "infra" / "README.md").read_text(encoding="utf-8")
    for metric in RULE_METRICS.values():
        assert metric in text, f"docs/alerts.md does not mention {metric}"
    for name in ("enableAlerts", "alertEmail", "alertOldestMessageMinutes", "sample_health"):
        assert name in text and name in readme, name
