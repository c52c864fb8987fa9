"""Every way of packaging the app ships the same files: infra/deploy.sh's allowlist of tracked files.

`.funcignore` is read by Core Tools (`func azure functionapp publish`), VS Code and `azd deploy`.
Core Tools reads it with a port of the codemix gitignore parser (patterns anchored at the top,
prefix matches), azd with git's own rules; the file uses no `!` patterns, so both agree, and both
are evaluated here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pathspec

ROOT = Path(__file__).resolve().parents[1]


def _deploy_allowlist() -> list[str]:
    script = (ROOT / "infra" / "deploy.sh").read_text()
    match = re.search(r"^PACKAGE_ALLOWLIST=\(([^)]*)\)", script, re.M)
    assert match, "infra/deploy.sh no longer defines PACKAGE_ALLOWLIST"
    return match.group(1).split()


def _git_files(*paths: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--", *paths], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line and (ROOT / line).is_file()}


def _patterns() -> list[str]:
    lines = (ROOT / ".funcignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _codemix_regex(patterns: list[str]) -> re.Pattern[str]:
    """The Core Tools parser's reading: escape, first `**` -> `(.+)`, first `*` -> `([^/]+)`,
    anchored at the start and ended by a word boundary."""
    parts = []
    for pattern in patterns:
        escaped = re.sub(r"[\-\[\]/{}()+?.\\^$|]", lambda m: "\\" + m.group(0), pattern)
        parts.append(escaped.replace("**", "(.+)", 1).replace("*", "([^/]+)", 1))
    return re.compile("^((" + ")|(".join(parts) + r")\b)")


def _shipped_by_git_rules(files: set[str]) -> set[str]:
    spec = pathspec.PathSpec.from_lines("gitwildmatch", _patterns())
    return {f for f in files if not spec.match_file(f)}


def _shipped_by_core_tools(files: set[str]) -> set[str]:
    regex = _codemix_regex(_patterns())
    return {f for f in files if not regex.search(f)}


def test_funcignore_uses_no_negation_so_every_parser_reads_it_the_same():
    assert not [p for p in _patterns() if p.startswith("!")]


def test_funcignore_ships_exactly_what_deploy_sh_ships_by_either_parser():
    wanted = _git_files(*_deploy_allowlist())
    assert "function_app.py" in wanted and "host.json" in wanted and any(f.startswith("shared/") for f in wanted)
    tracked = _git_files()
    assert _shipped_by_git_rules(tracked) == wanted, "azd / git rules: .funcignore and deploy.sh disagree"
    assert _shipped_by_core_tools(tracked) == wanted, "Core Tools rules: .funcignore and deploy.sh disagree"


def test_funcignore_leaves_out_what_a_working_tree_holds_besides_the_app():
    # What a developer's tree has that git does not track: environments, caches, local settings.
    present = {"local.settings.json", ".venv/bin/python", ".venv-iac/pycep/bin/python", "node_modules/azurite/package.json",
               ".local/test-hours.log", ".pytest_cache/v/cache/nodeids", "shared/__pycache__/sender.cpython-311.pyc",
               "mutants/shared/governor/pacing.py", ".python_packages/lib/site-packages/x.py", ".azure/dev/.env"}
    for root, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", ".venv-iac", "node_modules"}]
        present |= {str(Path(root, n).relative_to(ROOT)) for n in names}
    allowed = set(_deploy_allowlist())
    for shipped in (_shipped_by_git_rules(present), _shipped_by_core_tools(present)):
        strays = {f for f in shipped if f.split("/", 1)[0] not in allowed}
        assert not strays, f"would be packaged: {sorted(strays)[:10]}"
        assert not {f for f in shipped if "__pycache__" in f or f.endswith(".pyc")}
