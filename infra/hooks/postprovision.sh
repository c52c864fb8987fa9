#!/bin/sh
# azd postprovision hook (azure.yaml): what infra/deploy.sh does after main.bicep and azd does not:
# the Entra app-role grants (modules/graph.bicep, a second deployment), the secrets in Key Vault,
# the Key Vault reference refresh and poll. Resource group and outputs come from azd's environment.
set -eu
exec bash "$(dirname "$0")/../deploy.sh" --step grants --step secrets --step references
