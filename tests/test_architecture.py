"""The one-way arrows of docs/architecture.md, read from the imports of every module (ast, no import):

    triggers (function_app.py) -> shared/wiring.py -> stages -> adapters

Stages: send, governor, hve, delivery, welcome, reporting (folders) and retention (a top-level job).
Adapters: settings, storage, ledger, graph, telemetry, events.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"

STAGES = {"send", "governor", "hve", "delivery", "welcome", "reporting", "retention"}
ADAPTERS = {"settings", "storage", "ledger", "graph", "telemetry", "events"}
WIRING = "shared.wiring"
# A stage's entry module: what the wiring calls. No other stage imports it (reporting must not reach
# the governor through the send stage's Relay, for one).
ENTRY_MODULES = {"shared.send.stage": "send", "shared.welcome.scan": "welcome", "shared.delivery.trace": "delivery",
                 "shared.reporting.report": "reporting", "shared.retention": "retention"}
# Which stage may import (pure or adapter modules of) which other stage.
STAGE_ARROWS = {
    "send": {"governor", "hve", "reporting"},       # the governor, SMTP, the hourly counts
    "governor": {"hve", "send"},                    # account limits; reply outcomes (send.replies)
    "hve": {"send"},                                # reply classification (send.replies)
    "delivery": {"send", "reporting"},              # Message-ID, masking; the hourly counts
    "welcome": {"send", "hve"},                     # contract and producer; limits
    "reporting": {"governor", "delivery"},          # pacing arithmetic for /status; delivery rates
    "retention": {"reporting", "send"},             # aggregates; the relay's blobs (send.relay_blobs)
}
# Adapter -> stage imports the code still has (docs/architecture.md, "Known exceptions"). Fixing one
# means deleting it here; a new one fails the test.
KNOWN_ADAPTER_VIOLATIONS = {
    ("shared.ledger", "shared.send.replies"),       # mask_addresses
    ("shared.graph", "shared.hve.credentials"),     # TokenSource, azure_credential, CredentialError
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (anywhere in it, lazy imports included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_of(path.read_text(encoding="utf-8"), package)


def imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from shared import wiring` / `from shared.send import stage` name modules too
            found.update(f"{module}.{alias.name}" for alias in node.names if _is_module(f"{module}.{alias.name}"))
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str | None:
    """The stage or adapter a `shared.…` module belongs to ('wiring' for the wiring)."""
    parts = module.split(".")
    if parts[0] != "shared" or len(parts) < 2:
        return None
    return parts[1]


def shared_modules() -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports(p) if m.startswith("shared.") or m == "shared"}
            for p in sorted(SHARED.rglob("*.py")) if "__pycache__" not in p.parts}


def test_every_module_in_shared_is_a_stage_an_adapter_or_the_wiring():
    units = {unit_of(m) for m in shared_modules()} - {None}
    assert units <= STAGES | ADAPTERS | {"wiring"}, f"not placed in docs/architecture.md: {units - STAGES - ADAPTERS}"


def test_function_app_imports_only_the_wiring():
    allowed_outside = {"azure", "azure.functions"}
    wrong = []
    for module in imports(ROOT / "function_app.py"):
        top = module.split(".")[0]
        if module in (WIRING, "shared") or module in allowed_outside or top in sys.stdlib_module_names \
                or top == "__future__":
            continue
        wrong.append(module)
    assert not wrong, f"function_app.py (triggers only) imports {wrong}; go through shared.wiring"


def test_no_stage_or_adapter_imports_the_wiring():
    wrong = {m: WIRING for m, deps in shared_modules().items() if m != WIRING and WIRING in deps}
    assert not wrong, f"the wiring is imported by {sorted(wrong)}: only function_app.py (and tools, tests) may"


def test_no_stage_imports_another_stages_entry_module():
    wrong = []
    for module, deps in shared_modules().items():
        if unit_of(module) == "wiring":
            continue
        for dep in deps:
            owner = ENTRY_MODULES.get(dep)
            if owner and owner != unit_of(module):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, f"entry modules are the wiring's to call: {wrong}"


def test_stages_import_only_the_stages_the_arrows_allow():
    wrong = []
    for module, deps in shared_modules().items():
        me = unit_of(module)
        if me not in STAGES:
            continue
        for dep in deps:
            other = unit_of(dep)
            if other in STAGES and other != me and other not in STAGE_ARROWS[me]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, f"stage arrows not in docs/architecture.md: {wrong}"


def test_adapters_import_no_stage():
    found = set()
    for module, deps in shared_modules().items():
        if unit_of(module) not in ADAPTERS:
            continue
        for dep in deps:
            if unit_of(dep) in STAGES or dep == WIRING:
                found.add((module, dep))
    assert found - KNOWN_ADAPTER_VIOLATIONS == set(), f"adapters importing a stage: {sorted(found - KNOWN_ADAPTER_VIOLATIONS)}"
    assert KNOWN_ADAPTER_VIOLATIONS - found == set(), \
        f"fixed, so drop from KNOWN_ADAPTER_VIOLATIONS: {sorted(KNOWN_ADAPTER_VIOLATIONS - found)}"


def test_the_checker_sees_relative_lazy_and_from_package_imports():
    source = "def f():\n    from . import stage\n    from ..governor import table\n    from shared import wiring\n"
    assert {"shared.send.stage", "shared.governor.table", "shared.wiring"} <= imports_of(source, "shared.send")


# --- the send stage reads as its steps ---------------------------------------------------------

SEND_STEPS = ["stage", "decode", "ledger_gate", "prepare", "hold", "schedule", "transmit", "record", "pacer", "outcome"]


def test_the_send_stage_is_its_steps_each_a_few_hundred_lines():
    long = {name: n for name in SEND_STEPS
            if (n := len((SHARED / "send" / f"{name}.py").read_text(encoding="utf-8").splitlines())) > 300}
    assert not long, f"send stage modules over 300 lines: {long}"


def test_the_smtp_adapter_reaches_neither_the_ledger_nor_the_governor():
    deps = shared_modules()["shared.hve.smtp"]
    wrong = {d for d in deps if d == "shared.ledger" or d.startswith("shared.governor")
             or (d.startswith("shared.send.") and d != "shared.send.replies")}
    assert not wrong, f"shared/hve/smtp.py imports {sorted(wrong)}: it lends sessions, the send stage decides"
