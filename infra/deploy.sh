#!/usr/bin/env bash
# Deploy hve-relay to Azure: infrastructure (infra/main.bicep), secrets (Key Vault) and code
# (Flex Consumption). Needs only the Azure CLI (az), plus zip and git to package the code.
# Runs on bash 3.2+ (macOS), Linux, WSL and Azure Cloud Shell. See infra/README.md.
#
#   infra/deploy.sh --resource-group rg-hve-relay --location swedencentral
#
# Secrets are never echoed, never put on a command line and never written to disk:
#   HVE account passwords (HVE_AUTH=basic): environment variable HVE_PASSWORD_<ADDRESS>, the
#     address upper-cased with every character other than A-Z and 0-9 replaced by "_"
#     (hve-notify@contoso.com -> HVE_PASSWORD_HVE_NOTIFY_CONTOSO_COM), else a hidden prompt.
#     Key Vault secret name: "hve-" + the address lower-cased with every character other than
#     a-z and 0-9 replaced by "-" (cut to 100 characters) + "-" + the first 10 hex digits of the
#     SHA-256 of the lower-cased address (the rule of shared/credentials.py secret_name_for, which
#     tests/test_infra.py checks this script against).
#   Recipient hash key: generated once into the secret "recipient-hash-key" if absent (an
#     existing one is never replaced: ledger hashes depend on it); RECIPIENT_HASH_KEY in the
#     environment sets it explicitly, e.g. when moving a ledger.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: infra/deploy.sh --resource-group NAME [options]

  -g, --resource-group NAME  resource group to deploy into (created if missing);
                             default: $AZURE_RESOURCE_GROUP
  -l, --location REGION      Azure region (needed when the group is created; one that offers
                             Flex Consumption); default: $AZURE_LOCATION, else the group's
  -p, --parameters FILE      parameters file (default: infra/main.parameters.json)
      --set NAME=VALUE       override one template parameter (repeatable), e.g.
                             --set hveAuth=oauth  --set 'hveAccounts=["a@contoso.com"]'
  -n, --name NAME            deployment name (default: hve-relay)
      --what-if              show what the deployment would change, change nothing
      --skip-secrets         do not touch Key Vault secrets
      --skip-app             do not package and deploy the code
      --no-deployer-roles    do not grant the signed-in principal Key Vault Secrets Officer
                             and queue Message Sender
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
OVERRIDES=()

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
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[[ -n "$RESOURCE_GROUP" ]] || { usage >&2; die "--resource-group is required"; }
[[ -f "$PARAMETERS_FILE" ]] || die "parameters file not found: $PARAMETERS_FILE"
command -v az >/dev/null 2>&1 || die "the Azure CLI (az) is not installed: https://aka.ms/azure-cli"
if [[ $WHAT_IF -eq 0 && $SKIP_APP -eq 0 ]]; then
  command -v zip >/dev/null 2>&1 || die "zip is not installed (needed to package the code; or use --skip-app)"
  command -v git >/dev/null 2>&1 || die "git is not installed (needed to list the files to package; or use --skip-app)"
fi

# ------------------------------------------------------------------ 1. signed in?
step "Azure CLI login"
if ! SUBSCRIPTION="$(az account show --query '[name, id]' -o tsv 2>/dev/null | paste -sd ' ' -)"; then
  die "not logged in: run 'az login' (and 'az account set --subscription <id>'), then run this again"
fi
[[ -n "$SUBSCRIPTION" ]] || die "not logged in: run 'az login', then run this again"
say "subscription: $SUBSCRIPTION"
say "bicep: $(az bicep version 2>/dev/null || echo 'not installed yet: az installs it on first use')"

if [[ $WHAT_IF -eq 0 ]] && grep -q 'contoso' "$PARAMETERS_FILE"; then
  die "$PARAMETERS_FILE still has the example contoso values: put your HVE accounts and domains in it (or pass --parameters FILE)"
fi

# ------------------------------------------------------------------ 2. resource group
step "Resource group $RESOURCE_GROUP"
if az group show --name "$RESOURCE_GROUP" --output none 2>/dev/null; then
  say "exists"
elif [[ $WHAT_IF -eq 1 ]]; then
  die "resource group $RESOURCE_GROUP does not exist; --what-if changes nothing, so create it first: az group create -n $RESOURCE_GROUP -l <region>"
else
  [[ -n "$LOCATION" ]] || die "resource group $RESOURCE_GROUP does not exist: pass --location to create it"
  az group create --name "$RESOURCE_GROUP" --location "$LOCATION" --tags application=hve-relay --output none
  say "created in $LOCATION"
fi

# ------------------------------------------------------------------ 3. deployer principal
DEPLOYER_ID=""
DEPLOYER_TYPE=""
if [[ $DEPLOYER_ROLES -eq 1 ]]; then
  login_type="$(az account show --query user.type -o tsv)"
  if [[ "$login_type" == "user" ]]; then
    DEPLOYER_ID="$(az ad signed-in-user show --query id -o tsv 2>/dev/null || true)"
    DEPLOYER_TYPE="User"
  else
    login_name="$(az account show --query user.name -o tsv)"
    DEPLOYER_ID="$(az ad sp show --id "$login_name" --query id -o tsv 2>/dev/null || true)"
    DEPLOYER_TYPE="ServicePrincipal"
  fi
  if [[ -z "$DEPLOYER_ID" ]]; then
    say "warning: could not look up the signed-in principal's object id; no deployer roles are granted"
    say "         (the secrets step then needs Key Vault Secrets Officer on the vault from elsewhere)"
  fi
fi

# ------------------------------------------------------------------ 4. deployment
deploy_args=(
  --resource-group "$RESOURCE_GROUP"
  --name "$DEPLOYMENT_NAME"
  --template-file "$ROOT/infra/main.bicep"
  --parameters "@$PARAMETERS_FILE"
)
[[ -z "$LOCATION" ]] || deploy_args+=(--parameters "location=$LOCATION")
[[ -z "$DEPLOYER_ID" ]] || deploy_args+=(--parameters "deployerPrincipalId=$DEPLOYER_ID" "deployerPrincipalType=$DEPLOYER_TYPE")
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  deploy_args+=(--parameters "$override")
done

if [[ $WHAT_IF -eq 1 ]]; then
  step "What-if of infra/main.bicep (nothing is changed)"
  az deployment group create "${deploy_args[@]}" --what-if
  exit 0
fi

step "Deploying infra/main.bicep (a few minutes)"
az deployment group create "${deploy_args[@]}" --query properties.provisioningState -o tsv

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
  properties.outputs.WELCOME_ENABLED.value
]' -o tsv)"
values=()
while IFS= read -r line; do values+=("$line"); done <<<"$outputs"
[[ ${#values[@]} -ge 13 ]] || die "unexpected deployment outputs; see: az deployment group show -g $RESOURCE_GROUP -n $DEPLOYMENT_NAME"
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
GRAPH_GRANTED="${values[11]}"
WELCOME_ENABLED="${values[12]}"
[[ -n "$APP_NAME" && -n "$KEY_VAULT" ]] || die "the deployment has no outputs; see: az deployment group show -g $RESOURCE_GROUP -n $DEPLOYMENT_NAME"

# ------------------------------------------------------------------ 5. secrets
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
upper() { printf '%s' "$1" | tr '[:lower:]' '[:upper:]'; }
sha256_hex() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -c1-64; }
secret_name_for() { printf 'hve-%s-%s' "$(lower "$1" | sed 's/[^a-z0-9]/-/g' | cut -c1-100)" "$(lower "$1" | sha256_hex | cut -c1-10)"; }
env_name_for() { printf 'HVE_PASSWORD_%s' "$(upper "$1" | sed 's/[^A-Z0-9]/_/g')"; }

# Role assignments take a few minutes to reach Key Vault: retry "forbidden" for up to 5 minutes.
retry_forbidden() {
  local attempt err
  for attempt in $(seq 1 30); do
    if err="$("$@" 2>&1 >/dev/null)"; then
      return 0
    fi
    case "$err" in
      *SecretNotFound* | *"was not found"*) return 3 ;;
      *Forbidden* | *"not authorized"* | *"does not have secrets"*)
        [[ $attempt -eq 1 ]] && say "   waiting for the Key Vault role assignment to take effect..."
        sleep 10 ;;
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
if [[ $SKIP_SECRETS -eq 0 ]]; then
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

# ------------------------------------------------------------------ 6. code
if [[ $SKIP_APP -eq 0 ]]; then
  step "Packaging and deploying the code to $APP_NAME"
  for required in function_app.py host.json requirements.txt; do
    [[ -f "$ROOT/$required" ]] || die "$required is missing in $ROOT: nothing to deploy (or use --skip-app)"
  done
  package_dir="$(mktemp -d)"
  trap 'rm -rf "$package_dir"' EXIT
  package="$package_dir/hve-relay.zip"
  # Tracked and untracked-but-not-ignored files, without what only development needs.
  (
    cd "$ROOT"
    git ls-files --cached --others --exclude-standard |
      grep -Ev '^(\.ci|\.github|bench|docs|infra|node_modules|tests|tools)/' |
      grep -Ev '^(\.gitignore|\.checkov\.yaml|package\.json|package-lock\.json|requirements-dev\.txt|requirements-iac\.txt|local\.settings.*\.json|pytest\.ini)$' |
      grep -Ev '\.md$' |
      while IFS= read -r file; do
        if [[ -f "$file" ]]; then printf '%s\n' "$file"; fi
      done >"$package_dir/files.txt"
    zip -q -X "$package" -@ <"$package_dir/files.txt"
  )
  say "package: $(wc -l <"$package_dir/files.txt" | tr -d ' ') files, $(wc -c <"$package" | tr -d ' ') bytes"
  # Flex Consumption: the package goes to the deployment container; --build-remote installs
  # requirements.txt on the platform (Linux, the app's Python version).
  az functionapp deployment source config-zip --resource-group "$RESOURCE_GROUP" --name "$APP_NAME" \
    --src "$package" --build-remote true --output none
  say "deployed"
elif [[ $SECRETS_CHANGED -eq 1 ]]; then
  step "Restarting $APP_NAME so Key Vault references pick up the new secrets"
  az functionapp restart --resource-group "$RESOURCE_GROUP" --name "$APP_NAME" --output none
fi

# ------------------------------------------------------------------ 7. what now
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
if [[ "$(lower "$WELCOME_ENABLED")" == "true" && "$(lower "$GRAPH_GRANTED")" != "true" ]]; then
  say ""
  say "welcome scan is on but User.Read.All was not granted by this deployment: have an admin grant it"
  say "to object id $IDENTITY_PRINCIPAL_ID (infra/README.md, 'Graph permission'), or redeploy with"
  say "--set grantGraphUserReadAll=true as a Privileged Role Administrator."
fi
say ""
say "delivery confirmation (optional, deliveryTraceEnabled + grantGraphMessageTrace): once per tenant, a Global"
say "Administrator creates the message-trace service principal (infra/README.md, 'delivery confirmation'):"
say "  New-MgServicePrincipal -AppId 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373"
