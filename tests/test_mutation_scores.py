"""The mutation table in docs/testing.md is the last run's (docs/mutation-scores.json, written by
`WRITE=1 tools/mutation.sh`), covers every pure policy module setup.cfg mutates, explains every
survivor, and meets the targets. mutmut itself is not run here (minutes): this checks the recorded
result, not the code."""

from __future__ import annotations

import re

from tools.mutation_report import (
    DOC,
    END,
    OVERALL_TARGET,
    SCORES,
    START,
    TARGETS,
    load,
    overall,
    pure_modules,
    score,
    with_table,
)

RERUN = "run: WRITE=1 tools/mutation.sh (all modules), then explain the survivors in docs/testing.md"


def test_every_pure_module_in_setup_cfg_has_a_recorded_score_and_a_row_in_the_table():
    recorded = load(SCORES)["modules"]
    modules = pure_modules()
    assert list(recorded) == list(modules), RERUN
    assert {name: entry["path"] for name, entry in recorded.items()} == modules
    section = DOC.read_text().split(START, 1)[1].split(END, 1)[0]
    for path in modules.values():
        assert f"| `{path}` |" in section, path


def test_the_table_in_the_docs_is_the_recorded_run():
    text = DOC.read_text()
    assert START in text and END in text
    assert with_table(text, load(SCORES)) == text, "run: python -m tools.mutation_report --render"


def test_the_recorded_counts_add_up():
    for name, entry in load(SCORES)["modules"].items():
        assert entry["mutants"] > 0, name
        assert entry["killed"] + entry["survived"] + entry["other"] == entry["mutants"], name
        assert len(entry["survivors"]) == entry["survived"] + entry["other"], name
        dotted = entry["path"].removesuffix(".py").replace("/", ".")
        assert all(s.startswith(dotted + ".") for s in entry["survivors"]), name


def test_the_governors_arithmetic_and_the_reply_classes_keep_their_targets_and_so_does_the_whole():
    recorded = load(SCORES)["modules"]
    for name, target in TARGETS.items():
        assert score(recorded[name]) >= target, (name, score(recorded[name]), target)
    assert score(overall(recorded)) >= OVERALL_TARGET


def test_every_surviving_mutant_is_explained_in_the_docs():
    # Each module with survivors has its paragraph ("`shared/x/y.py` (N):") with the recorded count;
    # a module without any has none.
    text = DOC.read_text().split(END, 1)[1].split("\n## ", 1)[0]
    explained = {m[1]: int(m[2]) for m in re.finditer(r"^- `(shared/[\w/]+\.py)` \((\d+)\)", text, re.M)}
    expected = {e["path"]: e["survived"] + e["other"] for e in load(SCORES)["modules"].values()
                if e["survived"] + e["other"]}
    assert explained == expected, RERUN
