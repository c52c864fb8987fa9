"""The README stays true: its settings table is the one list, its commands exist."""

import os
from pathlib import Path

from tools.settings_table import readme_with_table

ROOT = Path(__file__).resolve().parents[1]


def test_settings_table_in_readme_matches_the_settings_list():
    text = (ROOT / "README.md").read_text()
    assert readme_with_table(text) == text, "run: python -m tools.settings_table --write"


def test_the_two_readme_commands_exist_and_ci_calls_the_test_one():
    text = (ROOT / "README.md").read_text()
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert f"./{script}" in text and os.access(ROOT / script, os.X_OK)
    assert "./tools/test.sh" in (ROOT / ".ci/run").read_text()
