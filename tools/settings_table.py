"""Print the settings table of docs/settings.md from shared/settings.py (the one list), or --write it there.

    python -m tools.settings_table [--write]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from shared.settings import SETTINGS

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"
_SCOPES = {"app": "Azure + local", "local": "local only", "platform": "platform"}


def table() -> str:
    rows = ["| Setting | Default | Where | What it does |", "|---|---|---|---|"]
    for spec in SETTINGS:
        default = f"`{spec.default}`" if spec.default else ""
        rows.append(f"| `{spec.name}` | {default} | {_SCOPES.get(spec.scope, spec.scope)} | {spec.description.replace('|', '/')} |")
    return "\n".join(rows)


def with_table(text: str) -> str:
    """`text` with the table between the settings markers regenerated."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(f"{START}\n{table()}\n{END}", text)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.settings_table")
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/settings.md")
    args = parser.parse_args()
    if args.write:
        DOC.write_text(with_table(DOC.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
