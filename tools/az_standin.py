"""A recording stand-in for the Azure CLI (`az`), to run infra/deploy.sh end to end without Azure.

It answers the commands deploy.sh uses with the JSON shapes Azure returns, applies `--query`
with JMESPath (the library az itself uses) and formats `-o json|tsv|none` like az, so the
script's real queries are exercised. It keeps a small model of the resource group between
calls and runs (a state file): the group and its region, the main deployment's resources and
outputs, the Key Vault secrets, the Key Vault reference cache of the app, the Entra app-role
assignments, the last code package. Failures come from a fixture (a scenario file, JSON):

    {
      "az_version": "2.67.0",              "bicep_version": "0.30.4",   "bicep_after_upgrade": "0.38.5",
      "login": {"type": "user" | "servicePrincipal", "name": "...", "oid": "<object id>"},
      "group": {"location": "westeurope"} | null,            (null: the group does not exist yet)
      "keyvault_forbidden": 2,             the first N Key Vault calls answer Forbidden (role not yet applied)
      "reference_status_on_create": "AccessToKeyVaultDenied",   cached when the app settings are written
      "reference_statuses_after_refresh": ["Initialized", "Initialized"],   then Resolved / SecretNotFound
      "reference_never_resolves": false,
      "graph_principal_not_found": 1,      the first N Graph reads of the new identity answer 404
      "graph_replication_failures": 2,     the first N graph.bicep deployments fail "Not a valid reference update"
      "graph_conflict_on_existing": true,  deploying a grant that exists fails with a conflict (#161)
      "graph_deploy_error": null,          any other graph.bicep failure (text), every time
      "publish_forbidden": 2               the first N config-zip calls fail with 403 AuthorizationPermissionMismatch
    }

Environment: AZ_STANDIN_DIR (state.json, calls.jsonl, package.zip), AZ_STANDIN_SCENARIO (the
fixture). Every call is appended to calls.jsonl: {"argv": [...], "rc": n}. A command the
stand-in does not know fails (rc 2, logged), so a test notices a new az call.

Two ways to put it on PATH as `az`:
- a two-line wrapper, `exec <python> tools/az_standin.py "$@"` (a Python start per call);
- `AzStandInServer` (tests): the stand-in runs in the test process on 127.0.0.1, and `az` is a
  small bash client (CLIENT below, bash's /dev/tcp) that forwards argv, and the content of a
  `--file` (secrets arrive through /dev/fd pipes only the client can read). About ten times
  cheaper per call, which keeps tests/test_deploy_script.py at seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

import jmespath

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000001"
TENANT_ID = "00000000-0000-0000-0000-0000000000aa"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
# Resource service principals and their app roles (object ids are per tenant; these are made up).
SERVICE_PRINCIPALS = {
    GRAPH_APP_ID: {"id": "aaaaaaaa-0000-0000-0000-000000000003", "appRoles": [
        {"value": "User.Read.All", "id": "df021288-bdef-4463-88db-98f22de89214"},
        {"value": "ExchangeMessageTrace.Read.All", "id": "e3b3ab26-5a4c-4b6f-9d0a-1f3a7f0c2d11"},
        {"value": "Mail.Send", "id": "b633e1c5-b582-4048-a93e-9f11b44c7e96"}]},
    EXCHANGE_APP_ID: {"id": "aaaaaaaa-0000-0000-0000-000000000002", "appRoles": [
        {"value": "Mail.Send", "id": "b633e1c5-b582-4048-a93e-9f11b44c7e96"},
        {"value": "full_access_as_app", "id": "dc890d15-9560-4a4c-9b7f-a736ec74ec40"}]},
}
KV_REFERENCE_SETTINGS = {"RECIPIENT_HASH_KEY": "recipient-hash-key"}

DEFAULT_SCENARIO: dict[str, Any] = {
    "az_version": "2.67.0",
    "bicep_version": "0.38.5",
    "bicep_after_upgrade": "0.38.5",
    "login": {"type": "user", "name": "ops@fabrikam.com", "oid": "11111111-1111-1111-1111-111111111111"},
    "group": {"location": "swedencentral"},
    "keyvault_forbidden": 0,
    "reference_status_on_create": None,
    "reference_statuses_after_refresh": [],
    "reference_never_resolves": False,
    "graph_principal_not_found": 0,
    "graph_replication_failures": 0,
    "graph_conflict_on_existing": True,
    "graph_deploy_error": None,
    "publish_forbidden": 0,
}

REPLICATION_ERROR = (
    "ERROR: {\"status\":\"Failed\",\"error\":{\"code\":\"DeploymentFailed\",\"message\":\"At least one resource "
    "deployment operation failed.\",\"details\":[{\"code\":\"BadRequest\",\"target\":\"userReadAll\",\"message\":"
    "\"Not a valid reference update. Graph client request id: 5c1e0d0e-7d9a-4c55-9d0b-1f2e3d4c5b6a.\"}]}}"
)
CONFLICT_ERROR = (
    "ERROR: {\"status\":\"Failed\",\"error\":{\"code\":\"DeploymentFailed\",\"details\":[{\"code\":\"Conflict\","
    "\"message\":\"Permission being assigned already exists on the object.\"}]}}"
)
PUBLISH_FORBIDDEN_ERROR = (
    "ERROR: Status Code: 403, Details: This request is not authorized to perform this operation using this "
    "permission. RequestId:3f2a ErrorCode:AuthorizationPermissionMismatch"
)


class AzError(Exception):
    def __init__(self, message: str, rc: int = 1):
        super().__init__(message)
        self.message = message
        self.rc = rc


# ------------------------------------------------------------------ arguments

ALIASES = {"-g": "--resource-group", "-n": "--name", "-o": "--output", "-f": "--template-file",
           "-p": "--parameters", "-l": "--location"}


def parse(argv: list[str]) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """az's shape: command words, then options, each with zero or more values."""
    words: list[str] = []
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        words.append(argv[i])
        i += 1
    options: dict[str, list[str]] = {}
    current: list[str] | None = None
    for arg in argv[i:]:
        if arg.startswith("-") and not arg.lstrip("-")[:1].isdigit():
            current = options.setdefault(ALIASES.get(arg, arg), [])
            continue
        if current is None:
            raise AzError(f"unrecognized arguments: {arg}", 2)
        current.append(arg)
    return tuple(words), options


def one(options: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = options.get(name)
    return values[-1] if values else default


# ------------------------------------------------------------------ output


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def to_tsv(value: Any) -> str:
    """az's tsv: a list is one row per item; an object or list item is a row of tab-separated cells."""
    if value is None:
        return ""
    rows = value if isinstance(value, list) else [value]
    lines = []
    for row in rows:
        if isinstance(row, dict):
            cells = [_cell(v) for v in row.values() if not isinstance(v, (dict, list))]
        elif isinstance(row, list):
            cells = [_cell(v) for v in row]
        else:
            cells = [_cell(row)]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def render(result: Any, options: dict[str, list[str]]) -> str:
    if isinstance(result, Text):
        return str(result)
    query = one(options, "--query")
    if query is not None:
        result = jmespath.search(query, result)
    fmt = one(options, "--output", "json")
    if fmt == "none" or result is None:
        return ""
    if fmt == "tsv":
        return to_tsv(result)
    if fmt == "table":
        return json.dumps(result) + "\n"
    return json.dumps(result, indent=2) + "\n"


class Text(str):
    """Plain text output (commands that do not print JSON)."""


# ------------------------------------------------------------------ the model


class StandIn:
    def __init__(self, folder: Path, scenario: dict[str, Any], files: dict[str, str] | None = None):
        self.folder = folder
        self.files = files or {}  # path -> content of files the caller could read and we cannot
        self.scenario = {**DEFAULT_SCENARIO, **scenario}
        self.state_file = folder / "state.json"
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text(encoding="utf-8"))
        else:
            group = self.scenario["group"]
            self.state = {
                "bicep_version": self.scenario["bicep_version"],
                "groups": {} if group is None else {"*": group},
                "resources": [],
                "deployments": {},
                "secrets": {},
                "references": {},
                "refreshes": 0,
                # Statuses the reference check shows after the first refresh (consumed once).
                "after_refresh": list(self.scenario["reference_statuses_after_refresh"]),
                "assignments": [],
                "counters": {k: self.scenario[k] for k in (
                    "keyvault_forbidden", "graph_principal_not_found", "graph_replication_failures",
                    "publish_forbidden")},
            }

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=1), encoding="utf-8")

    def take(self, counter: str) -> bool:
        """One of the first N failures of `counter` is due."""
        if self.state["counters"].get(counter, 0) > 0:
            self.state["counters"][counter] -= 1
            return True
        return False

    # -------------------------------------------------------------- helpers

    def group(self, name: str) -> dict[str, Any]:
        groups = self.state["groups"]
        if name not in groups and "*" in groups:  # the fixture's pre-existing group takes the first name asked
            groups[name] = groups.pop("*")
        if name not in groups:
            raise AzError(f"ERROR: (ResourceGroupNotFound) Resource group '{name}' could not be found.", 3)
        return groups[name]

    def login(self) -> dict[str, Any]:
        login = self.scenario["login"]
        if login is None:
            raise AzError("ERROR: Please run 'az login' to setup account.", 1)
        return login

    def app(self) -> dict[str, Any]:
        deployment = self.state["deployments"].get("main")
        if not deployment:
            raise AzError("ERROR: (ResourceNotFound) The Resource 'Microsoft.Web/sites' was not found.", 3)
        return deployment

    # -------------------------------------------------------------- commands

    def run(self, words: tuple[str, ...], options: dict[str, list[str]]) -> Any:
        handler = {
            ("version",): self.version,
            ("bicep", "version"): self.bicep_version,
            ("bicep", "install"): self.bicep_upgrade,
            ("bicep", "upgrade"): self.bicep_upgrade,
            ("account", "show"): self.account_show,
            ("account", "get-access-token"): self.access_token,
            ("ad", "signed-in-user", "show"): self.signed_in_user,
            ("ad", "sp", "show"): self.sp_show,
            ("group", "show"): self.group_show,
            ("group", "create"): self.group_create,
            ("resource", "list"): self.resource_list,
            ("deployment", "group", "create"): self.deployment_create,
            ("deployment", "group", "show"): self.deployment_show,
            ("keyvault", "secret", "show"): self.secret_show,
            ("keyvault", "secret", "set"): self.secret_set,
            ("rest",): self.rest,
            ("functionapp", "deployment", "source", "config-zip"): self.publish,
            ("functionapp", "restart"): lambda o: None,
            ("functionapp", "function", "list"): self.function_list,
        }.get(words)
        if handler is None:
            raise AzError(f"az stand-in: no answer for `az {' '.join(words)}`", 2)
        return handler(options)

    def version(self, options):
        return {"azure-cli": self.scenario["az_version"], "azure-cli-core": self.scenario["az_version"],
                "azure-cli-telemetry": "1.1.0", "extensions": {}}

    def bicep_version(self, options):
        version = self.state["bicep_version"]
        if not version:
            raise AzError('WARNING: Bicep CLI not found. Install it now by running "az bicep install".', 1)
        return Text(f"Bicep CLI version {version} (a727ed087a)\n")

    def bicep_upgrade(self, options):
        self.state["bicep_version"] = self.scenario["bicep_after_upgrade"]
        return None

    def account_show(self, options):
        login = self.login()
        user = {"name": login["name"], "type": login["type"]}
        if login.get("assignedIdentityInfo"):
            user["assignedIdentityInfo"] = login["assignedIdentityInfo"]
        return {"environmentName": "AzureCloud", "id": SUBSCRIPTION_ID, "isDefault": True,
                "name": "Fabrikam relay", "state": "Enabled", "tenantId": TENANT_ID, "user": user}

    def access_token(self, options):
        login = self.login()
        return {"accessToken": fake_jwt(login["oid"]), "expiresOn": "2026-12-02 05:00:00.000000",
                "subscription": SUBSCRIPTION_ID, "tenant": TENANT_ID, "tokenType": "Bearer"}

    def signed_in_user(self, options):
        login = self.login()
        if login["type"] != "user":
            raise AzError("ERROR: /me request is only valid with delegated authentication flow.", 1)
        return {"id": login["oid"], "userPrincipalName": login["name"]}

    def sp_show(self, options):
        app_id = one(options, "--id")
        if app_id in SERVICE_PRINCIPALS:
            sp = SERVICE_PRINCIPALS[app_id]
            return {"appId": app_id, "id": sp["id"], "appRoles": sp["appRoles"]}
        login = self.login()
        if app_id == login["name"] and not login.get("assignedIdentityInfo"):
            return {"appId": app_id, "id": login["oid"]}
        raise AzError(f"ERROR: Service principal '{app_id}' doesn't exist", 3)

    def group_show(self, options):
        name = one(options, "--name")
        group = self.group(name)
        return {"id": f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{name}", "location": group["location"],
                "name": name, "properties": {"provisioningState": "Succeeded"}, "tags": group.get("tags", {})}

    def group_create(self, options):
        name = one(options, "--name")
        self.state["groups"].pop("*", None)
        self.state["groups"][name] = {"location": one(options, "--location"), "created_by_script": True}
        return self.group_show({"--name": [name]})

    def resource_list(self, options):
        self.group(one(options, "--resource-group"))
        return self.state["resources"]

    # -------------------------------------------------------------- deployments

    def _parameters(self, options: dict[str, list[str]]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for value in options.get("--parameters", []):
            if value.startswith("@"):
                doc = json.loads(Path(value[1:]).read_text(encoding="utf-8"))
                params.update({k: v["value"] for k, v in doc["parameters"].items()})
            else:
                key, _, raw = value.partition("=")
                try:
                    params[key] = json.loads(raw)
                except ValueError:
                    params[key] = raw
        return params

    def deployment_create(self, options):
        group_name = one(options, "--resource-group")
        group = self.group(group_name)
        template = Path(one(options, "--template-file") or "").name
        params = self._parameters(options)
        if "--what-if" in options:
            return Text("Resource and property changes are indicated with these symbols:\n  + Create\n")
        if template == "main.bicep":
            self.state["main_name"] = one(options, "--name")
            return self._deploy_main(group_name, group, params)
        if template == "graph.bicep":
            return self._deploy_graph(params)
        raise AzError(f"az stand-in: unknown template {template}", 2)

    def _deploy_main(self, group_name: str, group: dict[str, Any], params: dict[str, Any]):
        location = params.get("location") or group["location"]
        env = params["environmentName"]
        token = hashlib.sha256(f"{SUBSCRIPTION_ID}|{group_name}|{env}|{location}".encode()).hexdigest()[:13]
        tags = {"application": "hve-relay", "azd-env-name": env}
        names = {kind: f"{prefix}{token}" for kind, prefix in
                 (("app", "func-"), ("kv", "kv-"), ("st", "st"), ("id", "id-"), ("plan", "plan-"))}
        for kind, rtype in (("id", "Microsoft.ManagedIdentity/userAssignedIdentities"), ("st", "Microsoft.Storage/storageAccounts"),
                            ("kv", "Microsoft.KeyVault/vaults"), ("plan", "Microsoft.Web/serverfarms"), ("app", "Microsoft.Web/sites")):
            resource = {"name": names[kind], "type": rtype, "location": location, "tags": tags}
            if resource not in self.state["resources"]:
                self.state["resources"].append(resource)
        principal = "22222222-2222-2222-2222-" + token[:12]
        accounts = params["hveAccounts"]
        outputs = {
            "AZURE_LOCATION": location,
            "AZURE_FUNCTION_APP_NAME": names["app"],
            "AZURE_FUNCTION_APP_URL": f"https://{names['app']}.azurewebsites.net",
            "AZURE_STORAGE_ACCOUNT_NAME": names["st"],
            "AZURE_KEY_VAULT_NAME": names["kv"],
            "AZURE_MANAGED_IDENTITY_PRINCIPAL_ID": principal,
            "MAIL_QUEUE": "outbound-mail",
            "MAIL_QUEUE_URL": f"https://{names['st']}.queue.core.windows.net/outbound-mail",
            "MAIL_QUEUE_PRIORITY": "outbound-mail-priority",
            "HVE_ACCOUNTS": ",".join(accounts),
            "HVE_AUTH": params.get("hveAuth", "basic"),
            "HVE_INTERNAL_DOMAINS": ",".join(params["hveInternalDomains"]),
            "RECIPIENT_HASH_KEY_SECRET_NAME": "recipient-hash-key",
            "GRAPH_USER_READ_ALL_GRANTED": bool(params.get("grantGraphUserReadAll", False)),
            "WELCOME_ENABLED": bool(params.get("welcomeEnabled", False)),
            "EXCHANGE_MAIL_SEND_GRANTED": bool(params.get("grantExchangeMailSend", False)),
            "GRAPH_MESSAGE_TRACE_GRANTED": bool(params.get("grantGraphMessageTrace", False)),
        }
        self.state["deployments"]["main"] = {
            "name": "main", "principal": principal, "vault": names["kv"], "app": names["app"],
            "group": group_name, "deployer": params.get("deployerPrincipalId"),
            "properties": {"provisioningState": "Succeeded",
                           "outputs": {k: {"type": "Bool" if isinstance(v, bool) else "String", "value": v}
                                       for k, v in outputs.items()}},
        }
        # Writing the app settings makes App Service resolve the references now and cache the result.
        for setting, secret in KV_REFERENCE_SETTINGS.items():
            status = "Resolved" if secret in self.state["secrets"] else "SecretNotFound"
            if self.scenario["reference_status_on_create"] and not self.state["references"]:
                status = self.scenario["reference_status_on_create"]
            self.state["references"][setting] = status
        self.state["refreshed"] = False
        return {"name": "main", "properties": {"provisioningState": "Succeeded"}}

    def _deploy_graph(self, params: dict[str, Any]):
        main = self.app()
        if params.get("principalId") != main["principal"]:
            raise AzError("ERROR: graph.bicep: principalId is not the app identity", 1)
        if self.scenario["graph_deploy_error"]:
            raise AzError(self.scenario["graph_deploy_error"], 1)
        if self.take("graph_replication_failures"):
            raise AzError(REPLICATION_ERROR, 1)
        wanted = []
        if params.get("grantUserReadAll", True):
            wanted.append((GRAPH_APP_ID, "User.Read.All"))
        if params.get("grantExchangeMailSend", False):
            wanted.append((EXCHANGE_APP_ID, "Mail.Send"))
        if params.get("grantMessageTraceRead", False):
            wanted.append((GRAPH_APP_ID, "ExchangeMessageTrace.Read.All"))
        for app_id, role in wanted:
            sp = SERVICE_PRINCIPALS[app_id]
            role_id = next(r["id"] for r in sp["appRoles"] if r["value"] == role)
            assignment = {"principalId": main["principal"], "resourceId": sp["id"], "appRoleId": role_id}
            if assignment in self.state["assignments"]:
                if self.scenario["graph_conflict_on_existing"]:
                    raise AzError(CONFLICT_ERROR, 1)
                continue
            self.state["assignments"].append(assignment)
        return {"name": "graph", "properties": {"provisioningState": "Succeeded"}}

    def deployment_show(self, options):
        group = one(options, "--resource-group")
        name = one(options, "--name")
        deployment = self.state["deployments"].get("main")
        if not deployment or deployment["group"] != group or name != self.state.get("main_name", name):
            raise AzError(f"ERROR: (DeploymentNotFound) Deployment '{name}' could not be found.", 3)
        return {"name": name, "properties": deployment["properties"]}

    # -------------------------------------------------------------- Key Vault

    def _vault(self, options):
        vault = one(options, "--vault-name")
        if vault != self.app()["vault"]:
            raise AzError(f"ERROR: Failed to resolve '{vault}.vault.azure.net'", 1)
        if self.take("keyvault_forbidden"):
            raise AzError("ERROR: (Forbidden) Caller is not authorized to perform action on resource.\n"
                          "Code: Forbidden\nInner error: {\"code\": \"ForbiddenByRbac\"}", 1)

    def secret_show(self, options):
        self._vault(options)
        name = one(options, "--name")
        if name not in self.state["secrets"]:
            raise AzError(f"ERROR: (SecretNotFound) A secret with (name/id) {name} was not found in this key vault.", 3)
        return {"id": f"https://{one(options, '--vault-name')}.vault.azure.net/secrets/{name}/1", "name": name}

    def secret_set(self, options):
        self._vault(options)
        if "--value" in options:
            raise AzError("az stand-in: a secret value on the command line", 2)
        name = one(options, "--name")
        path = one(options, "--file")
        value = self.files[path] if path in self.files else Path(path).read_text(encoding="utf-8")
        self.state["secrets"][name] = value
        return None

    # -------------------------------------------------------------- az rest

    def rest(self, options):
        method = (one(options, "--method", "get") or "get").lower()
        uri = one(options, "--uri") or ""
        path = uri.split("?", 1)[0]
        if path.startswith("/subscriptions/") and path.endswith("/config/configreferences/appsettings/refresh") \
                and method == "post":
            self._check_site(path)
            self.state["refreshes"] += 1
            self.state["refreshed"] = True
            # A refresh reads the vault as it is now; a secret written later needs another refresh.
            self.state["refreshed_secrets"] = sorted(self.state["secrets"])
            return None
        if path.startswith("/subscriptions/") and path.endswith("/config/configreferences/appsettings") \
                and method == "get":
            self._check_site(path)
            return {"value": [self._reference(setting, secret) for setting, secret in KV_REFERENCE_SETTINGS.items()]}
        prefix = "https://graph.microsoft.com/v1.0/servicePrincipals/"
        if path.startswith(prefix) and path.endswith("/appRoleAssignments") and method == "get":
            principal = path[len(prefix):].split("/")[0]
            if principal != self.app()["principal"] or self.take("graph_principal_not_found"):
                raise AzError("ERROR: Not Found({\"error\":{\"code\":\"Request_ResourceNotFound\",\"message\":"
                              f"\"Resource '{principal}' does not exist or one of its queried reference-property "
                              "objects are not present.\"}})", 1)
            return {"value": [{**a, "id": "x"} for a in self.state["assignments"] if a["principalId"] == principal]}
        raise AzError(f"az stand-in: no answer for az rest --method {method} --uri {uri}", 2)

    def _check_site(self, path: str) -> None:
        main = self.app()
        expected = (f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{main['group']}/providers/"
                    f"Microsoft.Web/sites/{main['app']}/config/configreferences/appsettings")
        if not path.startswith(expected):
            raise AzError(f"ERROR: (ResourceNotFound) {path}", 3)

    def _reference(self, setting: str, secret: str) -> dict[str, Any]:
        if self.state.get("refreshed"):
            if self.scenario["reference_never_resolves"]:
                status = "Initialized"
            elif self.state["after_refresh"]:
                status = self.state["after_refresh"].pop(0)
            else:
                status = "Resolved" if secret in self.state["refreshed_secrets"] else "SecretNotFound"
            self.state["references"][setting] = status
        status = self.state["references"][setting]
        main = self.app()
        return {"id": f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{main['group']}/providers/Microsoft.Web/"
                      f"sites/{main['app']}/config/configreferences/appsettings/{setting}",
                "name": setting, "type": "Microsoft.Web/sites/config/configreferences",
                "properties": {"reference": f"@Microsoft.KeyVault(VaultName={main['vault']};SecretName={secret})",
                               "status": status, "vaultName": main["vault"], "secretName": secret,
                               "identityType": "UserAssigned", "source": "KeyVault",
                               "details": "" if status == "Resolved" else f"status {status}"}}

    # -------------------------------------------------------------- code

    def publish(self, options):
        main = self.app()
        if one(options, "--name") != main["app"]:
            raise AzError(f"ERROR: (ResourceNotFound) {one(options, '--name')}", 3)
        if self.take("publish_forbidden"):
            raise AzError(PUBLISH_FORBIDDEN_ERROR, 1)
        shutil.copyfile(one(options, "--src"), self.folder / "package.zip")
        self.state["published"] = self.state.get("published", 0) + 1
        return None

    def function_list(self, options):
        main = self.app()
        return [{"name": f"{main['app']}/send_mail", "invokeUrlTemplate": None},
                {"name": f"{main['app']}/status", "invokeUrlTemplate": f"https://{main['app']}.azurewebsites.net/api/status"}]


def fake_jwt(oid: str) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")
    payload = {"aud": "https://management.core.windows.net/", "iss": f"https://sts.windows.net/{TENANT_ID}/",
               "oid": oid, "tid": TENANT_ID, "sub": "stand-in"}
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


def call(folder: Path, scenario: dict[str, Any], argv: list[str], files: dict[str, str] | None = None) -> tuple[int, str, str]:
    """One az call: (exit code, stdout, stderr); logged to calls.jsonl, state saved."""
    standin = StandIn(folder, scenario, files)
    rc, out, err = 0, "", ""
    try:
        words, options = parse(argv)
        out = render(standin.run(words, options), options)
    except AzError as exc:
        err, rc = exc.message + "\n", exc.rc
    finally:
        standin.save()
        with open(folder / "calls.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"argv": argv, "rc": rc}) + "\n")
    return rc, out, err


def main(argv: list[str]) -> int:
    folder = Path(os.environ["AZ_STANDIN_DIR"])
    scenario_path = os.environ.get("AZ_STANDIN_SCENARIO")
    scenario = json.loads(Path(scenario_path).read_text(encoding="utf-8")) if scenario_path else {}
    rc, out, err = call(folder, scenario, argv)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return rc


# ------------------------------------------------------------------ server mode

# The `az` the tests put on PATH. Request: the argument count, a newline, each argument
# NUL-terminated, then (when there is a --file) the file's content NUL-terminated. Answer:
# stdout NUL, stderr NUL, exit code newline.
CLIENT = r"""#!/usr/bin/env bash
exec 3<>"/dev/tcp/127.0.0.1/${AZ_STANDIN_PORT:?}" || exit 90
file="" prev=""
for arg in "$@"; do
  if [[ "$prev" == "--file" ]]; then file="$arg"; fi
  prev="$arg"
done
{
  printf '%s\n' "$#"
  printf '%s\0' "$@"
  if [[ -n "$file" ]]; then content=""; IFS= read -r -d '' content <"$file" || true; printf '%s\0' "$content"; fi
} >&3
IFS= read -r -d '' out <&3 || exit 91
IFS= read -r -d '' err <&3 || exit 92
IFS= read -r rc <&3 || exit 93
printf '%s' "$out"
printf '%s' "$err" >&2
exit "$rc"
"""


class AzStandInServer:
    """The stand-in on 127.0.0.1 (a free port) for the `az` client CLIENT; state in `folder`."""

    def __init__(self, folder: Path, scenario: dict[str, Any]):
        self.folder, self.scenario = folder, scenario
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                count = int(self.rfile.readline())
                argv = [self._field() for _ in range(count)]
                files = {}
                if "--file" in argv[:-1]:
                    files[argv[argv.index("--file") + 1]] = self._field()
                with outer._lock:
                    rc, out, err = call(outer.folder, outer.scenario, argv, files)
                self.wfile.write(out.encode() + b"\0" + err.encode() + b"\0" + f"{rc}\n".encode())

            def _field(self) -> str:
                data = bytearray()
                while (byte := self.rfile.read(1)) not in (b"\0", b""):
                    data += byte
                return data.decode()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # A short poll so shutdown() returns at once (the default 0.5 s adds up over many tests).
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def write_client(self, bindir: Path) -> Path:
        path = bindir / "az"
        path.write_text(CLIENT, encoding="utf-8")
        path.chmod(0o755)
        return path

    def __enter__(self) -> "AzStandInServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
