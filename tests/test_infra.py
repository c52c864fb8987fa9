"""Offline checks of the Bicep templates in infra/ against the code.

Every .bicep file is parsed with pycep-parser 0.7.x, which lives in its own environment
(.venv-iac/pycep, made by `tools/iac_check.sh --setup`; created here on first use) because
checkov pins an older pycep-parser. The tests then read the parsed templates:

- the app settings the template sets are exactly the "app" settings of shared/settings.py
  (both directions), and the template's default values are the code's defaults;
- the storage names (queue, poison queue, tables, containers) are the code's;
- role assignments, storage / Key Vault / Application Insights security properties;
- no secret value anywhere in the templates or the parameters file;
- the Graph permission module, the parameters file, the checkov skips and the deploy script.

The security scan itself (checkov) runs in tools/iac_check.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.hve.credentials import check_secret_names, secret_name_for
from shared.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IAC_VENV = Path(os.environ.get("IAC_VENV", ROOT / ".venv-iac"))
PARSER_PYTHON = IAC_VENV / "pycep" / "bin" / "python"

# Settings the Functions host (not our code) reads and the template therefore sets although
# shared/settings.py does not list them: name -> reason. On Flex Consumption the worker runtime and
# its version live in functionAppConfig.runtime, not in FUNCTIONS_WORKER_RUNTIME, and the host's
# identity-based storage settings (AzureWebJobsStorage__*) are in the list.
HOST_ONLY_SETTINGS: dict[str, str] = {
    "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT": "the host refuses longer HTTP bodies (413) before reading them whole; "
    "a little over HTTP_SEND_MAX_BYTES (POST /api/send)",
    "PYTHON_ENABLE_OPENTELEMETRY": "the Python worker attaches the host's trace context to each invocation and "
    "the host stops forwarding the worker's logs, which the app exports itself (shared/telemetry.py)",
}
# Settings the template must never set: name -> why.
NEVER_SET_SETTINGS = {
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "the worker would call configure_azure_monitor itself, a second "
    "exporter next to the app's (and without its managed identity): every span and log sent twice",
    "PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME": "only read by the worker's own configure_azure_monitor (not used)",
}

# App settings Flex Consumption rejects or ignores (its functionAppConfig replaces them);
# the template must never set them: name -> what replaces it.
FLEX_UNSUPPORTED_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME": "functionAppConfig.runtime.name",
    "FUNCTIONS_WORKER_RUNTIME_VERSION": "functionAppConfig.runtime.version",
    "FUNCTIONS_EXTENSION_VERSION": "Flex runs Functions host 4.x only",
    "WEBSITE_RUN_FROM_PACKAGE": "functionAppConfig.deployment.storage",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING": "no Azure Files content share on Flex",
    "WEBSITE_CONTENTSHARE": "no Azure Files content share on Flex",
    "SCM_DO_BUILD_DURING_DEPLOYMENT": "remote build is a deployment option (--build-remote)",
    "ENABLE_ORYX_BUILD": "remote build is a deployment option (--build-remote)",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT": "functionAppConfig.scaleAndConcurrency",
}

# Template values that differ from the code's default on purpose: name -> why.
DIFFERS_FROM_CODE_DEFAULT = {
    "AzureWebJobsStorage__credential": "identity-based host storage in Azure; empty locally",
}

# Built-in role definition ids (identical in every tenant).
ROLE_IDS = {
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}
# Role -> type of the resource it must be scoped to.
ROLE_SCOPES = {
    "Storage Queue Data Contributor": "Microsoft.Storage/storageAccounts",
    "Storage Table Data Contributor": "Microsoft.Storage/storageAccounts",
    "Storage Blob Data Owner": "Microsoft.Storage/storageAccounts",
    "Key Vault Secrets User": "Microsoft.KeyVault/vaults",
    "Monitoring Metrics Publisher": "Microsoft.Insights/components",
}

MICROSOFT_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
EXCHANGE_ONLINE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"

_DUMP = r"""
import json, sys
from pathlib import Path
from pycep import BicepParser
parser = BicepParser()
out = {}
for name in sys.argv[1:]:
    out[name] = parser.parse(file_path=Path(name))
json.dump(out, sys.stdout, default=str)
"""


# ------------------------------------------------------------------ parsing


def _ensure_parser() -> Path:
    if PARSER_PYTHON.exists():
        return PARSER_PYTHON
    if shutil.which("bash") is None:
        pytest.fail(f"{PARSER_PYTHON} is missing: run tools/iac_check.sh --setup")
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "iac_check.sh"), "--setup", "pycep"],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0 or not PARSER_PYTHON.exists():
        pytest.fail(
            f"could not create {PARSER_PYTHON} (run tools/iac_check.sh --setup):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return PARSER_PYTHON


@pytest.fixture(scope="session")
def bicep() -> dict[str, dict[str, Any]]:
    """Every .bicep file under infra/, parsed: {'main.bicep': {...}, 'modules/x.bicep': {...}}."""
    python = _ensure_parser()
    files = sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.bicep"))
    assert "main.bicep" in files, "infra/main.bicep is missing"
    result = subprocess.run(
        [str(python), "-c", _DUMP, *files], cwd=INFRA, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"a .bicep file does not parse with pycep-parser:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def _key(name: str) -> str:
    return name.strip("'")


def _unquote(obj: Any) -> Any:
    """pycep keeps the quotes of quoted object keys ('azd-env-name'); drop them."""
    if isinstance(obj, dict):
        return {_key(k): _unquote(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unquote(v) for v in obj]
    return obj


def _body(config: dict[str, Any]) -> dict[str, Any]:
    """The object of a resource or module, under an `if (...)` condition or a `for` loop."""
    while isinstance(config, dict) and "config" in config and ("condition" in config or "loop_type" in config):
        config = config["config"]
    return _unquote(config)


def _condition(config: dict[str, Any]) -> Any:
    return config.get("condition") if isinstance(config, dict) else None


def _resources(doc: dict[str, Any], rtype: str | None = None) -> dict[str, dict[str, Any]]:
    found = doc.get("resources", {}) or {}
    return {name: res for name, res in found.items() if rtype is None or res["type"].lower() == rtype.lower()}


def _all_resources(bicep: dict[str, dict[str, Any]], rtype: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [(f, name, res) for f, doc in bicep.items() for name, res in _resources(doc, rtype).items()]


def _the(bicep: dict[str, dict[str, Any]], rtype: str, *, deployed: bool = True) -> tuple[str, dict[str, Any]]:
    matches = [(f, res) for f, _, res in _all_resources(bicep, rtype) if res.get("existing") is not deployed]
    assert len(matches) == 1, f"expected exactly one deployed {rtype}, found {len(matches)}"
    file, res = matches[0]
    return file, _body(res["config"])


def _module_for(bicep: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    modules = [m for m in bicep["main.bicep"].get("modules", {}).values() if m["detail"]["path"] == path]
    assert len(modules) == 1, f"main.bicep must use {path} exactly once"
    return modules[0]


def _get_ci(obj: dict[str, Any], name: str) -> Any:
    """Bicep property names are case-insensitive."""
    for key, value in obj.items():
        if key.lower() == name.lower():
            return value
    raise KeyError(name)


# ------------------------------------------------------------------ a tiny evaluator


class Unknown(Exception):
    """The value depends on deployment-time data (resource properties, module outputs)."""


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INTERP = re.compile(r"\$\{([^}]*)\}")


def evaluate(value: Any, doc: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """Value of a parsed expression with every parameter at its default (or in overrides)."""
    params = doc.get("parameters", {}) or {}
    variables = doc.get("variables", {}) or {}
    overrides = overrides or {}

    def interpolated(expr: str) -> Any:
        head, *path = expr.split(".")
        if head in overrides or head in params or head in variables:
            value = ev(head)
            for part in path:  # `${producer.name}`: a loop item's field
                if not isinstance(value, dict) or part not in value:
                    raise Unknown(f"${{{expr}}}")
                value = value[part]
            return value
        raise Unknown(f"${{{expr}}}")  # a resource property or a module output

    def ev(v: Any) -> Any:
        if isinstance(v, (bool, int, float)) or v is None:
            return v
        if isinstance(v, list):
            return [ev(x) for x in v]
        if isinstance(v, str):
            if _IDENT.match(v):
                if v in overrides:
                    return overrides[v]
                if v in params:
                    if params[v].get("default") is None:
                        raise Unknown(f"parameter {v} has no default")
                    return ev(params[v]["default"])
                if v in variables:
                    return ev(variables[v]["value"])
                return v
            if "${" in v:
                return _INTERP.sub(lambda m: _text(interpolated(m.group(1).strip())), v)
            return v
        if isinstance(v, dict) and "function" in v:
            fn = v["function"]
            args = fn.get("parameters", {}) or {}
            kind = fn["type"]
            if kind == "string":
                return _text(ev(args["value_to_convert"]))
            if kind == "join":
                return ev(args["delimiter"]).join(_text(x) for x in ev(args["input_array"]))
            if kind == "empty":
                return not ev(args["item_to_test"])
            if kind == "to_lower":
                return _text(ev(args["string_to_change"])).lower()
            if kind == "contains":
                return ev(args["item_to_find"]) in ev(args["container"])
            if kind == "replace":
                return _text(ev(args["original_string"])).replace(_text(ev(args["old_string"])),
                                                                 _text(ev(args["new_string"])))
            raise Unknown(f"function {kind}")
        if isinstance(v, dict) and "operator" in v:
            op = v["operator"]
            kind, ops = op["type"], op.get("operands", {})
            if kind == "conditional":
                return ev(ops["true_value"]) if ev(ops["condition"]) else ev(ops["false_value"])
            if kind == "greater_than":
                return _number(ev(ops["operand_1"])) > _number(ev(ops["operand_2"]))
            if kind == "equals":
                return ev(ops["operand_1"]) == ev(ops["operand_2"])
            if kind == "or":
                return ev(ops["operand_1"]) or ev(ops["operand_2"])
            if kind == "and":
                return ev(ops["operand_1"]) and ev(ops["operand_2"])
            if kind == "not":
                return not ev(ops["bool_value"])
            if kind == "property_accessor":
                base, field = ev(ops["operand_1"]), ops["operand_2"]
                if not isinstance(base, dict) or field not in base:
                    raise Unknown(f"{ops['operand_1']!r}.{field}")  # a resource property or a module output
                return base[field]
            raise Unknown(f"operator {kind}")
        if isinstance(v, dict) and "loop_type" in v:  # [for item in array: config]
            detail = v["loop_type"]["detail"]
            if v["loop_type"]["type"] != "array" or v.get("condition") is not None:
                raise Unknown("loop")
            return [evaluate(v["config"], doc, {**overrides, detail["item_name"]: item})
                    for item in ev(detail["array_name"])]
        if isinstance(v, dict):
            return {k: ev(x) for k, x in v.items()}
        raise Unknown(repr(v))

    return ev(value)


def _number(value: Any) -> int:
    """pycep gives integer literals inside expressions as strings ('0')."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?\d+", str(value)):
        raise Unknown(f"not an integer: {value!r}")
    return int(value)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _refers_to(value: Any, name: str) -> bool:
    """The parsed expression mentions the identifier `name`."""
    if isinstance(value, str):
        return value == name or f"${{{name}}}" in value
    if isinstance(value, dict):
        return any(_refers_to(v, name) for v in value.values())
    if isinstance(value, list):
        return any(_refers_to(v, name) for v in value)
    return False


def _accessor_path(value: Any) -> list[str]:
    """`identity.properties.principalId` -> ['identity', 'properties', 'principalId']."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        ops = value["operator"]["operands"]
        return _accessor_path(ops["operand_1"]) + _accessor_path(ops["operand_2"])
    raise AssertionError(f"not a property path: {value!r}")


# ------------------------------------------------------------------ the app settings


def _app_settings(bicep: dict[str, dict[str, Any]]) -> dict[str, Any]:
    variables = bicep["main.bicep"].get("variables", {})
    assert "appSettings" in variables, "main.bicep must hold every app setting in `var appSettings`"
    return _unquote(variables["appSettings"]["value"])


def test_every_app_setting_the_code_reads_is_set_and_nothing_else(bicep):
    template = set(_app_settings(bicep))
    app = {s.name for s in SETTINGS if s.scope == "app"}
    not_app = {s.name: s.scope for s in SETTINGS if s.scope != "app"}
    expected = app | set(HOST_ONLY_SETTINGS)

    missing = sorted(expected - template)
    unknown = sorted(template - expected - set(not_app))
    forbidden = sorted(f"{n} (scope {not_app[n]!r})" for n in template & set(not_app))
    flex = sorted(template & set(FLEX_UNSUPPORTED_SETTINGS))
    assert not missing, f"the code reads these settings but infra/main.bicep does not set them: {missing}"
    assert not unknown, f"infra/main.bicep sets settings the code does not read (shared/settings.py): {unknown}"
    assert not forbidden, f"infra/main.bicep sets settings that must not be set in Azure: {forbidden}"
    assert not flex, f"Flex Consumption does not take these settings: {flex}"
    assert set(HOST_ONLY_SETTINGS).isdisjoint({s.name for s in SETTINGS})
    never = sorted(template & set(NEVER_SET_SETTINGS))
    assert not never, f"infra/main.bicep must not set: {[(n, NEVER_SET_SETTINGS[n]) for n in never]}"


def test_the_worker_and_the_host_export_opentelemetry(bicep):
    """Microsoft Learn, "Use OpenTelemetry with Azure Functions": host.json telemetryMode
    OpenTelemetry (the host's own telemetry) and PYTHON_ENABLE_OPENTELEMETRY=true (the worker's)."""
    assert _app_settings(bicep)["PYTHON_ENABLE_OPENTELEMETRY"] == "true"
    host = json.loads((ROOT / "host.json").read_text())
    assert host["telemetryMode"] == "OpenTelemetry"


def test_the_function_app_gets_exactly_main_app_settings(bicep):
    module = _body(_module_for(bicep, "modules/functionapp.bicep")["config"])
    assert module["params"]["appSettings"] == {
        "function": {"type": "union", "parameters": {"arg_1": "appSettings", "arg_2": "timerSettings"}}
    }, "the app gets `appSettings` and the timer switches `timerSettings`, nothing else"

    doc = bicep["modules/functionapp.bicep"]
    sites = _resources(doc, "Microsoft.Web/sites")
    assert len(sites) == 1
    site = _body(next(iter(sites.values()))["config"])
    loop = site["properties"]["siteConfig"]["appSettings"]
    assert loop["loop_type"]["detail"]["array_name"]["function"] == {
        "type": "items", "parameters": {"arg_1": "appSettings"}
    }, "siteConfig.appSettings must be built from the appSettings parameter and nothing else"
    assert _accessor_path(loop["config"]["name"])[-1] == "key"
    assert _accessor_path(loop["config"]["value"])[-1] == "value"
    # No second place that sets app settings.
    for file, name, res in _all_resources(bicep, "Microsoft.Web/sites/config"):
        pytest.fail(f"{file}: {name} sets site config outside siteConfig.appSettings")


def test_template_defaults_are_the_code_defaults(bicep):
    doc = bicep["main.bicep"]
    wrong = []
    for spec in SETTINGS:
        if spec.scope != "app":
            continue
        try:
            value = evaluate(_app_settings(bicep)[spec.name], doc)
        except Unknown:
            continue  # set from a resource or a required parameter
        if spec.name in DIFFERS_FROM_CODE_DEFAULT:
            assert value != spec.default, f"{spec.name} no longer differs: drop it from DIFFERS_FROM_CODE_DEFAULT"
            continue
        if _text(value) != spec.default:
            wrong.append(f"{spec.name}: template {value!r}, code {spec.default!r}")
    assert not wrong, "template defaults differ from shared/settings.py:\n" + "\n".join(wrong)


def test_settings_that_come_from_azure_point_at_the_right_things(bicep):
    settings = _app_settings(bicep)
    assert _accessor_path(settings["AzureWebJobsStorage__accountName"]) == ["storage", "outputs", "name"]
    for name in ("AzureWebJobsStorage__clientId", "AZURE_CLIENT_ID"):
        assert _accessor_path(settings[name]) == ["identity", "properties", "clientId"], name
    assert _accessor_path(settings["KEY_VAULT_URL"]) == ["keyVault", "outputs", "uri"]
    assert _accessor_path(settings["APPLICATIONINSIGHTS_CONNECTION_STRING"])[:2] == ["monitoring", "outputs"]
    auth = settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    assert auth == "Authorization=AAD;ClientId=${identity.properties.clientId}"
    # The recipient hash key is a Key Vault reference to a secret the deploy script writes.
    ref = settings["RECIPIENT_HASH_KEY"]
    assert isinstance(ref, str) and ref.startswith("@Microsoft.KeyVault(") and ref.endswith(")")
    assert "SecretName=${recipientHashKeySecretName}" in ref and "VaultName=${keyVaultName}" in ref
    main = bicep["main.bicep"]
    assert evaluate("recipientHashKeySecretName", main) == "recipient-hash-key"
    assert "RECIPIENT_HASH_KEY_SECRET_NAME" in main["outputs"]
    # Every setting whose value needs the identity runs as the same user-assigned identity.
    identity = _resources(main)["identity"]
    assert identity["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"


# ------------------------------------------------------------------ storage


def _storage_module_params(bicep):
    return _body(_module_for(bicep, "modules/storage.bicep")["config"])["params"]


def test_storage_names_are_the_code_defaults(bicep):
    main = bicep["main.bicep"]
    params = _storage_module_params(bicep)
    defaults = {s.name: s.default for s in SETTINGS}
    queues = evaluate(params["queueNames"], main)
    tables = evaluate(params["tableNames"], main)
    containers = params["containerNames"]

    # The mail queue and the priority lane, each with the poison queue its trigger's host writes to.
    assert sorted(queues) == sorted([defaults["MAIL_QUEUE"], defaults["MAIL_QUEUE"] + "-poison",
                                     defaults["MAIL_QUEUE_PRIORITY"], defaults["MAIL_QUEUE_PRIORITY"] + "-poison"])
    assert sorted(tables) == sorted([
        defaults["LEDGER_TABLE"], defaults["RECIPIENT_INDEX_TABLE"], defaults["GOVERNOR_TABLE"],
        defaults["WELCOME_STATE_TABLE"], defaults["AGGREGATES_TABLE"], defaults["DELIVERY_TABLE"],
        defaults["SUPPRESSION_TABLE"],
    ])
    assert "deploymentContainerName" in containers, "the Flex deployment container must be created"
    assert evaluate("claimCheckContainerName", main) == defaults["CLAIM_CHECK_CONTAINER"]
    assert "claimCheckContainerName" in containers
    # The relay's own container is created too, and is not the producers'.
    assert evaluate("relayStateContainerName", main) == defaults["RELAY_STATE_CONTAINER"]
    assert "relayStateContainerName" in containers
    assert defaults["RELAY_STATE_CONTAINER"] != defaults["CLAIM_CHECK_CONTAINER"]
    # The deployment container the storage module creates is the one the app deploys from.
    fa = _body(_module_for(bicep, "modules/functionapp.bicep")["config"])["params"]
    assert fa["deploymentContainerName"] == "deploymentContainerName"
    # The settings name the created queue/tables/container, not copies of the strings.
    settings = _app_settings(bicep)
    for setting, var in [("MAIL_QUEUE", "mailQueueName"), ("MAIL_QUEUE_PRIORITY", "priorityQueueName"),
                         ("LEDGER_TABLE", "ledgerTableName"),
                         ("RECIPIENT_INDEX_TABLE", "recipientIndexTableName"),
                         ("GOVERNOR_TABLE", "governorTableName"), ("WELCOME_STATE_TABLE", "welcomeTableName"),
                         ("AGGREGATES_TABLE", "aggregatesTableName"),
                         ("DELIVERY_TABLE", "deliveryTableName"),
                         ("SUPPRESSION_TABLE", "suppressionTableName"),
                         ("CLAIM_CHECK_CONTAINER", "claimCheckContainerName"),
                         ("RELAY_STATE_CONTAINER", "relayStateContainerName")]:
        assert settings[setting] == var, f"{setting} must be set from {var}"
    storage_doc = bicep["modules/storage.bicep"]
    for rtype, param in [("Microsoft.Storage/storageAccounts/queueServices/queues", "queueNames"),
                         ("Microsoft.Storage/storageAccounts/tableServices/tables", "tableNames"),
                         ("Microsoft.Storage/storageAccounts/blobServices/containers", "containerNames")]:
        (res,) = _resources(storage_doc, rtype).values()
        assert res["config"]["loop_type"]["detail"]["array_name"] == param, rtype


def test_storage_account_security(bicep):
    file, account = _the(bicep, "Microsoft.Storage/storageAccounts")
    props = account["properties"]
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False
    # The app runs identity-only: the connection-string form of AzureWebJobsStorage is local only.
    assert next(s for s in SETTINGS if s.name == "AzureWebJobsStorage").scope == "local"
    assert props["allowSharedKeyAccess"] is False
    assert props.get("defaultToOAuthAuthentication") is True
    assert props.get("allowCrossTenantReplication") is False
    for _, name, res in _all_resources(bicep, "Microsoft.Storage/storageAccounts/blobServices/containers"):
        if res.get("existing"):
            continue  # a reference (role scope) to a container created above
        assert _body(res["config"]).get("properties", {}).get("publicAccess") == "None", name


def test_every_prefix_the_relay_keeps_request_copies_under_has_a_lifecycle_backstop(bicep):
    """The relay deletes a request's blobs when the request is final; a management policy deletes
    what is left under each of the relay's prefixes (shared/send/relay_blobs.py: claim-check requests,
    deferred copies in the relay's own container), after the relay has given up on any request
    (SEND_MAX_AGE_HOURS)."""
    from shared.send.relay_blobs import relay_blob_areas
    from shared.settings import Settings

    _, policy = _the(bicep, "Microsoft.Storage/storageAccounts/managementPolicies")
    [rule] = policy["properties"]["policy"]["rules"]
    assert rule["enabled"] is True and rule["type"] == "Lifecycle"
    storage_doc = bicep["modules/storage.bicep"]
    main = bicep["main.bicep"]
    params = _storage_module_params(bicep)
    names = {"claimCheckContainerName": evaluate(params["claimCheckContainerName"], main),
             "relayStateContainerName": evaluate(params["relayStateContainerName"], main)}
    prefixes = {evaluate(p, storage_doc, names) for p in rule["definition"]["filters"]["prefixMatch"]}
    areas = relay_blob_areas(Settings.from_env({}))
    assert prefixes == {f"{area.container}/{area.prefix}" for area in areas}
    assert {area.prefix for area in areas} >= {"requests/", "deferred/"}
    days = evaluate(rule["definition"]["actions"]["baseBlob"]["delete"]["daysAfterModificationGreaterThan"], storage_doc)
    max_age_hours = float(next(s.default for s in SETTINGS if s.name == "SEND_MAX_AGE_HOURS"))
    assert days * 24 > max_age_hours


# ------------------------------------------------------------------ identity and roles


def test_role_assignments_for_the_app_identity(bicep):
    rbac = bicep["modules/rbac.bicep"]
    module = _body(_module_for(bicep, "modules/rbac.bicep")["config"])
    assert _accessor_path(module["params"]["identityPrincipalId"]) == ["identity", "properties", "principalId"]

    resources = _resources(rbac)
    found: dict[str, str] = {}
    for name, res in _resources(rbac, "Microsoft.Authorization/roleAssignments").items():
        body = _body(res["config"])
        props = body["properties"]
        if props["principalId"] != "identityPrincipalId":
            continue
        assert _condition(res["config"]) is None, f"{name}: the app's roles must not be conditional"
        assert props["principalType"] == "ServicePrincipal", name
        role_fn = props["roleDefinitionId"]["function"]
        assert role_fn["type"] == "subscription_resource_id", name
        assert role_fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
        role_id = _resolve_accessor(role_fn["parameters"]["resource_name_1"], rbac)
        scope = body["scope"]
        found[role_id] = resources[scope]["type"]
        # The assignment name is stable per scope, principal and role.
        assert body["name"]["function"]["type"] == "guid", name

    for role, role_id in ROLE_IDS.items():
        assert role_id in found, f"no {role} ({role_id}) assignment for the app identity"
        assert found[role_id] == ROLE_SCOPES[role], f"{role} is scoped to {found[role_id]}, expected {ROLE_SCOPES[role]}"
    extra = set(found) - set(ROLE_IDS.values())
    assert not extra, f"the app identity has roles nobody asked for: {extra}"


# What the operations tools need from an operator's machine (tools/_storage.py; infra/README.md,
# "Operator roles"): role -> the resources it is scoped to.
OPERATOR_ROLES = {
    ("Storage Table Data Reader", "76199698-9eea-4c19-bc75-cec21354c6b6"): {"storage"},
    ("Storage Queue Data Contributor", "974c5e8b-45b9-4653-ba55-5f855dd0fb88"): {"mailQueue", "poisonQueue"},
}


def test_operator_roles_read_the_tables_and_work_the_two_queues_only(bicep):
    rbac = bicep["modules/rbac.bicep"]
    resources = _resources(rbac)
    found: dict[tuple[str, str], set[str]] = {}
    for name, res in _resources(rbac, "Microsoft.Authorization/roleAssignments").items():
        config = res["config"]
        if "loop_type" not in config or not name.startswith("operator"):
            continue  # the app's and the deployer's own, and the producers' (their own test)
        assert config["loop_type"]["detail"] == {"item_name": "id", "array_name": "operatorIds"}, name
        body = _body(config)
        props = body["properties"]
        assert props["principalId"] == "id", name
        assert body["name"]["function"]["type"] == "guid", name
        assert body["name"]["function"]["parameters"]["extra_string_1"] == "id", name
        role_id = _resolve_accessor(props["roleDefinitionId"]["function"]["parameters"]["resource_name_1"], rbac)
        role = next(key for key in OPERATOR_ROLES if key[1] == role_id)
        found.setdefault(role, set()).add(body["scope"])
        # A deployer keeps its own principal type; everybody else has operatorPrincipalType.
        assert evaluate(props["principalType"], rbac, {"id": "d", "deployerPrincipalId": "d",
                                                       "deployerPrincipalType": "ServicePrincipal"}) == "ServicePrincipal"
        assert evaluate(props["principalType"], rbac, {"id": "o", "deployerPrincipalId": "d",
                                                       "operatorPrincipalType": "Group"}) == "Group"
    assert found == OPERATOR_ROLES
    assert resources["poisonQueue"]["existing"] and resources["mailQueue"]["existing"]
    assert resources["storage"]["type"] == "Microsoft.Storage/storageAccounts"
    # No write on any table and nothing on blobs or Key Vault for operators.
    assert "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3" not in {k[1] for k in found}

    # Who the operators are: the deployer (when one is given) and operatorPrincipalIds, each once.
    ids = rbac["variables"]["operatorIds"]["value"]["function"]
    assert ids["type"] == "union"
    assert evaluate(ids["parameters"]["arg_1"], rbac) == []
    assert evaluate(ids["parameters"]["arg_1"], rbac, {"deployerPrincipalId": "d"}) == ["d"]
    assert ids["parameters"]["arg_2"] == "operatorPrincipalIds"
    assert evaluate("operatorPrincipalIds", rbac) == []

    module = _body(_module_for(bicep, "modules/rbac.bicep")["config"])
    for param in ("operatorPrincipalIds", "operatorPrincipalType", "deployerPrincipalId", "poisonQueueName"):
        assert module["params"][param] == param, f"main.bicep does not pass {param} to rbac.bicep"
    main = bicep["main.bicep"]
    assert evaluate("operatorPrincipalIds", main) == []
    assert evaluate("poisonQueueName", main) == "outbound-mail-poison"


def _resolve_accessor(value: Any, doc: dict[str, Any]) -> Any:
    """`roles.storageQueueDataContributor` -> the literal in `var roles`."""
    path = _accessor_path(value)
    current = evaluate(path[0], doc)
    for part in path[1:]:
        current = current[part]
    return current


def test_app_runs_as_the_user_assigned_identity(bicep):
    _, site = _the(bicep, "Microsoft.Web/sites")
    assert site["identity"]["type"] == "UserAssigned"
    assert list(site["identity"]["userAssignedIdentities"]) == ["${identityId}"]
    assert site["properties"]["keyVaultReferenceIdentity"] == "identityId"
    module = _body(_module_for(bicep, "modules/functionapp.bicep")["config"])
    assert _accessor_path(module["params"]["identityId"]) == ["identity", "id"]


# ------------------------------------------------------------------ producers' roles

# What a producer gets: the built-in roles, by id.
QUEUE_MESSAGE_SENDER = "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"  # Storage Queue Data Message Sender
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"  # Storage Blob Data Contributor
# Every data action of Storage Blob Data Contributor but move/action (a rename, hierarchical namespace only:
# the account has none, test_producer_blob_condition_covers_every_data_action_of_the_role): the condition
# must restrict each of them to the producer's prefix.
BLOB_CONTRIBUTOR_DATA_ACTIONS = [
    f"Microsoft.Storage/storageAccounts/blobServices/containers/blobs/{a}"
    for a in ("read", "write", "add/action", "delete")
]
SAMPLE_PRODUCERS = [
    {"name": "Billing", "principalId": "11111111-1111-1111-1111-111111111111"},
    {"name": "shop", "principalId": "22222222-2222-2222-2222-222222222222", "principalType": "Group"},
]


def _producer_grants(bicep, producers=SAMPLE_PRODUCERS) -> list[dict[str, Any]]:
    return evaluate("producerGrants", bicep["main.bicep"], {"producers": producers})


def _rbac_assignments(bicep) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Role assignments of modules/rbac.bicep: name -> (the parsed resource's config, its body)."""
    rbac = bicep["modules/rbac.bicep"]
    return {name: (res["config"], _body(res["config"]))
            for name, res in _resources(rbac, "Microsoft.Authorization/roleAssignments").items()}


def _role_of(body: dict[str, Any], rbac: dict[str, Any]) -> str:
    role_fn = body["properties"]["roleDefinitionId"]["function"]
    assert role_fn["type"] == "subscription_resource_id"
    assert role_fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    return _resolve_accessor(role_fn["parameters"]["resource_name_1"], rbac)


def _loops_over(config: dict[str, Any]) -> tuple[str, str] | None:
    """(item, array) of a `[for item in array: ...]` resource, None for a single one."""
    if isinstance(config, dict) and "loop_type" in config:
        detail = config["loop_type"]["detail"]
        return detail["item_name"], detail["array_name"]
    return None


def _rbac_values(bicep) -> dict[str, Any]:
    """What main.bicep passes to modules/rbac.bicep that can be known before deployment."""
    main = bicep["main.bicep"]
    return {"mailQueueName": evaluate("mailQueueName", main),
            "claimCheckContainerName": evaluate("claimCheckContainerName", main),
            "priorityQueueName": evaluate("priorityQueueName", main),
            "storageAccountName": "st"}


def test_producers_parameter_is_one_list_for_roles_and_blob_producers(bicep):
    main = bicep["main.bicep"]
    params = main["parameters"]
    assert params["producers"]["type"] == "array" and params["producers"]["default"] == []
    assert params["producerPrincipalIds"]["type"] == "array" and params["producerPrincipalIds"]["default"] == []
    assert params["producerPrincipalType"]["default"] == "ServicePrincipal"
    allowed = [d["argument"] for d in params["producerPrincipalType"]["decorators"] if d["type"] == "allowed"]
    assert allowed and set(allowed[0]) == {"ServicePrincipal", "User", "Group"}
    assert "blobProducers" not in params, "BLOB_PRODUCERS comes from `producers` only (names cannot drift)"

    # One normalised list: lower-cased names (as the relay reads BLOB_PRODUCERS), a type per principal.
    assert _producer_grants(bicep) == [
        {"name": "billing", "principalId": SAMPLE_PRODUCERS[0]["principalId"], "principalType": "ServicePrincipal"},
        {"name": "shop", "principalId": SAMPLE_PRODUCERS[1]["principalId"], "principalType": "Group"},
    ]
    assert evaluate("producerGrants", main, {"producers": SAMPLE_PRODUCERS[:1], "producerPrincipalType": "User"})[0][
        "principalType"] == "User"

    # BLOB_PRODUCERS is derived from the same parameter, and the relay reads exactly those names.
    setting = _app_settings(bicep)["BLOB_PRODUCERS"]
    assert _refers_to(setting, "blobProducerNames")
    value = evaluate(setting, main, {"producers": SAMPLE_PRODUCERS})
    assert value == "billing,shop"
    from shared.settings import Settings
    assert Settings.from_env({"BLOB_PRODUCERS": value}).blob_producers == {"billing", "shop"}
    assert evaluate(setting, main) == "", "no producers by default: only the relay's own"

    # ...and the role assignments get that list, not the raw parameter.
    module = _body(_module_for(bicep, "modules/rbac.bicep")["config"])["params"]
    assert module["producers"] == "producerGrants"
    assert module["producerPrincipalIds"] == "producerPrincipalIds"
    assert module["producerPrincipalType"] == "producerPrincipalType"
    assert module["mailQueueName"] == "mailQueueName"
    assert module["claimCheckContainerName"] == "claimCheckContainerName"


def test_producer_role_assignments_scope_role_and_condition(bicep):
    rbac = bicep["modules/rbac.bicep"]
    resources = _resources(rbac)
    values = _rbac_values(bicep)
    grants = _producer_grants(bicep)
    found: dict[tuple[str, str], dict[str, Any]] = {}  # (role id, loop array) -> body
    queues_granted: dict[str, set[str]] = {}  # loop array -> the queues its sender role is scoped to
    for name, (config, body) in _rbac_assignments(bicep).items():
        loop = _loops_over(config)
        if loop is None or loop[1] not in ("producers", "producerPrincipalIds"):
            continue
        item, array = loop
        props = body["properties"]
        role = _role_of(body, rbac)
        scope = resources[body["scope"]]
        assert scope["existing"] is True, f"{name}: scoped to an existing resource of storage.bicep"
        scope_name = evaluate(_body(scope["config"])["name"], rbac, values)
        found[(role, array)] = {"scope_type": scope["type"], "scope_name": scope_name, "body": body}
        if role == QUEUE_MESSAGE_SENDER:
            queues_granted.setdefault(array, set()).add(scope_name)

        # Deterministic names: guid(scope, principal, role).
        guid = body["name"]["function"]
        assert guid["type"] == "guid", name
        guid_args = list(guid["parameters"].values())
        assert _accessor_path(guid_args[0]) == [body["scope"], "id"], name
        principal = props["principalId"]
        assert guid_args[1] == principal, name
        assert _resolve_accessor(guid_args[2], rbac) == role, name

        if array == "producers":
            assert _accessor_path(principal) == [item, "principalId"], name
            assert _accessor_path(props["principalType"]) == [item, "principalType"], name
        else:
            assert principal == item, name
            assert props["principalType"] == "producerPrincipalType", name

    queue = f"st/default/{values['mailQueueName']}"
    container = f"st/default/{values['claimCheckContainerName']}"
    assert set(found) == {(QUEUE_MESSAGE_SENDER, "producers"), (BLOB_DATA_CONTRIBUTOR, "producers"),
                          (QUEUE_MESSAGE_SENDER, "producerPrincipalIds")}, \
        "named producers: queue sender + blob contributor; queue-only producers: queue sender; nothing else"
    for key in ((QUEUE_MESSAGE_SENDER, "producers"), (QUEUE_MESSAGE_SENDER, "producerPrincipalIds")):
        assert found[key]["scope_type"] == "Microsoft.Storage/storageAccounts/queueServices/queues", key
        # The mail queue and the priority lane's queue, nothing else.
        assert queues_granted[key[1]] == {queue, f"st/default/{values['priorityQueueName']}"}, key
        assert "condition" not in found[key]["body"]["properties"], key
    blob = found[(BLOB_DATA_CONTRIBUTOR, "producers")]
    assert blob["scope_type"] == "Microsoft.Storage/storageAccounts/blobServices/containers"
    assert blob["scope_name"] == container, "the claim-check container only (never the relay's own container)"
    assert blob["scope_name"] != f"st/default/{evaluate('relayStateContainerName', bicep['main.bicep'])}"

    props = blob["body"]["properties"]
    assert props["conditionVersion"] == "2.0"
    for grant in grants:
        condition = evaluate(props["condition"], rbac, {**values, "producer": grant})
        prefix = f"requests/{grant['name']}/"
        # Writes and reads (path) and listings (prefix) are both held to the producer's prefix...
        assert condition.count(f"StringStartsWith '{prefix}'") == 2, condition
        assert "@Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] " \
               f"StringStartsWith '{prefix}'" in condition
        assert "@Request[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:prefix] " \
               f"StringStartsWith '{prefix}'" in condition
        assert condition.count(f"StringEquals '{values['claimCheckContainerName']}'") == 2
        # ...and to nobody else's.
        assert set(re.findall(r"StringStartsWith '([^']*)'", condition)) == {prefix}
        assert "{prefix}" not in condition and "{container}" not in condition
        for action in BLOB_CONTRIBUTOR_DATA_ACTIONS:
            assert f"!(ActionMatches{{'{action}'}}" in condition, action
        assert condition.count("(") == condition.count(")")


def test_producer_condition_is_the_documented_one(bicep):
    """docs/security.md shows the condition for producer `shop`; it is the one the template writes."""
    rbac = bicep["modules/rbac.bicep"]
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    m = re.search(r"The condition for producer `shop`.*?```\n(.*?)```", text, re.DOTALL)
    assert m, "docs/security.md: the condition for producer `shop`"
    (_, body), = [(c, b) for c, b in _rbac_assignments(bicep).values()
                  if _loops_over(c) and _role_of(b, rbac) == BLOB_DATA_CONTRIBUTOR]
    shop = next(g for g in _producer_grants(bicep) if g["name"] == "shop")
    condition = evaluate(body["properties"]["condition"], rbac, {**_rbac_values(bicep), "producer": shop})
    assert " ".join(condition.split()) == " ".join(m.group(1).split())


def test_producer_blob_condition_covers_every_data_action_of_the_role(bicep):
    """Storage Blob Data Contributor's data actions are read, write, add/action, delete and move/action.
    The condition restricts the first four; move/action renames in a hierarchical namespace only, which
    the account does not have (so it stays unusable)."""
    _, account = _the(bicep, "Microsoft.Storage/storageAccounts")
    assert not account["properties"].get("isHnsEnabled"), \
        "with a hierarchical namespace the producers' condition must also restrict blobs/move/action"


def test_every_producer_queue_is_granted_to_the_producers(bicep):
    """Producers may send to every queue the relay reads requests from (not the poison queue): today the
    mail queue. A new one (e.g. a priority queue) needs its own sender assignments in modules/rbac.bicep."""
    main = bicep["main.bicep"]
    rbac = bicep["modules/rbac.bicep"]
    resources = _resources(rbac)
    values = _rbac_values(bicep)
    queues = [q for q in evaluate(_storage_module_params(bicep)["queueNames"], main) if not q.endswith("-poison")]
    for loop in (("producer", "producers"), ("principalId", "producerPrincipalIds")):
        granted = {evaluate(_body(resources[b["scope"]]["config"])["name"], rbac, values).rsplit("/", 1)[-1]
                   for c, b in _rbac_assignments(bicep).values()
                   if _loops_over(c) == loop and _role_of(b, rbac) == QUEUE_MESSAGE_SENDER}
        assert granted == set(queues), f"{loop[1]} may send to {sorted(granted)}, the relay reads {sorted(queues)}"


def test_producers_get_no_role_on_the_account_or_anything_else(bicep):
    """Only the two producer scopes: nothing on the storage account, the relay's container, the vault."""
    rbac = bicep["modules/rbac.bicep"]
    resources = _resources(rbac)
    for name, (config, body) in _rbac_assignments(bicep).items():
        if _refers_to(body["properties"]["principalId"], "producer") or (
                _loops_over(config) and not name.startswith("operator")):
            assert resources[body["scope"]]["type"] in (
                "Microsoft.Storage/storageAccounts/queueServices/queues",
                "Microsoft.Storage/storageAccounts/blobServices/containers"), name


def _producer_examples() -> dict[str, str]:
    text = (INFRA / "README.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in
            re.finditer(r"<!-- producers-example: ([\w-]+) -->\n```\w*\n(.*?)\n```", text, re.S)}


def test_the_infra_readme_s_producer_examples_fit_the_parameters(bicep):
    """infra/README.md's `az deployment group create --parameters` and `.bicepparam` examples give the
    same producers, in the parameter's shape, with names the relay accepts."""
    from shared.settings import Settings

    main = bicep["main.bicep"]
    examples = _producer_examples()
    assert set(examples) == {"az", "bicepparam"}
    az = examples["az"]
    assert "az deployment group create" in az and "-f infra/main.bicep" in az
    producers = json.loads(re.search(r"producers='([^']*)'", az).group(1))
    queue_only = json.loads(re.search(r"producerPrincipalIds='([^']*)'", az).group(1))
    for entry in producers:
        assert set(entry) <= {"name", "principalId", "principalType"} and {"name", "principalId"} <= set(entry)
    grants = evaluate("producerGrants", main, {"producers": producers})
    allowed = [d["argument"] for d in main["parameters"]["producerPrincipalType"]["decorators"]
               if d["type"] == "allowed"][0]
    assert all(g["principalType"] in allowed for g in grants)
    blob_producers = evaluate(_app_settings(bicep)["BLOB_PRODUCERS"], main, {"producers": producers})
    assert Settings.from_env({"BLOB_PRODUCERS": blob_producers}).blob_producers == {g["name"] for g in grants}
    ids = [g["principalId"] for g in grants] + queue_only
    assert len(set(ids)) == len(ids), "a principal appears once (one assignment per principal, role and scope)"

    # The .bicepparam names the template next to it and gives the same values, in Bicep syntax.
    bicepparam = examples["bicepparam"]
    assert bicepparam.startswith("using 'main.bicep'\n")
    params = set(re.findall(r"^param (\w+) =", bicepparam, re.M))
    required = {n for n, p in main["parameters"].items() if p.get("default") is None}
    assert required <= params <= set(main["parameters"]), params
    entries = re.findall(r"\{ name: '([^']*)', principalId: '([^']*)'(?:, principalType: '([^']*)')? \}", bicepparam)
    assert [{"name": n, "principalId": i, **({"principalType": t} if t else {})} for n, i, t in entries] == producers
    assert re.findall(r"'([0-9a-f-]{36})'", bicepparam.split("param producerPrincipalIds", 1)[1]) == queue_only


# ------------------------------------------------------------------ Flex Consumption


def test_flex_consumption_python_app(bicep):
    _, plan = _the(bicep, "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True

    doc = bicep["modules/functionapp.bicep"]
    _, site = _the(bicep, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    props = site["properties"]
    assert props["httpsOnly"] is True
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    # Deprecated on Flex Consumption; the publishing-credential policies below turn FTP off.
    assert "ftpsState" not in props["siteConfig"]
    config = props["functionAppConfig"]
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}
    assert config["runtime"]["name"] == "python"
    assert config["runtime"]["version"] == "pythonVersion"

    # Same Python as the code (the interpreter this test suite runs on).
    code_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    module = _body(_module_for(bicep, "modules/functionapp.bicep")["config"])
    assert module["params"]["pythonVersion"] == code_python, "main.bicep deploys another Python than the code's"
    allowed = [d["argument"] for d in doc["parameters"]["pythonVersion"]["decorators"] if d["type"] == "allowed"]
    assert allowed and code_python in allowed[0]

    creds = {_body(r["config"])["name"]: _body(r["config"])["properties"]["allow"]
             for _, _, r in _all_resources(bicep, "Microsoft.Web/sites/basicPublishingCredentialsPolicies")}
    assert creds == {"ftp": False, "scm": False}, "FTP and SCM basic-auth publishing must be off"


# ------------------------------------------------------------------ Key Vault, monitoring


def test_key_vault_rbac_soft_delete_purge_protection(bicep):
    _, vault = _the(bicep, "Microsoft.KeyVault/vaults")
    props = vault["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enableSoftDelete"] is True
    assert props["enablePurgeProtection"] is True
    assert "accessPolicies" not in props, "RBAC mode: no access policies"
    assert not props.get("enabledForTemplateDeployment"), "templates must not read secrets"


def test_application_insights_entra_only(bicep):
    _, component = _the(bicep, "Microsoft.Insights/components")
    assert _get_ci(component["properties"], "DisableLocalAuth") is True
    assert component["properties"]["WorkspaceResourceId"], "workspace-based Application Insights"
    _the(bicep, "Microsoft.OperationalInsights/workspaces")


# ------------------------------------------------------------------ no secrets


SECRET_PATTERNS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"AccountKey=",
        r"SharedAccessSignature",
        r"\bsig=",
        r"InstrumentationKey=[0-9a-f]{8}-",
        r"\blist(Keys|Secrets|AccountSas|ServiceSas)\s*\(",
        r"-----BEGIN",
        r"\bclient_?secret\b",
    )
]


def test_the_template_creates_no_secret_value(bicep):
    for rtype in ("Microsoft.KeyVault/vaults/secrets", "Microsoft.KeyVault/vaults/keys",
                  "Microsoft.KeyVault/vaults/accessPolicies"):
        assert not _all_resources(bicep, rtype), f"the template must not create {rtype}"
    for file, doc in bicep.items():
        for name, param in (doc.get("parameters") or {}).items():
            decorators = {d["type"] for d in param.get("decorators", [])}
            if "secure" in decorators:
                assert "default" not in param, f"{file}: secure parameter {name} has a default"
        for name, out in (doc.get("outputs") or {}).items():
            assert "password" not in name.lower(), f"{file}: output {name} looks like a secret"
    texts = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
             for p in sorted(INFRA.rglob("*")) if p.suffix in (".bicep", ".json")}
    for path, text in texts.items():
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{path} matches {pattern.pattern!r}: no secrets or keys in templates"
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    for name in parameters:
        assert not re.search(r"password|secret|key$", name, re.IGNORECASE), f"main.parameters.json: {name}"


# ------------------------------------------------------------------ Graph permissions


def test_graph_permissions_module(bicep):
    doc = bicep["modules/graph.bicep"]
    assert "microsoftGraphV1" in (doc.get("extensions") or {}), "graph.bicep must declare `extension microsoftGraphV1`"
    config = json.loads((INFRA / "bicepconfig.json").read_text(encoding="utf-8"))
    ref = config["extensions"]["microsoftGraphV1"]
    assert ref.startswith("br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:"), ref

    sps = {name: _body(r["config"])["appId"] for name, r in _resources(doc, "Microsoft.Graph/servicePrincipals").items()}
    sps = {name: evaluate(app, doc) for name, app in sps.items()}
    assigned = {}
    for name, res in _resources(doc, "Microsoft.Graph/appRoleAssignedTo").items():
        assert res["api_version"] == "v1.0"
        cond = _condition(res["config"])
        assert isinstance(cond, str) and cond in doc["parameters"], f"{name} must sit behind a bool parameter"
        body = _body(res["config"])
        assert body["principalId"] == "principalId"
        sp = _accessor_path(body["resourceId"])[0]
        role = json.dumps(body["appRoleId"])
        assigned[sps[sp]] = assigned.get(sps[sp], "") + f" {cond}: {role}"
    assert MICROSOFT_GRAPH_APP_ID in assigned and "User.Read.All" in assigned[MICROSOFT_GRAPH_APP_ID]
    assert "ExchangeMessageTrace.Read.All" in assigned[MICROSOFT_GRAPH_APP_ID], "delivery confirmation (message trace)"
    assert EXCHANGE_ONLINE_APP_ID in assigned and "Mail.Send" in assigned[EXCHANGE_ONLINE_APP_ID], \
        "optional Exchange Online Mail.Send for XOAUTH2"

    # graph.bicep is a deployment of its own (infra/deploy.sh, after the identity exists): inside
    # main.bicep the grant fails on a first run (Entra has not replicated the new identity).
    main = bicep["main.bicep"]
    assert not [m for m in main.get("modules", {}).values() if m["detail"]["path"] == "modules/graph.bicep"], \
        "main.bicep must not deploy modules/graph.bicep (deploy.sh deploys it second)"
    assert set(doc["parameters"]) == {"principalId", "grantUserReadAll", "grantExchangeMailSend",
                                       "grantMessageTraceRead"}, \
        "the parameters infra/deploy.sh passes to graph.bicep"
    for name, output in (("grantGraphUserReadAll", "GRAPH_USER_READ_ALL_GRANTED"),
                         ("grantExchangeMailSend", "EXCHANGE_MAIL_SEND_GRANTED"),
                         ("grantGraphMessageTrace", "GRAPH_MESSAGE_TRACE_GRANTED")):
        assert main["parameters"][name]["type"] == "bool"
        assert main["parameters"][name]["default"] is False, f"{name} must be opt-in (needs Entra admin rights)"
        assert main["outputs"][output]["value"] == name, f"deploy.sh reads {output} to know what to grant"
    script = (INFRA / "deploy.sh").read_text(encoding="utf-8")
    for text in ("infra/modules/graph.bicep", "GRAPH_USER_READ_ALL_GRANTED", "EXCHANGE_MAIL_SEND_GRANTED",
                 "principalId=", "grantUserReadAll=", "grantExchangeMailSend=", "GRAPH_MESSAGE_TRACE_GRANTED",
                 "grantMessageTraceRead="):
        assert text in script, text


def _timer_functions() -> dict[str, str]:
    """Timer functions of function_app.py: name -> the schedule's setting (%NAME%)."""
    import ast
    tree = ast.parse((ROOT / "function_app.py").read_text(encoding="utf-8"))
    timers = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "timer_trigger":
                    schedule = next(k.value.value for k in deco.keywords if k.arg == "schedule")
                    timers[node.name] = schedule
    return timers


def test_a_disabled_feature_disables_its_timer(bicep):
    """With the welcome scan off, Flex must not start an instance every 15 minutes for nothing:
    the timer function is disabled with AzureWebJobs.<function>.Disabled."""
    main = bicep["main.bicep"]
    switches = _unquote(main["variables"]["timerSettings"]["value"])
    timers = _timer_functions()
    assert "welcome_new_users" in timers
    for key in switches:
        m = re.fullmatch(r"AzureWebJobs\.([A-Za-z_][A-Za-z0-9_]*)\.Disabled", key)
        assert m, f"{key} is not AzureWebJobs.<function>.Disabled"
        assert m.group(1) in timers, f"{key}: function_app.py has no timer function {m.group(1)}"
    key = "AzureWebJobs.welcome_new_users.Disabled"
    assert evaluate(switches[key], main) == "true", "the welcome scan is off by default: its timer too"
    assert evaluate(switches[key], main, {"welcomeEnabled": True}) == "false"
    key = "AzureWebJobs.confirm_delivery.Disabled"
    assert evaluate(switches[key], main) == "true", "message trace is off by default: its timer too"
    assert evaluate(switches[key], main, {"deliveryTraceEnabled": True}) == "false"
    assert not set(switches) & set(_app_settings(bicep)), "the switches are not code settings"


# ------------------------------------------------------------------ parameters file, modules


def test_parameters_file_fits_main_bicep(bicep):
    main = bicep["main.bicep"]["parameters"]
    given = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    unknown = sorted(set(given) - set(main))
    assert not unknown, f"main.parameters.json sets parameters main.bicep does not have: {unknown}"
    required = sorted(n for n, p in main.items() if p.get("default") is None)
    assert "hveAccounts" in required and "environmentName" in required
    assert not sorted(set(required) - set(given)), f"main.parameters.json misses required {required}"
    for name in ("hveAccounts", "hveInternalDomains", "hveLimitsProfile", "welcomeEnabled", "welcomeSchedule",
                 "welcomeLookback", "welcomeGroupId", "welcomeBcc"):
        assert name in given, f"main.parameters.json should show {name}"
    for name, entry in given.items():
        value = entry["value"]
        for deco in main[name].get("decorators", []):
            if deco["type"] == "allowed":
                assert value in deco["argument"], f"{name}={value!r} is not one of {deco['argument']}"
        kind = main[name]["type"]
        python_type = {"string": str, "int": int, "bool": bool, "array": list, "object": dict}[kind]
        assert isinstance(value, python_type), f"{name} must be a {kind}"


def test_module_paths_exist(bicep):
    for name, module in bicep["main.bicep"]["modules"].items():
        path = module["detail"]["path"]
        assert (INFRA / path).is_file(), f"module {name}: {path} does not exist"
        assert path in bicep


def test_outputs_are_env_style(bicep):
    outputs = bicep["main.bicep"]["outputs"]
    for name in outputs:
        assert re.match(r"^[A-Z][A-Z0-9_]*$", name), f"output {name} is not ENV_STYLE"
    for name in ("AZURE_FUNCTION_APP_NAME", "AZURE_KEY_VAULT_NAME", "AZURE_STORAGE_ACCOUNT_NAME", "MAIL_QUEUE_URL",
                 "HVE_ACCOUNTS", "HVE_AUTH", "RECIPIENT_HASH_KEY_SECRET_NAME"):
        assert name in outputs, f"deploy.sh reads output {name}"


# ------------------------------------------------------------------ checkov config, deploy script


def test_every_checkov_skip_has_a_reason():
    lines = (INFRA / ".checkov.yaml").read_text(encoding="utf-8").splitlines()
    skips = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*-\s*(CKV2?_[A-Z0-9_]+)\s*$", line)
        if m:
            skips.append(m.group(1))
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"{m.group(1)} is skipped without a reason"
    assert skips, "no skip-check list found"
    assert len(skips) == len(set(skips))


def _deploy_function(name: str) -> str:
    text = (INFRA / "deploy.sh").read_text(encoding="utf-8")
    m = re.search(rf"^{name}\(\) \{{.*?\}}$", text, re.MULTILINE)
    assert m, f"deploy.sh has no one-line function {name}"
    return m.group(0)


# Addresses whose readable parts collide, upper case, long ones, leading/trailing dots and dashes.
TRICKY_ADDRESSES = [
    "hve-notify@contoso.com", "Relay.One+x@Sub.Contoso.co.uk", "a_b@c-d.org", "a.b@x.com", "a-b@x.com", "A.B@X.com",
    "a+b@x.com", "o'brien@x.com", "-.-@x.com", "x" * 64 + "@" + "sub." * 40 + "example.com", "UPPER.CASE@EXAMPLE.ORG",
]


@pytest.mark.parametrize("address", TRICKY_ADDRESSES)
def test_deploy_script_secret_names_are_the_apps(address):
    helpers = "\n".join(_deploy_function(n) for n in ("lower", "upper", "sha256_hex", "secret_name_for", "env_name_for"))
    out = subprocess.run(
        ["bash", "-c", f'{helpers}\nsecret_name_for "$1"; echo; env_name_for "$1"', "_", address],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    # One rule, shared/hve/credentials.py; the script reimplements it in bash and must agree.
    assert out[0] == secret_name_for(address)
    assert re.fullmatch(r"[A-Za-z0-9-]{1,127}", out[0]), "a valid Key Vault secret name"
    assert out[1] == "HVE_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", address.upper())


def test_secret_names_of_tricky_addresses_are_distinct():
    lowered = {a.lower() for a in TRICKY_ADDRESSES}
    assert len(check_secret_names(TRICKY_ADDRESSES)) == len(lowered)
    assert len({secret_name_for(a) for a in lowered}) == len(lowered)
    assert secret_name_for("a.b@x.com") != secret_name_for("a-b@x.com")
    assert "SHA-256" in next(s.description for s in SETTINGS if s.name == "KEY_VAULT_URL")


def test_deploy_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(INFRA / "deploy.sh")], check=True, timeout=30)
    text = (INFRA / "deploy.sh").read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    for option in ("--resource-group", "--location", "--parameters", "--what-if", "--skip-app", "--skip-secrets"):
        assert option in text, option
    # Secrets reach az through a pipe, never as --value on the command line.
    assert "--value" not in text


def test_deploy_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); tools/iac_check.sh runs it too")
    subprocess.run(["shellcheck", str(INFRA / "deploy.sh"), str(ROOT / "tools" / "iac_check.sh")],
                   check=True, timeout=60)


# ------------------------------------------------------------------ outcome events (modules/events.bicep)


def test_the_event_grid_topic_and_its_sender_role_come_only_with_the_flag(bicep):
    module = _module_for(bicep, "modules/events.bicep")
    assert _condition(module["config"]) == "enableEventGridTopic"
    params = _body(module["config"])["params"]
    assert _accessor_path(params["identityPrincipalId"]) == ["identity", "properties", "principalId"]
    main = bicep["main.bicep"]
    assert evaluate("enableEventGridTopic", main) is False and evaluate("eventsQueueName", main) == ""
    settings = _app_settings(bicep)
    assert settings["EVENTS_QUEUE"] == "eventsQueueName" and settings["EVENTS_SOURCE"] == "eventsSource"
    endpoint = json.dumps(settings["EVENTS_TOPIC_ENDPOINT"])
    assert "enableEventGridTopic" in endpoint and "endpoint" in endpoint, endpoint

    doc = bicep["modules/events.bicep"]
    (topic,) = _resources(doc, "Microsoft.EventGrid/topics").values()
    props = _body(topic["config"])["properties"]
    assert props["inputSchema"] == "CloudEventSchemaV1_0" and props["disableLocalAuth"] is True
    (role,) = _resources(doc, "Microsoft.Authorization/roleAssignments").values()
    body = _body(role["config"])
    assert _condition(role["config"]) is None and body["scope"] == "topic"
    assert body["properties"]["principalId"] == "identityPrincipalId"
    assert body["properties"]["principalType"] == "ServicePrincipal"
    role_fn = body["properties"]["roleDefinitionId"]["function"]
    assert evaluate(role_fn["parameters"]["resource_name_1"], doc) == "d5a91429-5739-47e2-a06b-3470a27159e7"  # EventGrid Data Sender
