"""The JSON schemas of the HTTP routes' answers (shared/schema/), for tests that validate real responses."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parents[1] / "shared" / "schema"
SEND_SCHEMA = json.loads((SCHEMAS / "send-response.v1.json").read_text())
REQUEST_STATUS_SCHEMA = json.loads((SCHEMAS / "request-status.v1.json").read_text())
ERROR_SCHEMA = json.loads((SCHEMAS / "error.v1.json").read_text())
