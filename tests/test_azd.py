"""azd (Azure Developer CLI): azure.yaml, its hooks and infra/main.bicepparam, without azd.

- azure.yaml is validated against a subset of azd's published JSON schema (schemas/v1.0/
  azure.yaml.json of Azure/azure-dev). No package on PyPI or npm ships that file and it cannot be
  fetched here, so the subset below is written from the documented fields this project uses (the
  project's name pattern; services.<name>.project/language/host; infra.provider/path/module;
  hooks.<event>.posix|windows.shell/run/continueOnError/interactive, shell one of sh/pwsh), with
  additionalProperties false wherever this project's file should not grow unknown keys.
- The hooks run as azd runs them (sh, from the project root, the azd environment's values in the
  environment) against the recording az stand-in (tools/az_standin.py) after a simulated
  `azd provision`, and the az calls they make are asserted like tests/test_deploy_script.py does.
- main.bicepparam (azd) and main.parameters.json (infra/deploy.sh) set the same parameters to the
  same defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

yaml = pytest.importorskip("yaml")

from shared.hve.credentials import secret_name_for  # noqa: E402
from tools.az_standin import SUBSCRIPTION_ID, AzStandInServer, call  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
FAST = {"DEPLOY_KV_WAIT": "0", "DEPLOY_GRAPH_WAIT": "0", "DEPLOY_REFS_WAIT": "0", "DEPLOY_PUBLISH_WAIT": "0"}
PASSWORDS = {"HVE_PASSWORD_HVE_ONE_FABRIKAM_COM": "pw-one s3cret!", "HVE_PASSWORD_HVE_TWO_FABRIKAM_COM": "pw-two s3cret!"}

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("bash", "sh")), reason="the hooks need sh and bash")

_HOOK = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "shell": {"type": "string", "enum": ["sh", "pwsh"]},
        "run": {"type": "string", "minLength": 1},
        "continueOnError": {"type": "boolean"},
        "interactive": {"type": "boolean"},
        "windows": {"$ref": "#/definitions/hook"},
        "posix": {"$ref": "#/definitions/hook"},
    },
}
HOOK_EVENTS = ["preprovision", "postprovision", "preup", "postup", "predeploy", "postdeploy", "prepackage",
               "postpackage", "prerestore", "postrestore", "predown", "postdown"]
AZURE_YAML_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "definitions": {"hook": _HOOK},
    "properties": {
        "name": {"type": "string", "minLength": 2, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "metadata": {"type": "object", "properties": {"template": {"type": "string"}}},
        "infra": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"provider": {"type": "string", "enum": ["bicep", "terraform"]},
                           "path": {"type": "string"}, "module": {"type": "string"}},
        },
        "services": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["host", "project"],
                "properties": {
                    "project": {"type": "string"},
                    "language": {"type": "string", "enum": ["dotnet", "csharp", "fsharp", "py", "python", "js", "ts",
                                                            "java", "go", "golang", "docker"]},
                    "host": {"type": "string", "enum": ["appservice", "containerapp", "function", "springapp",
                                                        "staticwebapp", "aks"]},
                    "hooks": {"type": "object", "additionalProperties": False,
                              "properties": {e: {"$ref": "#/definitions/hook"} for e in HOOK_EVENTS}},
                },
            },
        },
        "hooks": {"type": "object", "additionalProperties": False,
                  "properties": {e: {"$ref": "#/definitions/hook"} for e in HOOK_EVENTS}},
    },
}


@pytest.fixture(scope="module")
def azure_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))


# ------------------------------------------------------------------ azure.yaml


def test_azure_yaml_fits_the_schema(azure_yaml):
    jsonschema.Draft201909Validator.check_schema(AZURE_YAML_SCHEMA)
    jsonschema.Draft201909Validator(AZURE_YAML_SCHEMA).validate(azure_yaml)
    # The schema rejects what azd rejects, so the check above means something.
    for broken in ({**azure_yaml, "name": "HVE_relay"}, {**azure_yaml, "hooks": {"postprovision": {"posix": {"shell": "bash", "run": "x"}}}},
                   {**azure_yaml, "hooks": {"afterprovision": {"run": "x"}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft201909Validator(AZURE_YAML_SCHEMA).validate(broken)


def test_azure_yaml_describes_this_project(azure_yaml):
    assert azure_yaml["name"] == "hve-relay"
    assert azure_yaml["services"] == {"relay": {"project": ".", "language": "python", "host": "function"}}
    infra = azure_yaml["infra"]
    assert (INFRA.name, "main") == (infra["path"], infra["module"])
    assert (ROOT / infra["path"] / f"{infra['module']}.bicep").is_file()
    assert (ROOT / infra["path"] / f"{infra['module']}.bicepparam").is_file()
    assert set(azure_yaml["hooks"]) == {"preprovision", "postprovision", "postdeploy"}
    for event, hook in azure_yaml["hooks"].items():
        posix = hook["posix"]
        assert posix["shell"] == "sh"
        script = ROOT / posix["run"]
        assert script.is_file() and os.access(script, os.X_OK), f"{event}: {posix['run']}"
        subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
        assert "infra/deploy.sh" in script.read_text(encoding="utf-8") or "deploy.sh" in script.read_text(encoding="utf-8")
    assert azure_yaml["hooks"]["postprovision"]["posix"]["interactive"] is True, "a missing password is asked for"


def test_the_templates_carry_the_tags_azd_looks_for(azure_yaml):
    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    assert re.search(r"'azd-env-name':\s*environmentName\b", main), "every resource tagged with the azd environment"
    app = (INFRA / "modules" / "functionapp.bicep").read_text(encoding="utf-8")
    [service] = azure_yaml["services"]
    assert re.search(rf"'azd-service-name':\s*'{service}'", app), "azd finds the app by azd-service-name"
    params = (INFRA / "main.bicepparam").read_text(encoding="utf-8")
    assert "readEnvironmentVariable('AZURE_ENV_NAME'" in params, "environmentName is azd's environment name"


# ------------------------------------------------------------------ main.bicepparam <-> main.parameters.json

_PARAM = re.compile(r"^param\s+(\w+)\s*=\s*(.+)$", re.MULTILINE)
_FORMS = [
    (re.compile(r"^readEnvironmentVariable\('(\w+)', '(.*)'\)$"), lambda v: v),
    (re.compile(r"^split\(readEnvironmentVariable\('(\w+)', '(.*)'\), ','\)$"), lambda v: v.split(",")),
    (re.compile(r"^bool\(readEnvironmentVariable\('(\w+)', '(true|false)'\)\)$"), lambda v: v == "true"),
    (re.compile(r"^int\(readEnvironmentVariable\('(\w+)', '(-?\d+)'\)\)$"), int),
    (re.compile(r"^json\(readEnvironmentVariable\('(\w+)', '(.*)'\)\)$"), json.loads),
]


def bicepparam() -> dict[str, tuple[str, Any]]:
    """main.bicepparam: parameter -> (environment variable, default value)."""
    text = (INFRA / "main.bicepparam").read_text(encoding="utf-8")
    assert re.search(r"^using '\./main\.bicep'$", text, re.MULTILINE)
    found = {}
    for name, expr in _PARAM.findall(text):
        for form, convert in _FORMS:
            m = form.match(expr.strip())
            if m:
                found[name] = (m.group(1), convert(m.group(2)))
                break
        else:
            pytest.fail(f"main.bicepparam: {name} = {expr} is not one of the forms this test reads")
    return found


def test_bicepparam_and_parameters_json_set_the_same_parameters_to_the_same_defaults():
    given = {k: v["value"] for k, v in json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"].items()}
    azd = bicepparam()
    assert sorted(azd) == sorted(given), "main.bicepparam and main.parameters.json must list the same parameters"
    for name, (_, default) in azd.items():
        assert default == given[name], f"{name}: main.bicepparam falls back to {default!r}, main.parameters.json has {given[name]!r}"
    variables = [var for var, _ in azd.values()]
    assert len(variables) == len(set(variables)), "one environment variable per parameter"
    main = (INFRA / "main.bicep").read_text(encoding="utf-8")
    for name in azd:
        assert re.search(rf"^param {name}\b", main, re.MULTILINE), f"main.bicep has no parameter {name}"
    assert azd["deployerPrincipalId"][0] == "AZURE_PRINCIPAL_ID", "azd's signed-in principal gets the deployer roles"
    # Outputs azd writes back into its environment read back as the same parameter value.
    assert azd["hveAccounts"][0] == "HVE_ACCOUNTS" and re.search(r"output HVE_ACCOUNTS string = join\(hveAccounts, ','\)", main)


# ------------------------------------------------------------------ the hooks, with the az stand-in


class Azd:
    """An azd environment after `azd provision`: the stand-in holds the deployed main.bicep (as azd
    deploys it, under a name of its own), the environment holds its outputs as azd exports them."""

    def __init__(self, folder: Path, scenario: dict[str, Any] | None = None, **parameters: Any):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.scenario = {"group": {"location": "swedencentral"}, **(scenario or {})}
        (folder / "bin").mkdir(exist_ok=True)
        self.server = AzStandInServer(folder, self.scenario).__enter__()
        self.server.write_client(folder / "bin")
        params = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
        values = {"environmentName": "relay-dev", "hveAccounts": ["hve-one@fabrikam.com", "HVE.Two@fabrikam.com"],
                  "hveInternalDomains": ["fabrikam.com"], "deployerPrincipalId": "11111111-1111-1111-1111-111111111111",
                  **parameters}
        for name, value in values.items():
            params["parameters"][name] = {"value": value}
        (folder / "azd.parameters.json").write_text(json.dumps(params), encoding="utf-8")
        rc, _, err = call(folder, self.scenario, ["deployment", "group", "create", "--resource-group", "rg-relay-dev",
                                                  "--name", "relay-dev-1765000000", "--template-file",
                                                  str(INFRA / "main.bicep"), "--parameters",
                                                  f"@{folder / 'azd.parameters.json'}"])
        assert rc == 0, err
        self.provisioned = self.calls()
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        outputs = state["deployments"]["main"]["properties"]["outputs"]
        self.env = {name: json.dumps(o["value"]) if isinstance(o["value"], bool) else str(o["value"])
                    for name, o in outputs.items()}
        self.env.update(AZURE_ENV_NAME="relay-dev", AZURE_RESOURCE_GROUP="rg-relay-dev", AZURE_LOCATION="swedencentral",
                        AZURE_SUBSCRIPTION_ID=SUBSCRIPTION_ID, AZURE_PRINCIPAL_ID="11111111-1111-1111-1111-111111111111")

    def calls(self) -> list[list[str]]:
        log = self.folder / "calls.jsonl"
        return [json.loads(line)["argv"] for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []

    def state(self) -> dict[str, Any]:
        return json.loads((self.folder / "state.json").read_text(encoding="utf-8"))

    def hook(self, event: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        """Run the hook of azure.yaml as azd does: its shell, the project root, the azd environment."""
        hook = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))["hooks"][event]["posix"]
        before = len(self.calls())
        full_env = {"PATH": f"{self.folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(self.folder),
                    "AZ_STANDIN_PORT": str(self.server.port), **FAST, **self.env, **(env or {})}
        result = subprocess.run([hook["shell"], hook["run"]], cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        return result, self.calls()[before:]

    def close(self) -> None:
        self.server.__exit__(None, None, None)


@pytest.fixture
def azd(tmp_path):
    made: list[Azd] = []

    def make(scenario: dict[str, Any] | None = None, **parameters: Any) -> Azd:
        made.append(Azd(tmp_path / f"azd{len(made)}", scenario, **parameters))
        return made[-1]

    yield make
    for env in made:
        env.close()


def words(argv: list[str], n: int) -> list[str]:
    return argv[:n]


def test_postprovision_runs_grants_secrets_and_references_through_first_run_failures(azd):
    env = azd({"keyvault_forbidden": 2, "graph_replication_failures": 2, "reference_status_on_create": "AccessToKeyVaultDenied",
               "reference_statuses_after_refresh": ["AccessToKeyVaultDenied", "Initialized"]},
              grantGraphUserReadAll=True)
    result, calls = env.hook("postprovision", PASSWORDS)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "outputs: from the environment (azd)" in out
    kinds = [" ".join(c[:3]) for c in calls]
    # Not azd's job twice: no main.bicep, no group, no deployment lookup, no code.
    assert not [c for c in calls if c[:3] == ["deployment", "group", "create"] and any(a.endswith("/main.bicep") for a in c)]
    assert not [c for c in calls if c[:2] in (["group", "create"], ["group", "show"]) or c[:3] == ["deployment", "group", "show"]]
    assert not [c for c in calls if c[:2] == ["functionapp", "deployment"]]
    graph = [c for c in calls if c[:3] == ["deployment", "group", "create"] and any(a.endswith("/graph.bicep") for a in c)]
    assert len(graph) == 3, "2 x 'Not a valid reference update', then the grant"
    assert "principalId=" + env.env["AZURE_MANAGED_IDENTITY_PRINCIPAL_ID"] in graph[-1]
    first_secret = kinds.index("keyvault secret set")
    refresh = [i for i, c in enumerate(calls) if c[0] == "rest" and c[c.index("--method") + 1] == "post"]
    assert refresh and refresh[0] > max(i for i, k in enumerate(kinds) if k == "keyvault secret set") > first_secret
    assert calls.index(graph[-1]) < first_secret, "grants, then secrets, then references"
    state = env.state()
    assert state["references"] == {"RECIPIENT_HASH_KEY": "Resolved"}
    assert state["secrets"][secret_name_for("hve-one@fabrikam.com")] == "pw-one s3cret!"
    assert len(state["secrets"]["recipient-hash-key"]) >= 40
    assert len(state["assignments"]) == 1
    logged = json.dumps(calls)
    for secret in state["secrets"].values():
        assert secret not in logged and secret not in out
    # A second `azd provision`: nothing granted twice, secrets kept, references checked again.
    again, calls = env.hook("postprovision")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "User.Read.All: already granted" in again.stdout
    assert not [c for c in calls if c[:3] == ["keyvault", "secret", "set"]]
    assert [c for c in calls if c[0] == "rest" and c[c.index("--method") + 1] == "post"]


def test_preprovision_checks_the_tools_and_the_subscription_only(azd):
    env = azd()
    result, calls = env.hook("preprovision")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c[:2] for c in calls] == [["version", "--query"], ["bicep", "version"], ["account", "show"]]
    other = {**env.env, "AZURE_SUBSCRIPTION_ID": "99999999-9999-9999-9999-999999999999"}
    refused, calls = env.hook("preprovision", other)
    assert refused.returncode != 0
    assert "az account set --subscription 99999999-9999-9999-9999-999999999999" in refused.stderr
    # Before azd knows its resource group (first run) the tools check needs none.
    first = {k: v for k, v in env.env.items() if k != "AZURE_RESOURCE_GROUP"}
    env.env = first
    result, _ = env.hook("preprovision")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_postprovision_in_another_subscription_changes_nothing(azd):
    env = azd()
    result, calls = env.hook("postprovision", {**PASSWORDS, "AZURE_SUBSCRIPTION_ID": "99999999-9999-9999-9999-999999999999"})
    assert result.returncode != 0
    assert not [c for c in calls if c[:2] in (["keyvault", "secret"], ["deployment", "group"]) or c[0] == "rest"]


def test_postdeploy_prints_the_next_steps_and_changes_nothing(azd):
    env = azd()
    result, calls = env.hook("postdeploy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert env.env["AZURE_FUNCTION_APP_URL"] in result.stdout and "az storage message put" in result.stdout
    assert "you@fabrikam.com" in result.stdout
    changes = [c for c in calls if c[:2] in (["keyvault", "secret"], ["functionapp", "deployment"]) or c[0] == "rest"
               or c[:3] == ["deployment", "group", "create"]]
    assert not changes, changes


def test_steps_outside_azd_read_the_outputs_of_the_deployment(azd):
    """`deploy.sh --step references` by hand (no azd environment): the outputs of the deployment --name."""
    env = azd()
    plain = {k: v for k, v in env.env.items() if k not in ("AZURE_FUNCTION_APP_NAME",)}
    state = env.state()
    state["main_name"] = "hve-relay"  # as if infra/deploy.sh had deployed it
    (env.folder / "state.json").write_text(json.dumps(state), encoding="utf-8")
    full_env = {"PATH": f"{env.folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(env.folder),
                "AZ_STANDIN_PORT": str(env.server.port), **FAST}
    result = subprocess.run(["bash", str(INFRA / "deploy.sh"), "-g", plain["AZURE_RESOURCE_GROUP"], "--step", "references"],
                            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    calls = env.calls()[len(env.provisioned):]
    assert [c for c in calls if c[:3] == ["deployment", "group", "show"]], "outputs from the deployment"
    # The hash key secret does not exist: the references never resolve, and the step says so.
    assert result.returncode != 0 and "SecretNotFound" in result.stderr
    assert not [c for c in calls if c[:3] == ["keyvault", "secret", "set"]], "only the step asked for"


def test_unknown_steps_and_what_if_with_steps_are_refused():
    for args in (["--step", "deploy"], ["--step", "secrets", "--what-if"]):
        result = subprocess.run(["bash", str(INFRA / "deploy.sh"), "-g", "rg", *args], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL, env={"PATH": os.environ["PATH"], "HOME": "/tmp"})
        assert result.returncode != 0
        assert "unknown step" in result.stderr or "one or the other" in result.stderr
