#!/bin/sh
# azd postdeploy hook (azure.yaml): the app and queue URLs, the function key command, a first request.
set -eu
exec bash "$(dirname "$0")/../deploy.sh" --step summary
