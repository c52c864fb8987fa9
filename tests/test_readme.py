"""The README stays an admin's page and true: its commands exist and CI runs the test one, the settings
table in docs/settings.md is the one list, it keeps its order and length, says plainly that the relay
has not met a real tenant, and neither it nor docs/ holds a tracker reference, an internal name or a
link to nothing."""

import os
import re
from pathlib import Path

import pytest

from tools.settings_table import with_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "infra" / "README.md"]


def _headings(text: str) -> list[str]:
    """The `## ` headings outside fenced blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            found.append(line[3:].strip())
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    heading = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    found, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(_slug(m.group(1)))
    return found


def test_settings_table_in_docs_matches_the_settings_list():
    text = (ROOT / "docs" / "settings.md").read_text()
    assert "<!-- settings:start -->" in text
    assert with_table(text) == text, "run: python -m tools.settings_table --write"


def test_the_two_readme_commands_exist_and_ci_calls_the_test_one():
    text = README.read_text()
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert f"./{script}" in text and os.access(ROOT / script, os.X_OK)
    assert text.index("./tools/demo.sh") < text.index("## What HVE allows today"), "the commands are near the top"
    assert "./tools/test.sh" in (ROOT / ".ci/run").read_text()


def test_the_readme_is_an_admin_s_page_of_about_2000_words_in_its_order():
    text = README.read_text()
    assert len(text.split()) <= 2600
    order = ["Send your first mail", "What HVE allows today", "Prerequisites in the tenant", "Deploy", "Operate",
             "Before production: what to check first", "Where to read more"]
    headings = _headings(text)
    assert [h for h in headings if h in order] == order, headings
    for said in ("internal recipients only", "HVE_LIMITS_PROFILE=preview-2024", "New-MailUser -HVEAccount",
                 "Set-HVEAccountBillingPolicy", "AllowBasicAuthSmtp", "XOAUTH2", "azd up", "infra/deploy.sh"):
        assert said.lower() in text.lower(), said
    assert "not yet run against a real tenant" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_tracker_references_or_internal_names(page):
    text = page.read_text(encoding="utf-8")
    bad = re.findall(r"(?i)\b(?:issue|ticket|PR)\s*#?\d+\b|(?<![\w/.-])#\d+\b|\bthe seed\b|\bseed (?:pattern|article)\b",
                     text)
    assert not bad, bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or not file.is_relative_to(ROOT):
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, broken
