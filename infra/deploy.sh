#!/usr/bin/env bash
# Deploy hve-relay to Azure: infrastructure (infra/main.bicep), the optional Entra app-role grants
# (infra/modules/graph.bicep, a second deployment), secrets (Key Vault) and code (Flex
# Consumption). Needs only the Azure CLI (az), plus zip and git to package the code.
# Runs on bash 3.2+ (macOS), Linux, WSL and Azure Cloud Shell. See infra/README.md
# ("First deployment" lists every step, what it waits for and what to do when it times out).
#
#   infra/deploy.sh --resource-group rg-hve-relay --location swedencentral
#
# azd (azure.yaml) provisions main.bicep itself and runs the other steps through its hooks
# (infra/hooks/), which call this script with --step: one code path for both.
#
# Secrets are never echoed, never put on a command line and never written to disk:
#   HVE account passwords (HVE_AUTH=basic): environment variable HVE_PASSWORD_<ADDRESS>, the
#     address upper-cased with every character other than A-Z and 0-9 replaced by "_"
#     (hve-notify@contoso.com -> HVE_PASSWORD_HVE_NOTIFY_CONTOSO_COM), else a hidden prompt.
#     Key Vault secret name: "hve-" + the address lower-cased with every character other than
#     a-z and 0-9 replaced by "-" (cut to 100 characters) + "-" + the first 10 hex digits of the
#     SHA-256 of the lower-cased address (the rule of shared/hve/credentials.py secret_name_for, which
#     tests/test_infra.py checks this script against).
#   Recipient hash key: generated once into the secret "recipient-hash-key" if absent (an
#     existing one is never replaced: ledger hashes depend on it); RECIPIENT_HASH_KEY in the
#     environment sets it explicitly, e.g. when moving a ledger.
#
# Waits (seconds between tries, most tries; the defaults suit Azure, tests set them to 0):
#   DEPLOY_KV_WAIT=10      DEPLOY_KV_TRIES=30       Key Vault role of the deployer   (~5 min)
#   DEPLOY_GRAPH_WAIT=30   DEPLOY_GRAPH_TRIES=10    Entra replication of the identity (~5 min)
#   DEPLOY_REFS_WAIT=10    DEPLOY_REFS_TRIES=60     Key Vault references resolved     (~10 min)
#   DEPLOY_PUBLISH_WAIT=30 DEPLOY_PUBLISH_TRIES=20  storage role of the app identity  (~10 min)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Oldest tools that work: the Microsoft Graph Bicep extension needs Bicep 0.36.1, the Flex
# Consumption commands (config-zip to the deployment container) az 2.60.
MIN_AZ_VERSION="2.60.0"
MIN_BICEP_VERSION="0.36.1"
# App Service API of the Key Vault reference endpoints (configreferences).
WEB_API_VERSION="2022-03-01"
MICROSOFT_GRAPH_APP_ID="00000003-0000-0000-c000-000000000000"
EXCHANGE_ONLINE_APP_ID="00000002-0000-0ff1-ce00-000000000000"

KV_WAIT="${DEPLOY_KV_WAIT:-10}"
KV_TRIES="${DEPLOY_KV_TRIES:-30}"
GRAPH_WAIT="${DEPLOY_GRAPH_WAIT:-30}"
GRAPH_TRIES="${DEPLOY_GRAPH_TRIES:-10}"
REFS_WAIT="${DEPLOY_REFS_WAIT:-10}"
REFS_TRIES="${DEPLOY_REFS_TRIES:-60}"
PUBLISH_WAIT="${DEPLOY_PUBLISH_WAIT:-30}"
PUBLISH_TRIES="${DEPLOY_PUBLISH_TRIES:-20}"

usage() {
  cat <<'EOF'
Usage: infra/deploy.sh --resource-group NAME [options]

  -g, --resource-group NAME  resource group to deploy into (created if missing);
                             default: $AZURE_RESOURCE_GROUP
  -l, --location REGION      Azure region (needed when the group is created; one that offers
                             Flex Consumption); default: $AZURE_LOCATION, else the region of
                             an earlier deployment in the group, else the group's
  -p, --parameters FILE      parameters file (default: infra/main.parameters.json)
      --set NAME=VALUE       override one template parameter (repeatable), e.g.
                             --set hveAuth=oauth  --set 'hveAccounts=["a@contoso.com"]'
  -n, --name NAME            deployment name (default: hve-relay)
      --what-if              show what the deployment would change, change nothing
      --skip-secrets         do not touch Key Vault secrets
      --skip-app             do not package and deploy the code
      --no-deployer-roles    do not grant the signed-in principal Key Vault Secrets Officer
                             and queue Message Sender
      --deployer-object-id ID  object id of the signed-in principal (default: the `oid` claim
                             of its access token; works for users, service principals and
                             managed identities)
      --step STEP            run only this step of an existing deployment (repeatable; in this
                             order whatever the order given): tools, grants, secrets,
                             references, code, summary. The outputs come from the environment
                             when azd provides them (AZURE_FUNCTION_APP_NAME set, the azd hooks),
                             else from the deployment --name. No group, no main.bicep.
  -h, --help                 this text

Passwords (HVE_AUTH=basic): HVE_PASSWORD_<ADDRESS> environment variables, else a prompt.
EOF
}

die() { printf 'deploy: error: %s\n' "$*" >&2; exit 1; }
say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }

RESOURCE_GROUP="${AZURE_RESOURCE_GROUP:-}"
LOCATION="${AZURE_LOCATION:-}"
PARAMETERS_FILE="$ROOT/infra/main.parameters.json"
DEPLOYMENT_NAME="hve-relay"
WHAT_IF=0
SKIP_SECRETS=0
SKIP_APP=0
DEPLOYER_ROLES=1
DEPLOYER_ID=""
OVERRIDES=()
STEPS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -g | --resource-group) [[ $# -ge 2 ]] || die "$1 needs a value"; RESOURCE_GROUP="$2"; shift 2 ;;
    -l | --location) [[ $# -ge 2 ]] || die "$1 needs a value"; LOCATION="$2"; shift 2 ;;
    -p | --parameters) [[ $# -ge 2 ]] || die "$1 needs a value"; PARAMETERS_FILE="$2"; shift 2 ;;
    -n | --name) [[ $# -ge 2 ]] || die "$1 needs a value"; DEPLOYMENT_NAME="$2"; shift 2 ;;
    --set) [[ $# -ge 2 ]] || die "$1 needs NAME=VALUE"; OVERRIDES+=("$2"); shift 2 ;;
    --what-if) WHAT_IF=1; shift ;;
    --skip-secrets) SKIP_SECRETS=1; shift ;;
    --skip-app) SKIP_APP=1; shift ;;
    --no-deployer-roles) DEPLOYER_ROLES=0; shift ;;
    --deployer-object-id) [[ $# -ge 2 ]] || die "$1 needs a value"; DEPLOYER_ID="$2"; shift 2 ;;
    --step)
      [[ $# -ge 2 ]] || die "$1 needs a step name"
      case "$2" in tools | grants | secrets | references | code | summary) ;; *) die "unknown step: $2 (tools, grants, secrets, references, code, summary)" ;; esac
      STEPS+=("$2"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

# want STEP: this run does STEP (every step without --step).
want() {
  local s
  [[ ${#STEPS[@]} -gt 0 ]] || return 0
  for s in ${STEPS[@]+"${STEPS[@]}"}; do [[ "$s" != "$1" ]] || return 0; done
  return 1
}
STEP_MODE=0
[[ ${#STEPS[@]} -eq 0 ]] || STEP_MODE=1

[[ -n "$RESOURCE_GROUP" || "${STEPS[*]-}" == "tools" ]] || { usage >&2; die "--resource-group is required"; }
[[ $STEP_MODE -eq 0 || $WHAT_IF -eq 0 ]] || die "--what-if previews main.bicep; --step runs steps of an existing deployment: use one or the other"
[[ $STEP_MODE -eq 1 || -f "$PARAMETERS_FILE" ]] || die "parameters file not found: $PARAMETERS_FILE"
command -v az >/dev/null 2>&1 || die "the Azure CLI (az) is not installed: https://aka.ms/azure-cli"
if [[ $WHAT_IF -eq 0 && $SKIP_APP -eq 0 ]] && want code; then
  command -v zip >/dev/null 2>&1 || die "zip is not installed (needed to package the code; or use --skip-app)"
  command -v git >/dev/null 2>&1 || die "git is not installed (needed to list the files to package; or use --skip-app)"
fi

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
upper() { printf '%s' "$1" | tr '[:lower:]' '[:upper:]'; }

# version_ge A B: dotted version A is at least B (the first three numbers count).
version_ge() {
  local IFS=. i x y
  local -a a b
  read -r -a a <<<"$1"
  read -r -a b <<<"$2"
  for i in 0 1 2; do
    x="${a[i]:-0}" y="${b[i]:-0}"
    x="${x//[^0-9]/}" y="${y//[^0-9]/}"
    x=$((10#${x:-0})) y=$((10#${y:-0}))
    if ((x > y)); then return 0; fi
    if ((x < y)); then return 1; fi
  done
  return 0
}

# param_value NAME: a scalar template parameter as this run passes it (--set, else the
# parameters file); empty when not given. Good enough for flags and names, not for objects.
param_value() {
  local name="$1" override value=""
  for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    if [[ "$override" == "$name="* ]]; then value="${override#*=}"; fi
  done
  if [[ -z "$value" ]]; then
    value="$(tr -d ' \t\r\n' <"$PARAMETERS_FILE" | sed -n "s/.*\"$name\":{\"value\":\([^,}]*\)}.*/\1/p" | tr -d '"')"
  fi
  printf '%s' "$value"
}

# with_retry WHAT TRIES WAIT REGEX COMMAND...: run COMMAND; while it fails with output matching
# the extended regular expression REGEX, wait WAIT seconds and run it again, TRIES times at most.
# Any other failure stops at once. The output is shown only when the command finally fails.
with_retry() {
  local what="$1" tries="$2" wait="$3" pattern="$4" attempt=1 out rc
  shift 4
  while :; do
    rc=0
    out="$("$@" 2>&1)" || rc=$?
    [[ $rc -ne 0 ]] || return 0
    if ! grep -Eq -- "$pattern" <<<"$out"; then
      printf '%s\n' "$out" >&2
      return "$rc"
    fi
    if [[ $attempt -ge $tries ]]; then
      printf '%s\n' "$out" >&2
      say "   $what: still failing after $tries tries"
      return "$rc"
    fi
    say "   $what: $(grep -Eo -- "$pattern" <<<"$out" | head -n 1 | tr -cd '[:alnum:] .'); try $((attempt + 1))/$tries in ${wait}s"
    sleep "$wait"
    attempt=$((attempt + 1))
  done
}

# ------------------------------------------------------------------ 1. tools and login
step "Tools"
AZ_VERSION="$(az version --query '"azure-cli"' -o tsv 2>/dev/null || true)"
[[ -n "$AZ_VERSION" ]] || die "cannot read the Azure CLI version ('az version' failed); az $MIN_AZ_VERSION or later is needed"
version_ge "$AZ_VERSION" "$MIN_AZ_VERSION" ||
  die "Azure CLI $AZ_VERSION found, $MIN_AZ_VERSION or later needed (Flex Consumption): run 'az upgrade', then run this again"
bicep_version() { az bicep version 2>/dev/null | sed -n -E 's/.*[Vv]ersion ([0-9]+\.[0-9]+\.[0-9]+).*/\1/p' | head -n 1; }
BICEP_VERSION="$(bicep_version || true)"
if [[ -z "$BICEP_VERSION" ]]; then
  say "Bicep CLI not installed: az bicep install"
  az bicep install --only-show-errors >/dev/null || die "az bicep install failed; install Bicep $MIN_BICEP_VERSION or later, then run this again"
  BICEP_VERSION="$(bicep_version || true)"
fi
if [[ -z "$BICEP_VERSION" ]] || ! version_ge "$BICEP_VERSION" "$MIN_BICEP_VERSION"; then
  say "Bicep ${BICEP_VERSION:-(none)} is older than $MIN_BICEP_VERSION (Microsoft Graph extension): az bicep upgrade"
  az bicep upgrade --only-show-errors >/dev/null || true
  found="${BICEP_VERSION:-none}"
  BICEP_VERSION="$(bicep_version || true)"
  if [[ -z "$BICEP_VERSION" ]] || ! version_ge "$BICEP_VERSION" "$MIN_BICEP_VERSION"; then
    die "Bicep ${BICEP_VERSION:-$found} found after 'az bicep upgrade', $MIN_BICEP_VERSION or later needed (with az config bicep.use_binary_from_path=true, upgrade the bicep on PATH); az $AZ_VERSION"
  fi
fi
say "az $AZ_VERSION, bicep $BICEP_VERSION"

if ! account="$(az account show --query '[name, id, user.type]' -o tsv 2>/dev/null)" || [[ -z "$account" ]]; then
  die "not logged in: run 'az login' (and 'az account set --subscription <id>'), then run this again"
fi
SUBSCRIPTION_NAME="$(sed -n 1p <<<"$account")"
SUBSCRIPTION_ID="$(sed -n 2p <<<"$account")"
LOGIN_TYPE="$(sed -n 3p <<<"$account")"
say "subscription: $SUBSCRIPTION_NAME $SUBSCRIPTION_ID"
# azd provisioned into AZURE_SUBSCRIPTION_ID; every az call below goes to az's own subscription.
if [[ $STEP_MODE -eq 1 && -n "${AZURE_SUBSCRIPTION_ID:-}" && "$(lower "$AZURE_SUBSCRIPTION_ID")" != "$(lower "$SUBSCRIPTION_ID")" ]]; then
  die "az is signed in to subscription $SUBSCRIPTION_ID, the azd environment is in $AZURE_SUBSCRIPTION_ID: run 'az account set --subscription $AZURE_SUBSCRIPTION_ID' (or 'az login'), then run this again"
fi
[[ "${STEPS[*]-}" != "tools" ]] || exit 0

# ------------------------------------------------------------------ 2-4: only without --step
if [[ $STEP_MODE -eq 0 ]]; then
if [[ $WHAT_IF -eq 0 ]] && grep -q 'contoso' "$PARAMETERS_FILE"; then
  die "$PARAMETERS_FILE still has the example contoso values: put your HVE accounts and domains in it (or pass --parameters FILE)"
fi
GRANT_GRAPH="$(lower "$(param_value grantGraphUserReadAll)")"
GRANT_EXCHANGE="$(lower "$(param_value grantExchangeMailSend)")"
GRANT_TRACE="$(lower "$(param_value grantGraphMessageTrace)")"
ENVIRONMENT_NAME="$(param_value environmentName)"

# ------------------------------------------------------------------ 2. resource group, location
step "Resource group $RESOURCE_GROUP"
normal_location() { lower "$1" | tr -d ' '; }
# The region is part of every resource name (main.bicep, resourceToken): a run in another region
# would build a second relay. Remember it from the last deployment, else from the resources.
previous_location() {
  local found query
  found="$(az deployment group show --resource-group "$RESOURCE_GROUP" --name "$DEPLOYMENT_NAME" \
    --query properties.outputs.AZURE_LOCATION.value -o tsv 2>/dev/null || true)"
  if [[ -z "$found" ]]; then
    query="[?tags.application=='hve-relay'"
    if [[ -n "$ENVIRONMENT_NAME" && "$ENVIRONMENT_NAME" != *"'"* ]]; then
      query="$query && tags.\"azd-env-name\"=='$ENVIRONMENT_NAME'"
    fi
    found="$(az resource list --resource-group "$RESOURCE_GROUP" --query "$query].location" -o tsv 2>/dev/null | sort -u || true)"
  fi
  [[ $(grep -c . <<<"$found" || true) -le 1 ]] ||
    die "hve-relay resources of environment '${ENVIRONMENT_NAME:-?}' are in several regions of $RESOURCE_GROUP ($(paste -sd ' ' - <<<"$found")): clean up the group first"
  printf '%s' "$found"
}
if GROUP_LOCATION="$(az group show --name "$RESOURCE_GROUP" --query location -o tsv 2>/dev/null)"; then
  PREVIOUS_LOCATION="$(previous_location)"
  if [[ -n "$PREVIOUS_LOCATION" ]]; then
    if [[ -n "$LOCATION" && "$(normal_location "$LOCATION")" != "$(normal_location "$PREVIOUS_LOCATION")" ]]; then
      die "this relay is deployed in $PREVIOUS_LOCATION; --location $LOCATION would build a second one. Omit --location (or pass $PREVIOUS_LOCATION); for a relay in another region use another resource group"
    fi
    LOCATION="$PREVIOUS_LOCATION"
    say "exists ($GROUP_LOCATION); the relay is in $LOCATION"
  else
    LOCATION="${LOCATION:-$GROUP_LOCATION}"
    say "exists ($GROUP_LOCATION); deploying to $LOCATION"
  fi
elif [[ $WHAT_IF -eq 1 ]]; then
  die "resource group $RESOURCE_GROUP does not exist; --what-if changes nothing, so create it first: az group create -n $RESOURCE_GROUP -l <region>"
else
  [[ -n "$LOCATION" ]] || die "resource group $RESOURCE_GROUP does not exist: pass --location to create it"
  az group create --name "$RESOURCE_GROUP" --location "$LOCATION" --tags application=hve-relay --output none
  say "created in $LOCATION"
fi

# ------------------------------------------------------------------ 3. deployer principal
# The object id comes from the `oid` claim of the signed-in principal's own token: no directory
# read needed, and it works for `az login --identity`, where Graph look-ups by name fail.
token_oid() {
  az account get-access-token --query accessToken -o tsv 2>/dev/null | cut -d. -f2 | tr '_-' '/+' |
    awk '{ n = length($0) % 4; if (n == 2) $0 = $0 "=="; else if (n == 3) $0 = $0 "="; print }' |
    base64 -d 2>/dev/null | sed -n 's/.*"oid"[[:space:]]*:[[:space:]]*"\([0-9a-fA-F-]*\)".*/\1/p' || true
}
DEPLOYER_TYPE=""
if [[ $DEPLOYER_ROLES -eq 1 ]]; then
  if [[ "$LOGIN_TYPE" == "user" ]]; then DEPLOYER_TYPE="User"; else DEPLOYER_TYPE="ServicePrincipal"; fi
  if [[ -z "$DEPLOYER_ID" ]]; then DEPLOYER_ID="$(token_oid)"; fi
  if [[ -z "$DEPLOYER_ID" && "$LOGIN_TYPE" == "user" ]]; then
    DEPLOYER_ID="$(az ad signed-in-user show --query id -o tsv 2>/dev/null || true)"
  fi
  if [[ -z "$DEPLOYER_ID" ]]; then
    say "warning: could not find the signed-in principal's object id (pass --deployer-object-id); no deployer roles are granted"
    say "         (the secrets step then needs Key Vault Secrets Officer on the vault from elsewhere)"
  else
    say "deployer: $DEPLOYER_TYPE $DEPLOYER_ID"
  fi
fi

# ------------------------------------------------------------------ 4. deployment
deploy_args=(
  --resource-group "$RESOURCE_GROUP"
  --name "$DEPLOYMENT_NAME"
  --template-file "$ROOT/infra/main.bicep"
  --parameters "@$PARAMETERS_FILE"
  --parameters "location=$LOCATION"
)
[[ -z "$DEPLOYER_ID" ]] || deploy_args+=(--parameters "deployerPrincipalId=$DEPLOYER_ID" "deployerPrincipalType=$DEPLOYER_TYPE")
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  deploy_args+=(--parameters "$override")
done

if [[ $WHAT_IF -eq 1 ]]; then
  step "What-if of infra/main.bicep (nothing is changed)"
  az deployment group create "${deploy_args[@]}" --what-if
  if [[ "$GRANT_GRAPH" == "true" || "$GRANT_EXCHANGE" == "true" || "$GRANT_TRACE" == "true" ]]; then
    say ""
    say "note: what-if does not preview Microsoft Graph resources: the app-role grants of"
    say "infra/modules/graph.bicep (grantGraphUserReadAll / grantExchangeMailSend / grantGraphMessageTrace) are not shown above."
    say "They are deployed as a second deployment, after the managed identity exists."
  fi
  exit 0
fi

step "Deploying infra/main.bicep (a few minutes)"
az deployment group create "${deploy_args[@]}" --query properties.provisioningState -o tsv
fi # STEP_MODE -eq 0

# The deployment's outputs: from azd's environment in its hooks (azd names its deployments
# itself and exports every output), else from the deployment.
if [[ $STEP_MODE -eq 1 && -n "${AZURE_FUNCTION_APP_NAME:-}" ]]; then
  say "outputs: from the environment (azd)"
  outputs="$(printf '%s\n' "${AZURE_FUNCTION_APP_NAME:-}" "${AZURE_FUNCTION_APP_URL:-}" "${AZURE_STORAGE_ACCOUNT_NAME:-}" \
    "${AZURE_KEY_VAULT_NAME:-}" "${AZURE_MANAGED_IDENTITY_PRINCIPAL_ID:-}" "${MAIL_QUEUE:-}" "${MAIL_QUEUE_URL:-}" \
    "${HVE_ACCOUNTS:-}" "${HVE_AUTH:-}" "${HVE_INTERNAL_DOMAINS:-}" "${RECIPIENT_HASH_KEY_SECRET_NAME:-}" \
    "${GRAPH_USER_READ_ALL_GRANTED:-false}" "${WELCOME_ENABLED:-false}" "${EXCHANGE_MAIL_SEND_GRANTED:-false}" \
    "${GRAPH_MESSAGE_TRACE_GRANTED:-false}")"
else
outputs="$(az deployment group show --resource-group "$RESOURCE_GROUP" --name "$DEPLOYMENT_NAME" --query '[
  properties.outputs.AZURE_FUNCTION_APP_NAME.value,
  properties.outputs.AZURE_FUNCTION_APP_URL.value,
  properties.outputs.AZURE_STORAGE_ACCOUNT_NAME.value,
  properties.outputs.AZURE_KEY_VAULT_NAME.value,
  properties.outputs.AZURE_MANAGED_IDENTITY_PRINCIPAL_ID.value,
  properties.outputs.MAIL_QUEUE.value,
  properties.outputs.MAIL_QUEUE_URL.value,
  properties.outputs.HVE_ACCOUNTS.value,
  properties.outputs.HVE_AUTH.value,
  properties.outputs.HVE_INTERNAL_DOMAINS.value,
  properties.outputs.RECIPIENT_HASH_KEY_SECRET_NAME.value,
  properties.outputs.GRAPH_USER_READ_ALL_GRANTED.value,
  properties.outputs.WELCOME_ENABLED.value,
  properties.outputs.EXCHANGE_MAIL_SEND_GRANTED.value,
  properties.outputs.GRAPH_MESSAGE_TRACE_GRANTED.value
]' -o tsv)"
fi
values=()
while IFS= read -r line; do values+=("$line"); done <<<"$outputs"
[[ ${#values[@]} -ge 15 ]] || die "unexpected deployment outputs; see: az deployment group show -g $RESOURCE_GROUP -n $DEPLOYMENT_NAME"
APP_NAME="${values[0]}"
APP_URL="${values[1]}"
STORAGE_ACCOUNT="${values[2]}"
KEY_VAULT="${values[3]}"
IDENTITY_PRINCIPAL_ID="${values[4]}"
MAIL_QUEUE="${values[5]}"
MAIL_QUEUE_URL="${values[6]}"
HVE_ACCOUNTS="${values[7]}"
HVE_AUTH="${values[8]}"
HVE_INTERNAL_DOMAINS="${values[9]}"
HASH_KEY_SECRET="${values[10]}"
GRAPH_GRANTED="$(lower "${values[11]}")"
WELCOME_ENABLED="${values[12]}"
EXCHANGE_GRANTED="$(lower "${values[13]}")"
TRACE_GRANTED="$(lower "${values[14]}")"
[[ -n "$APP_NAME" && -n "$KEY_VAULT" && -n "$IDENTITY_PRINCIPAL_ID" ]] ||
  die "the deployment has no outputs; see: az deployment group show -g $RESOURCE_GROUP -n $DEPLOYMENT_NAME"

# ------------------------------------------------------------------ 5. Entra app-role grants
# A second deployment, once the identity exists: in the same deployment Entra has not yet
# replicated the new service principal and the grant fails with "Not a valid reference update"
# (microsoftgraph/msgraph-bicep-types#193). A grant that exists is not deployed again (a
# redeploy can conflict, #161), so a rerun changes nothing.
if want grants && [[ "$GRAPH_GRANTED" == "true" || "$EXCHANGE_GRANTED" == "true" || "$TRACE_GRANTED" == "true" ]]; then
  step "Entra app-role grants for the app identity $IDENTITY_PRINCIPAL_ID (infra/modules/graph.bicep)"
  assigned="$(az rest --method get \
    --uri "https://graph.microsoft.com/v1.0/servicePrincipals/$IDENTITY_PRINCIPAL_ID/appRoleAssignments" \
    --query 'value[].[resourceId, appRoleId]' -o tsv 2>/dev/null || true)"
  # needs_grant API_APP_ID ROLE: succeeds when the identity does not hold ROLE of that API yet.
  needs_grant() {
    local ids sp role_id
    ids="$(az ad sp show --id "$1" --query "[id, appRoles[?value=='$2'].id | [0]]" -o tsv)" ||
      die "cannot read the service principal of $1 (needs Entra read rights)"
    sp="$(sed -n 1p <<<"$ids")" role_id="$(sed -n 2p <<<"$ids")"
    [[ -n "$sp" && -n "$role_id" ]] || die "no app role $2 on the service principal of $1"
    if grep -qxF "$sp"$'\t'"$role_id" <<<"$assigned"; then
      say "$2: already granted"
      return 1
    fi
    granting="$granting $2"
  }
  grant_user_read_all=false grant_mail_send=false grant_trace=false granting=""
  if [[ "$GRAPH_GRANTED" == "true" ]] && needs_grant "$MICROSOFT_GRAPH_APP_ID" User.Read.All; then
    grant_user_read_all=true
  fi
  if [[ "$EXCHANGE_GRANTED" == "true" ]] && needs_grant "$EXCHANGE_ONLINE_APP_ID" Mail.Send; then
    grant_mail_send=true
  fi
  if [[ "$TRACE_GRANTED" == "true" ]] && needs_grant "$MICROSOFT_GRAPH_APP_ID" ExchangeMessageTrace.Read.All; then
    grant_trace=true
  fi
  if [[ "$grant_user_read_all" == "true" || "$grant_mail_send" == "true" || "$grant_trace" == "true" ]]; then
    with_retry "grant (Entra replication of the new identity)" "$GRAPH_TRIES" "$GRAPH_WAIT" 'Not a valid reference update' \
      az deployment group create --resource-group "$RESOURCE_GROUP" --name "$DEPLOYMENT_NAME-graph" \
      --template-file "$ROOT/infra/modules/graph.bicep" \
      --parameters "principalId=$IDENTITY_PRINCIPAL_ID" "grantUserReadAll=$grant_user_read_all" \
      "grantExchangeMailSend=$grant_mail_send" "grantMessageTraceRead=$grant_trace" --output none ||
      die "the app-role grant failed (see above). 'Not a valid reference update' after every try: Entra has not replicated the identity yet, run this again in a few minutes. Authorization errors: the deployer needs Privileged Role Administrator (infra/README.md, 'Graph permission')"
    say "granted:$granting"
  fi
fi

# ------------------------------------------------------------------ 6. secrets
sha256_hex() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -c1-64; }
secret_name_for() { printf 'hve-%s-%s' "$(lower "$1" | sed 's/[^a-z0-9]/-/g' | cut -c1-100)" "$(lower "$1" | sha256_hex | cut -c1-10)"; }
env_name_for() { printf 'HVE_PASSWORD_%s' "$(upper "$1" | sed 's/[^A-Z0-9]/_/g')"; }

# Role assignments take a few minutes to reach Key Vault: retry "forbidden" (DEPLOY_KV_*).
retry_forbidden() {
  local attempt err
  for attempt in $(seq 1 "$KV_TRIES"); do
    if err="$("$@" 2>&1 >/dev/null)"; then
      return 0
    fi
    case "$err" in
      *SecretNotFound* | *"was not found"*) return 3 ;;
      *Forbidden* | *"not authorized"* | *"does not have secrets"*)
        [[ $attempt -eq 1 ]] && say "   waiting for the Key Vault role assignment to take effect..."
        sleep "$KV_WAIT" ;;
      *) printf '%s\n' "$err" >&2; return 1 ;;
    esac
  done
  printf '%s\n' "$err" >&2
  return 2
}

secret_exists() {
  local rc=0
  retry_forbidden az keyvault secret show --vault-name "$KEY_VAULT" --name "$1" --query id -o tsv || rc=$?
  case $rc in
    0) return 0 ;;
    3) return 1 ;;
    *) die "cannot read Key Vault $KEY_VAULT (need Key Vault Secrets Officer on it)" ;;
  esac
}

# put_secret NAME VALUE: the value reaches az through a pipe (/dev/fd), not argv or a file.
put_secret() {
  local name="$1" value="$2"
  set_secret_from_pipe() {
    az keyvault secret set --vault-name "$KEY_VAULT" --name "$name" --encoding utf-8 \
      --file <(printf '%s' "$value") --output none
  }
  retry_forbidden set_secret_from_pipe || die "cannot write secret $name to Key Vault $KEY_VAULT"
}

SECRETS_CHANGED=0
if [[ $SKIP_SECRETS -eq 0 ]] && want secrets; then
  step "Secrets in Key Vault $KEY_VAULT"
  if [[ "$HVE_AUTH" == "basic" ]]; then
    IFS=',' read -r -a accounts <<<"$HVE_ACCOUNTS"
    # Refuse what the app refuses at start-up (two accounts sharing a secret, an address that is
    # not ASCII) and one password variable naming two accounts (a.b@x and a-b@x).
    seen_names="" seen_vars=""
    for account in ${accounts[@]+"${accounts[@]}"}; do
      account="$(printf '%s' "$account" | tr -d '[:space:]')"
      [[ -n "$account" ]] || continue
      if printf '%s' "$account" | LC_ALL=C grep -q '[^ -~]'; then die "HVE account $account is not an ASCII address"; fi
      name="$(secret_name_for "$account")" var="$(env_name_for "$account")"
      if grep -qx "$name" <<<"$seen_names"; then die "two HVE accounts map to the Key Vault secret $name"; fi
      if [[ -n "${!var:-}" ]] && grep -qx "$var" <<<"$seen_vars"; then
        die "$var would set the password of two HVE accounts; unset it and type each password at the prompt"
      fi
      seen_names="$seen_names"$'\n'"$name" seen_vars="$seen_vars"$'\n'"$var"
    done
  fi
  if [[ -n "${RECIPIENT_HASH_KEY:-}" ]]; then
    put_secret "$HASH_KEY_SECRET" "$RECIPIENT_HASH_KEY"
    SECRETS_CHANGED=1
    say "$HASH_KEY_SECRET: set from RECIPIENT_HASH_KEY"
  elif secret_exists "$HASH_KEY_SECRET"; then
    say "$HASH_KEY_SECRET: kept (exists; ledger hashes depend on it)"
  else
    put_secret "$HASH_KEY_SECRET" "$(head -c 48 /dev/urandom | base64 | tr -d '\n')"
    SECRETS_CHANGED=1
    say "$HASH_KEY_SECRET: generated"
  fi

  if [[ "$HVE_AUTH" == "basic" ]]; then
    IFS=',' read -r -a accounts <<<"$HVE_ACCOUNTS"
    for account in ${accounts[@]+"${accounts[@]}"}; do
      account="$(printf '%s' "$account" | tr -d '[:space:]')"
      [[ -n "$account" ]] || continue
      name="$(secret_name_for "$account")"
      var="$(env_name_for "$account")"
      password="${!var:-}"
      if [[ -n "$password" ]]; then
        put_secret "$name" "$password"
        SECRETS_CHANGED=1
        say "$name: set from $var"
      elif secret_exists "$name"; then
        say "$name: kept (exists; set $var to replace it)"
      elif [[ -t 0 ]]; then
        password=""
        while [[ -z "$password" ]]; do
          read -r -s -p "Password of HVE account $account (hidden): " password
          printf '\n' >&2
        done
        put_secret "$name" "$password"
        SECRETS_CHANGED=1
        say "$name: set"
      else
        die "no password for $account: set $var, or run interactively"
      fi
      password=""
    done
  else
    say "HVE_AUTH=oauth: no passwords; allow the app identity on each HVE account (see below)"
  fi
fi

# ------------------------------------------------------------------ 7. Key Vault references
# App Service resolves a Key Vault reference when the setting is written and then caches it for
# about a day. The app was created before the secrets existed and before its Key Vault role had
# propagated, so the cached result is a failure: ask App Service to read them again and wait
# until every reference is Resolved. Every path runs this (--skip-secrets too): an earlier run
# may have written the secrets after the references were cached.
REFS_PATH="/subscriptions/$SUBSCRIPTION_ID/resourceGroups/$RESOURCE_GROUP/providers/Microsoft.Web/sites/$APP_NAME/config/configreferences/appsettings"
refresh_references() {
  az rest --method post --uri "$REFS_PATH/refresh?api-version=$WEB_API_VERSION" --output none
}
if want references; then
step "Key Vault references of $APP_NAME: refresh, then wait until every one is Resolved"
refresh_references
try=1
while :; do
  references="$(az rest --method get --uri "$REFS_PATH?api-version=$WEB_API_VERSION" \
    --query 'value[].[name, properties.status]' -o tsv)"
  unresolved="$(awk -F'\t' 'NF && $2 != "Resolved" { printf "%s%s=%s", sep, $1, $2; sep = ", " }' <<<"$references")"
  if [[ -z "$unresolved" ]]; then
    say "resolved: $(awk -F'\t' 'NF { printf "%s%s", sep, $1; sep = ", " }' <<<"$references")"
    break
  fi
  if [[ $try -ge $REFS_TRIES ]]; then
    die "Key Vault references still unresolved after $REFS_TRIES checks: $unresolved. The app refuses to send until they resolve. Check that the secret exists (az keyvault secret show --vault-name $KEY_VAULT -n <name>) and that the app identity has Key Vault Secrets User on $KEY_VAULT (a new role assignment takes up to 10 minutes), then run this again (--skip-app is enough) or refresh alone: az rest --method post --uri '$REFS_PATH/refresh?api-version=$WEB_API_VERSION'"
  fi
  say "   unresolved: $unresolved; check $((try + 1))/$REFS_TRIES in ${REFS_WAIT}s"
  # A reference that failed (not merely Initialized) stays failed in the cache: ask again.
  if awk -F'\t' 'NF && $2 != "Resolved" && $2 != "Initialized" { found = 1 } END { exit !found }' <<<"$references"; then
    refresh_references
  fi
  sleep "$REFS_WAIT"
  try=$((try + 1))
done
fi

# ------------------------------------------------------------------ 8. code
# Only what the app needs, and only what git tracks: a stray local file (notes, a .env, a
# scratch script) never leaves the machine.
PACKAGE_ALLOWLIST=(function_app.py host.json requirements.txt shared)
if [[ $SKIP_APP -eq 0 ]] && want code; then
  step "Packaging and deploying the code to $APP_NAME"
  git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$ROOT is not a git checkout: the package is made of the files git tracks (or use --skip-app)"
  for required in function_app.py host.json requirements.txt; do
    [[ -f "$ROOT/$required" && -n "$(git -C "$ROOT" ls-files -- "$required")" ]] ||
      die "$required is missing or not tracked by git in $ROOT: nothing to deploy (or use --skip-app)"
  done
  package_dir="$(mktemp -d)"
  trap 'rm -rf "$package_dir"' EXIT
  package="$package_dir/hve-relay.zip"
  (
    cd "$ROOT"
    git ls-files --cached -- "${PACKAGE_ALLOWLIST[@]}" |
      while IFS= read -r file; do
        if [[ -f "$file" ]]; then printf '%s\n' "$file"; fi
      done >"$package_dir/files.txt"
    zip -q -X "$package" -@ <"$package_dir/files.txt"
  )
  left_out="$(git -C "$ROOT" ls-files --others --exclude-standard -- "${PACKAGE_ALLOWLIST[@]}")"
  if [[ -n "$left_out" ]]; then
    say "left out (not tracked by git): $(paste -sd ' ' - <<<"$left_out")"
  fi
  if ! git -C "$ROOT" diff --quiet HEAD -- "${PACKAGE_ALLOWLIST[@]}" 2>/dev/null; then
    say "note: the package holds uncommitted changes of tracked files"
  fi
  say "package: $(wc -l <"$package_dir/files.txt" | tr -d ' ') files, $(wc -c <"$package" | tr -d ' ') bytes"
  # Flex Consumption: the package goes to the deployment container; --build-remote installs
  # requirements.txt on the platform (Linux, the app's Python version). The app identity's
  # Storage Blob Data Owner role is minutes old on a first deployment: retry 403 until it applies.
  with_retry "publish (storage role of the app identity)" "$PUBLISH_TRIES" "$PUBLISH_WAIT" \
    'AuthorizationPermissionMismatch|AuthorizationFailure|Forbidden|(^|[^0-9])403([^0-9]|$)' \
    az functionapp deployment source config-zip --resource-group "$RESOURCE_GROUP" --name "$APP_NAME" \
    --src "$package" --build-remote true --output none ||
    die "publishing the code failed (see above). 403/AuthorizationPermissionMismatch after every try: the app identity's Storage Blob Data Owner role has not applied yet; run this again in a few minutes (--skip-secrets is fine)"
  say "deployed"
elif [[ $SECRETS_CHANGED -eq 1 ]]; then
  # The code caches HVE passwords (HVE_SECRET_CACHE_SECONDS): a restart makes a rotation immediate.
  step "Restarting $APP_NAME so the code reads the new secrets"
  az functionapp restart --resource-group "$RESOURCE_GROUP" --name "$APP_NAME" --output none
fi

# ------------------------------------------------------------------ 9. what now
want summary || exit 0
step "Done"
say "function app : $APP_URL"
say "mail queue   : $MAIL_QUEUE_URL"
say "functions (status endpoint among them; the host may need a minute to list them):"
az functionapp function list --resource-group "$RESOURCE_GROUP" --name "$APP_NAME" \
  --query '[].{function: name, url: invokeUrlTemplate}' -o table 2>/dev/null || true
say ""
say "function key for the status endpoint (header x-functions-key or ?code=):"
say "  az functionapp keys list -g $RESOURCE_GROUP -n $APP_NAME --query functionKeys.default -o tsv"

first_domain="${HVE_INTERNAL_DOMAINS%%,*}"
say ""
say "drop a first request (raw JSON; role assignments can take a few minutes to apply):"
say "  az storage message put --auth-mode login --account-name $STORAGE_ACCOUNT --queue-name $MAIL_QUEUE \\"
say "    --content '{\"id\": \"first-request-1\", \"to\": [\"you@${first_domain:-your-domain}\"], \"subject\": \"hve-relay works\", \"text\": \"First message through hve-relay.\"}'"

if [[ "$HVE_AUTH" == "oauth" ]]; then
  say ""
  say "HVE_AUTH=oauth: in Exchange Online PowerShell, allow the app identity on every HVE account:"
  say "  Add-HVEAppAccess -Identity <hve account> -AppIds $IDENTITY_PRINCIPAL_ID   (see infra/README.md)"
fi
if [[ "$(lower "$WELCOME_ENABLED")" == "true" && "$GRAPH_GRANTED" != "true" ]]; then
  say ""
  say "welcome scan is on but User.Read.All was not granted by this deployment: have an admin grant it"
  say "to object id $IDENTITY_PRINCIPAL_ID (infra/README.md, 'Graph permission'), or redeploy with"
  say "--set grantGraphUserReadAll=true as a Privileged Role Administrator."
fi
if [[ "$TRACE_GRANTED" == "true" ]]; then
  say ""
  say "delivery confirmation: once per tenant, a Global Administrator creates the message-trace service"
  say "principal, or Graph refuses every trace call (infra/README.md, 'delivery confirmation'):"
  say "  New-MgServicePrincipal -AppId 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373"
fi
