"""The repository stands on its own: nothing it ships points at files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".bicep", ".sh", ".json", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".html", ".js", ".css"}


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / line for line in out.splitlines() if line]
    return [f for f in files if f.suffix in TEXT_SUFFIXES and f.is_file() and f.name != "package-lock.json"]


def test_no_file_points_outside_the_repository():
    # A relative path that climbs out of the repository from the file that holds it, or names
    # nothing in it (docs/x.md may link ../shared/schema/..., the app's own package; the README may
    # not name ../shared/docs/..., nor may shared/hve/limits.py).
    relative = re.compile(r"(?<![.\w])(?:\.\./)+[\w.-]+/[\w./-]+")
    hits = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for reference in relative.findall(line):
                target = (path.parent / reference).resolve()
                if not target.is_relative_to(ROOT) or not target.exists():
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_a_reference_that_climbs_out_of_the_repository_is_caught(tmp_path):
    relative = re.compile(r"(?<![.\w])(?:\.\./)+[\w.-]+/[\w./-]+")
    top, doc = ROOT / "README.md", ROOT / "docs" / "producers.md"
    assert not (top.parent / relative.findall("see ../shared/docs/hve-facts.md")[0]).resolve().is_relative_to(ROOT)
    assert (doc.parent / relative.findall("[s](../shared/schema/x.json)")[0]).resolve().is_relative_to(ROOT)


def test_every_facts_reference_names_a_file_in_docs():
    named = re.compile(r"(?<![\w/-])((?:docs/)?[a-z-]+-facts\.md)")
    hits = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in named.findall(line):
                target = ROOT / (name if name.startswith("docs/") else f"docs/{name}")
                if not target.is_file():
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not hits, "facts files that do not exist in docs/:\n" + "\n".join(hits)
    assert (ROOT / "docs" / "hve-facts.md").is_file() and (ROOT / "docs" / "functions-host-facts.md").is_file()


def test_no_file_refers_to_the_projects_issue_tracker():
    """Code, tests and docs say what and why in their own words, not "see issue 9" (a clone has no
    tracker). Upstream projects' issues (`owner/repo#123`) are public references and stay."""
    tracker = re.compile(r"\b[Ii]ssues?[- ]\d+")
    hits = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if tracker.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "references to the issue tracker:\n" + "\n".join(hits)
