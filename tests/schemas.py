"""The JSON schemas of the HTTP routes' answers (shared/schema/), for tests that validate real responses."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parents[1] / "shared" / "schema"
SEND_SCHEMA = json.loads((SCHEMAS / "send-response.v1.json").read_text())
REQUEST_STATUS_SCHEMA = json.loads((SCHEMAS / "request-status.v1.json").read_text())
ERROR_SCHEMA = json.loads((SCHEMAS / "error.v1.json").read_text())
EVENT_SCHEMA = json.loads((SCHEMAS / "event.v1.json").read_text())


def event_validator():
    """A validator of event.v1.json that resolves its `data` reference to request-status.v1.json."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in (EVENT_SCHEMA, REQUEST_STATUS_SCHEMA)
    )
    return Draft202012Validator(EVENT_SCHEMA, registry=registry)
