"""infra/deploy.sh end to end, without Azure: the script runs unchanged against a recording `az`
stand-in (tools/az_standin.py) on PATH that answers from fixtures (tests/az_fixtures/), including
the failures a first deployment meets: an old Bicep, the Key Vault role not yet applied, the Graph
grant's "Not a valid reference update" (Entra replication), Key Vault references cached as
unresolved, 403 AuthorizationPermissionMismatch on publish.

The script runs from a throwaway git clone of this repository's files (plus a stray untracked
file, an ignored one and tracked files that are not the app), so the package's file list is
checked against what git tracks. All waits are 0 s (DEPLOY_*_WAIT), so every test takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from shared.hve.credentials import secret_name_for
from tools.az_standin import AzStandInServer, fake_jwt

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "az_fixtures"
ALLOWLIST = ("function_app.py", "host.json", "requirements.txt", "shared/")
PASSWORDS = {"HVE_PASSWORD_HVE_ONE_FABRIKAM_COM": "pw-one s3cret!", "HVE_PASSWORD_HVE_TWO_FABRIKAM_COM": "pw-two s3cret!"}
FAST = {"DEPLOY_KV_WAIT": "0", "DEPLOY_GRAPH_WAIT": "0", "DEPLOY_REFS_WAIT": "0", "DEPLOY_PUBLISH_WAIT": "0",
        "DEPLOY_KV_TRIES": "10", "DEPLOY_GRAPH_TRIES": "10", "DEPLOY_REFS_TRIES": "10", "DEPLOY_PUBLISH_TRIES": "10"}

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("bash", "git", "zip")), reason="deploy.sh needs bash, git and zip")


# ------------------------------------------------------------------ harness

_SERVERS: list[AzStandInServer] = []


@pytest.fixture(autouse=True)
def _stop_standins():
    yield
    while _SERVERS:
        _SERVERS.pop().__exit__(None, None, None)



@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git clone of the repository's tracked files (working-tree content), plus files git does
    not track that must never reach the package."""
    dest = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=dest, check=True)
    # Untracked and ignored files in and around the allowlisted paths.
    (dest / "shared" / "stray_notes.py").write_text("TOKEN = 'not for the package'\n", encoding="utf-8")
    (dest / "shared" / "__pycache__").mkdir(exist_ok=True)
    (dest / "shared" / "__pycache__" / "settings.cpython-311.pyc").write_bytes(b"\0")
    (dest / "local.settings.json").write_text("{}", encoding="utf-8")
    (dest / ".env").write_text("SECRET=1\n", encoding="utf-8")
    return dest


def tracked_app_files(repo: Path) -> set[str]:
    out = subprocess.run(["git", "ls-files", "--", *ALLOWLIST], cwd=repo, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@dataclass
class Run:
    result: subprocess.CompletedProcess
    calls: list[list[str]]  # every az call of this run, argv
    state: dict[str, Any]  # the stand-in's model after the run
    folder: Path

    @property
    def out(self) -> str:
        return self.result.stdout + self.result.stderr

    def index(self, predicate: Callable[[list[str]], bool], what: str) -> int:
        found = [i for i, argv in enumerate(self.calls) if predicate(argv)]
        assert found, f"no az call {what}:\n" + "\n".join(" ".join(c) for c in self.calls)
        return found[0]

    def count(self, predicate: Callable[[list[str]], bool]) -> int:
        return sum(1 for argv in self.calls if predicate(argv))

    def package(self) -> set[str]:
        return set(zipfile.ZipFile(self.folder / "package.zip").namelist())


class Deployer:
    """Runs <repo>/infra/deploy.sh with the az stand-in first on PATH; one Azure per instance.
    The stand-in serves from this process (AzStandInServer); `az` is its bash client."""

    def __init__(self, repo: Path, folder: Path, scenario: dict[str, Any] | str = "first_deployment.json"):
        self.repo, self.folder = repo, folder
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(scenario, str):
            scenario = json.loads((FIXTURES / scenario).read_text(encoding="utf-8"))
        bindir = folder / "bin"
        bindir.mkdir(exist_ok=True)
        self.server = AzStandInServer(folder, scenario).__enter__()
        _SERVERS.append(self.server)
        self.server.write_client(bindir)
        params = json.loads((repo / "infra" / "main.parameters.json").read_text(encoding="utf-8"))
        params["parameters"]["hveAccounts"]["value"] = ["hve-one@fabrikam.com", "HVE.Two@fabrikam.com"]
        params["parameters"]["hveInternalDomains"]["value"] = ["fabrikam.com"]
        params["parameters"]["hveSenderName"]["value"] = "Fabrikam"
        self.params = folder / "params.json"
        self.params.write_text(json.dumps(params, indent=2), encoding="utf-8")

    def run(self, *args: str, env: dict[str, str] | None = None, group: str = "rg-relay",
            params: Path | None = None) -> Run:
        log = self.folder / "calls.jsonl"
        before = len(log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0
        full_env = {
            "PATH": f"{self.folder / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.folder),
            "AZ_STANDIN_PORT": str(self.server.port),
            **FAST,
            **(env or {}),
        }
        command = ["bash", str(self.repo / "infra" / "deploy.sh"), "-g", group, "-p", str(params or self.params), *args]
        result = subprocess.run(command, cwd=self.repo, env=full_env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        calls = [json.loads(line)["argv"] for line in lines[before:]]
        unknown = [json.loads(line) for line in lines[before:] if json.loads(line)["rc"] == 2]
        assert not unknown, f"deploy.sh made az calls the stand-in does not know: {unknown}"
        state_file = self.folder / "state.json"
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.exists() else {}
        return Run(result, calls, state, self.folder)


def cmd(*words: str) -> Callable[[list[str]], bool]:
    """An az call that starts with these command words."""
    return lambda argv: argv[: len(words)] == list(words)


def deploys(template: str) -> Callable[[list[str]], bool]:
    return lambda argv: argv[:3] == ["deployment", "group", "create"] and \
        any(a.endswith("/" + template) for a in argv) and "--what-if" not in argv


def rest(method: str, path_end: str) -> Callable[[list[str]], bool]:
    def match(argv: list[str]) -> bool:
        if argv[:1] != ["rest"]:
            return False
        uri = argv[argv.index("--uri") + 1].split("?")[0]
        return argv[argv.index("--method") + 1].lower() == method and uri.endswith(path_end)
    return match


REFRESH = rest("post", "/config/configreferences/appsettings/refresh")
REFERENCES = rest("get", "/config/configreferences/appsettings")


def parameter(argv: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return values[-1] if values else None


def assert_no_secret_leaves(run: Run, *secrets: str) -> None:
    logged = json.dumps(run.calls)
    for secret in secrets:
        assert secret, "an empty secret proves nothing"
        assert secret not in logged, "a secret is on an az command line"
        assert secret not in run.out, "a secret is in the script's output"


# ------------------------------------------------------------------ the first deployment


def test_first_deployment_from_an_empty_group_gets_through_every_first_run_failure(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure")
    run = deployer.run("-l", "swedencentral", "--set", "grantGraphUserReadAll=true", env=PASSWORDS)
    assert run.result.returncode == 0, run.out

    # Order of the steps: tools, login, group, infrastructure, grants, secrets, references, code.
    steps = [
        run.index(cmd("version"), "az version"),
        run.index(cmd("bicep", "upgrade"), "az bicep upgrade (0.30.4 < 0.36.1)"),
        run.index(cmd("account", "show"), "az account show"),
        run.index(cmd("group", "create"), "az group create"),
        run.index(deploys("main.bicep"), "deploying main.bicep"),
        run.index(deploys("graph.bicep"), "deploying graph.bicep"),
        run.index(cmd("keyvault", "secret", "set"), "writing a secret"),
        run.index(REFRESH, "refreshing the Key Vault references"),
        run.index(REFERENCES, "reading the Key Vault references"),
        run.index(cmd("functionapp", "deployment", "source", "config-zip"), "publishing the code"),
    ]
    assert steps == sorted(steps), "\n".join(" ".join(c) for c in run.calls)
    last_secret = max(i for i, argv in enumerate(run.calls) if cmd("keyvault", "secret", "set")(argv))
    assert last_secret < steps[7], "the references are refreshed after the last secret is written"
    assert run.count(cmd("bicep", "version")) == 2, "the version is checked again after the upgrade"

    # Retries: exactly as many as the fixture's failures, each failure named in the output.
    assert run.count(deploys("graph.bicep")) == 3, "2 x 'Not a valid reference update', then the grant"
    assert run.out.count("Not a valid reference update") == 2
    assert run.count(deploys("main.bicep")) == 1, "the main template is not redeployed to retry the grant"
    assert run.count(cmd("functionapp", "deployment", "source", "config-zip")) == 3, "2 x 403, then published"
    assert run.state["published"] == 1
    assert run.count(REFERENCES) == 4, "AccessToKeyVaultDenied, Initialized, Initialized, Resolved"
    assert run.count(REFRESH) == 2, "refreshed once, and again after a failed (not merely pending) status"
    assert "waiting for the Key Vault role assignment" in run.out

    # The outcome: the grant exists, every reference resolved, the secrets named by the app's rule.
    state = run.state
    assert [a["appRoleId"] for a in state["assignments"]] == ["df021288-bdef-4463-88db-98f22de89214"]
    assert state["references"] == {"RECIPIENT_HASH_KEY": "Resolved"}
    assert "resolved: RECIPIENT_HASH_KEY" in run.out
    secrets = state["secrets"]
    assert secrets[secret_name_for("hve-one@fabrikam.com")] == "pw-one s3cret!"
    assert secrets[secret_name_for("HVE.Two@fabrikam.com")] == "pw-two s3cret!"
    assert len(secrets["recipient-hash-key"]) >= 40, "a generated recipient hash key"

    # No secret in any az argument or in the output (passwords, the hash key).
    assert_no_secret_leaves(run, *secrets.values())

    # Main deployment: region given, deployer from the token's oid claim.
    main = run.calls[steps[4]]
    assert parameter(main, "location") == "swedencentral"
    assert parameter(main, "deployerPrincipalId") == "11111111-1111-1111-1111-111111111111"
    assert parameter(main, "deployerPrincipalType") == "User"
    graph = run.calls[steps[5]]
    assert parameter(graph, "principalId") == state["deployments"]["main"]["principal"]
    assert parameter(graph, "grantUserReadAll") == "true" and parameter(graph, "grantExchangeMailSend") == "false"

    # The package: exactly the tracked allowlist (function_app.py, host.json, requirements.txt, shared/).
    names = run.package()
    assert names == tracked_app_files(repo)
    assert {"function_app.py", "host.json", "requirements.txt", "shared/settings.py",
            "shared/welcome/templates/welcome.html", "shared/schema/mail-request.v1.json"} <= names
    assert "shared/stray_notes.py" not in names and not [n for n in names if "__pycache__" in n]
    assert not [n for n in names if n.startswith(("tests/", "infra/", "tools/", "bench/")) or "local.settings" in n]
    assert "left out (not tracked by git): shared/stray_notes.py" in run.out
    zip_call = run.calls[steps[9]]
    assert zip_call[zip_call.index("--build-remote") + 1] == "true"

    assert "az storage message put" in run.out and "you@fabrikam.com" in run.out


def test_a_rerun_without_location_changes_nothing_and_still_refreshes_the_references(repo, tmp_path):
    # The group exists in westeurope; the relay goes to swedencentral.
    scenario = json.loads((FIXTURES / "first_deployment.json").read_text(encoding="utf-8"))
    deployer = Deployer(repo, tmp_path / "azure", {**scenario, "group": {"location": "westeurope"}})
    first = deployer.run("-l", "swedencentral", "--set", "grantGraphUserReadAll=true", env=PASSWORDS)
    assert first.result.returncode == 0, first.out
    resources = list(first.state["resources"])
    assert {r["location"] for r in resources} == {"swedencentral"}

    # No -l, --skip-secrets: same region (same names), no second grant, references still checked.
    second = deployer.run("--skip-secrets", "--set", "grantGraphUserReadAll=true")
    assert second.result.returncode == 0, second.out
    assert parameter(second.calls[second.index(deploys("main.bicep"), "main.bicep")], "location") == "swedencentral"
    assert second.state["resources"] == resources, "a second set of resources was created"
    assert second.count(deploys("graph.bicep")) == 0 and "User.Read.All: already granted" in second.out
    assert len(second.state["assignments"]) == 1
    assert second.count(REFRESH) >= 1 and second.count(REFERENCES) >= 1, "--skip-secrets skips the refresh"
    assert second.index(REFERENCES, "references") < second.index(
        cmd("functionapp", "deployment", "source", "config-zip"), "publish")
    assert not second.count(cmd("keyvault", "secret", "set"))

    # Another region for the same relay is refused before anything changes.
    third = deployer.run("-l", "northeurope", "--skip-secrets")
    assert third.result.returncode != 0
    assert "deployed in swedencentral" in third.result.stderr
    assert not third.count(cmd("deployment", "group", "create"))
    assert third.state["resources"] == resources


def test_a_redeploy_of_an_existing_grant_is_skipped_not_conflicted(repo, tmp_path):
    """#161: deploying an app-role assignment that exists can fail with a conflict; the script
    deploys only the grants that are missing."""
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    sets = ("--set", "grantGraphUserReadAll=true", "--set", "grantExchangeMailSend=true", "--set", "hveAuth=oauth")
    first = deployer.run("--skip-app", *sets)
    assert first.result.returncode == 0, first.out
    graph = first.calls[first.index(deploys("graph.bicep"), "graph.bicep")]
    assert parameter(graph, "grantUserReadAll") == "true" and parameter(graph, "grantExchangeMailSend") == "true"
    assert len(first.state["assignments"]) == 2

    again = deployer.run("--skip-app", *sets)
    assert again.result.returncode == 0, again.out
    assert again.count(deploys("graph.bicep")) == 0
    assert "User.Read.All: already granted" in again.out and "Mail.Send: already granted" in again.out
    assert len(again.state["assignments"]) == 2


def test_the_message_trace_grant_is_deployed_once_with_the_tenant_prerequisite_in_the_next_steps(repo, tmp_path):
    """Delivery confirmation: ExchangeMessageTrace.Read.All through graph.bicep, and the
    service principal 8bd644d1-... named in the next steps."""
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    first = deployer.run("--skip-app", "--set", "grantGraphMessageTrace=true", env=PASSWORDS)
    assert first.result.returncode == 0, first.out
    graph = first.calls[first.index(deploys("graph.bicep"), "graph.bicep")]
    assert parameter(graph, "grantMessageTraceRead") == "true" and parameter(graph, "grantUserReadAll") == "false"
    assert len(first.state["assignments"]) == 1
    assert "New-MgServicePrincipal -AppId 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373" in first.out
    again = deployer.run("--skip-app", "--skip-secrets", "--set", "grantGraphMessageTrace=true")
    assert again.count(deploys("graph.bicep")) == 0 and "ExchangeMessageTrace.Read.All: already granted" in again.out


# ------------------------------------------------------------------ bounded waits, clear messages


def test_references_that_never_resolve_stop_with_a_clear_message(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"},
                                                   "reference_never_resolves": True})
    run = deployer.run(env={**PASSWORDS, "DEPLOY_REFS_TRIES": "3"})
    assert run.result.returncode != 0
    assert run.count(REFERENCES) == 3
    err = run.result.stderr
    assert "still unresolved after 3 checks: RECIPIENT_HASH_KEY=Initialized" in err
    assert "Key Vault Secrets User" in err and "configreferences/appsettings/refresh" in err
    assert not run.count(cmd("functionapp", "deployment", "source", "config-zip")), "no code before the references resolve"


def test_the_references_are_refreshed_not_only_polled(repo, tmp_path):
    """Without the refresh the cache keeps the failure of the first resolution (before the secret
    existed) for about a day: polling alone never sees Resolved."""
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    run = deployer.run("--skip-app", env=PASSWORDS)
    assert run.result.returncode == 0, run.out
    refresh = run.index(REFRESH, "refresh")
    assert refresh > max(i for i, argv in enumerate(run.calls) if cmd("keyvault", "secret", "set")(argv))
    assert run.state["references"] == {"RECIPIENT_HASH_KEY": "Resolved"}
    uri = run.calls[refresh][run.calls[refresh].index("--uri") + 1]
    app = run.state["deployments"]["main"]["app"]
    assert uri.startswith(f"/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-relay/providers/"
                          f"Microsoft.Web/sites/{app}/config/configreferences/appsettings/refresh?api-version=")


def test_the_graph_grant_retries_only_the_replication_error_and_only_so_often(repo, tmp_path):
    stubborn = Deployer(repo, tmp_path / "stubborn", {"group": {"location": "swedencentral"},
                                                      "graph_replication_failures": 99})
    run = stubborn.run("--skip-app", "--set", "grantGraphUserReadAll=true", env={**PASSWORDS, "DEPLOY_GRAPH_TRIES": "4"})
    assert run.result.returncode != 0
    assert run.count(deploys("graph.bicep")) == 4
    assert "run this again in a few minutes" in run.result.stderr
    assert not run.count(cmd("keyvault", "secret", "set")), "stops at the failed step"

    denied = Deployer(repo, tmp_path / "denied", {
        "group": {"location": "swedencentral"},
        "graph_deploy_error": "ERROR: Authorization_RequestDenied: Insufficient privileges to complete the operation."})
    run = denied.run("--skip-app", "--set", "grantGraphUserReadAll=true", env=PASSWORDS)
    assert run.result.returncode != 0
    assert run.count(deploys("graph.bicep")) == 1, "another error is not retried"
    assert "Insufficient privileges" in run.result.stderr and "Privileged Role Administrator" in run.result.stderr


def test_publish_retries_403_for_a_bounded_time(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}, "publish_forbidden": 99})
    run = deployer.run(env={**PASSWORDS, "DEPLOY_PUBLISH_TRIES": "3"})
    assert run.result.returncode != 0
    assert run.count(cmd("functionapp", "deployment", "source", "config-zip")) == 3
    assert "AuthorizationPermissionMismatch" in run.result.stderr and "Storage Blob Data Owner" in run.result.stderr


# ------------------------------------------------------------------ tools and login


def test_old_tools_stop_the_script_before_anything_changes(repo, tmp_path):
    old_az = Deployer(repo, tmp_path / "az", {"az_version": "2.59.1"}).run(env=PASSWORDS)
    assert old_az.result.returncode != 0
    assert "Azure CLI 2.59.1 found, 2.60.0 or later needed" in old_az.result.stderr
    assert old_az.calls == [["version", "--query", '"azure-cli"', "-o", "tsv"]]

    old_bicep = Deployer(repo, tmp_path / "bicep", {"bicep_version": "0.30.4", "bicep_after_upgrade": "0.36.0"})
    run = old_bicep.run(env=PASSWORDS)
    assert run.result.returncode != 0
    assert "Bicep 0.36.0 found after 'az bicep upgrade', 0.36.1 or later needed" in run.result.stderr
    assert [c[:2] for c in run.calls] == [["version", "--query"], ["bicep", "version"], ["bicep", "upgrade"],
                                          ["bicep", "version"]]

    no_bicep = Deployer(repo, tmp_path / "none", {"bicep_version": None, "bicep_after_upgrade": "0.36.1",
                                                  "group": {"location": "swedencentral"}})
    run = no_bicep.run("--skip-app", env=PASSWORDS)
    assert run.result.returncode == 0, run.out
    assert run.count(cmd("bicep", "install")) == 1 and "bicep 0.36.1" in run.out


def test_a_managed_identity_login_finds_its_object_id_in_the_token(repo, tmp_path):
    identity = {"type": "servicePrincipal", "name": "systemAssignedIdentity", "assignedIdentityInfo": "MSI",
                "oid": "33333333-3333-3333-3333-333333333333"}
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}, "login": identity})
    run = deployer.run("--skip-app", env=PASSWORDS)
    assert run.result.returncode == 0, run.out
    main = run.calls[run.index(deploys("main.bicep"), "main.bicep")]
    assert parameter(main, "deployerPrincipalId") == identity["oid"]
    assert parameter(main, "deployerPrincipalType") == "ServicePrincipal"
    assert run.state["deployments"]["main"]["deployer"] == identity["oid"]
    assert_no_secret_leaves(run, fake_jwt(identity["oid"]), fake_jwt(identity["oid"]).split(".")[1])

    given = deployer.run("--skip-app", "--deployer-object-id", "44444444-4444-4444-4444-444444444444")
    assert given.result.returncode == 0, given.out
    main = given.calls[given.index(deploys("main.bicep"), "main.bicep")]
    assert parameter(main, "deployerPrincipalId") == "44444444-4444-4444-4444-444444444444"
    assert not given.count(cmd("account", "get-access-token"))


def test_what_if_says_graph_grants_are_not_previewed_and_changes_nothing(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    plain = deployer.run("--what-if")
    assert plain.result.returncode == 0, plain.out
    assert "does not preview Microsoft Graph" not in plain.out

    granted = deployer.run("--what-if", "--set", "grantGraphUserReadAll=true")
    assert granted.result.returncode == 0, granted.out
    assert "what-if does not preview Microsoft Graph resources" in granted.out
    params = json.loads(deployer.params.read_text(encoding="utf-8"))
    params["parameters"]["grantExchangeMailSend"]["value"] = True
    in_file = deployer.folder / "grant.json"
    in_file.write_text(json.dumps(params, indent=4), encoding="utf-8")
    from_file = deployer.run("--what-if", params=in_file)
    assert "what-if does not preview Microsoft Graph resources" in from_file.out
    for run in (plain, granted, from_file):
        assert any(c[:3] == ["deployment", "group", "create"] and "--what-if" in c for c in run.calls)
        changes = [c for c in run.calls if (c[:3] == ["deployment", "group", "create"] and "--what-if" not in c)
                   or c[:2] in (["group", "create"], ["keyvault", "secret"], ["rest"])
                   or c[:2] == ["functionapp", "deployment"]]
        assert not changes, changes


# ------------------------------------------------------------------ secrets (moved from test_infra.py)


def test_existing_secrets_are_kept_and_a_missing_password_is_not_guessed(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    first = deployer.run("--skip-app", env={"HVE_PASSWORD_HVE_ONE_FABRIKAM_COM": "one"})
    # No password for the second account, no terminal: a clear error; what was written stays.
    assert first.result.returncode != 0 and "HVE_PASSWORD_HVE_TWO_FABRIKAM_COM" in first.result.stderr
    hash_key = first.state["secrets"]["recipient-hash-key"]

    second = deployer.run("--skip-app", env={"HVE_PASSWORD_HVE_TWO_FABRIKAM_COM": "two"})
    assert second.result.returncode == 0, second.out
    written = [c[c.index("--name") + 1] for c in second.calls if cmd("keyvault", "secret", "set")(c)]
    assert written == [secret_name_for("hve.two@fabrikam.com")], "existing secrets (the hash key above all) are kept"
    assert second.state["secrets"]["recipient-hash-key"] == hash_key
    assert second.count(cmd("functionapp", "restart")) == 1, "--skip-app with a new secret restarts the app"


def test_two_accounts_sharing_a_password_variable_are_refused(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    params = json.loads(deployer.params.read_text(encoding="utf-8"))
    params["parameters"]["hveAccounts"]["value"] = ["a.b@fabrikam.com", "a-b@fabrikam.com"]
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps(params), encoding="utf-8")
    run = deployer.run("--skip-app", params=shared, env={"HVE_PASSWORD_A_B_FABRIKAM_COM": "pw"})
    assert run.result.returncode != 0 and "HVE_PASSWORD_A_B_FABRIKAM_COM" in run.result.stderr
    assert not run.count(cmd("keyvault", "secret", "set"))


def test_oauth_needs_no_passwords(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    run = deployer.run("--skip-app", "--set", "hveAuth=oauth")
    assert run.result.returncode == 0, run.out
    assert list(run.state["secrets"]) == ["recipient-hash-key"]
    principal = run.state["deployments"]["main"]["principal"]
    assert "Add-HVEAppAccess" in run.out and principal in run.out


def test_the_example_parameters_are_refused(repo, tmp_path):
    deployer = Deployer(repo, tmp_path / "azure", {"group": {"location": "swedencentral"}})
    run = deployer.run(params=repo / "infra" / "main.parameters.json")
    assert run.result.returncode != 0 and "contoso" in run.result.stderr
    assert not run.count(cmd("deployment", "group", "create"))
