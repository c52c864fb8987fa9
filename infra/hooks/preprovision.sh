#!/bin/sh
# azd preprovision hook (azure.yaml): check az before azd creates anything (infra/deploy.sh --step tools).
set -eu
exec bash "$(dirname "$0")/../deploy.sh" --step tools
