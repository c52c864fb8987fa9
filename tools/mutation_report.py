"""Per-module mutation score from `mutmut results --all true` (read on stdin); used by tools/mutation.sh.

    .venv/bin/mutmut results --all true | python -m tools.mutation_report replies contract
    .venv/bin/mutmut results --all true | python -m tools.mutation_report --write replies contract
    python -m tools.mutation_report --list      # the pure policy modules: NAME shared.DOTTED.PATH
    python -m tools.mutation_report --render    # rewrite the table in docs/testing.md from the JSON

The pure policy modules are the ones setup.cfg `[mutmut]` mutates (`only_mutate`); a module is
named by its file's stem (by `<package>_<stem>` when two share a stem: `delivery_policy`).
`--write` records the run's counts in docs/mutation-scores.json (the modules not run keep their last
result) and regenerates the table in docs/testing.md from it, between the mutation markers;
tests/test_mutation_scores.py checks that the two agree, that every pure module is in them, and
the targets below.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.cfg"
SCORES = ROOT / "docs" / "mutation-scores.json"
DOC = ROOT / "docs" / "testing.md"
START, END = "<!-- mutation:start -->", "<!-- mutation:end -->"

KILLED = ("killed", "timeout")  # a mutant that hangs the tests is caught too
# The lowest score each module must keep (the governor's arithmetic and the reply classes), and overall.
TARGETS = {"pacing": 90.0, "scheduler": 90.0, "replies": 90.0}
OVERALL_TARGET = 85.0


def pure_modules(setup: Path = SETUP) -> dict[str, str]:
    """name -> path (relative to the repository) of every module setup.cfg's [mutmut] mutates, in its order."""
    cfg = configparser.ConfigParser()
    cfg.read(setup)
    paths = [p.strip() for p in cfg["mutmut"]["only_mutate"].split() if p.strip()]
    stems = Counter(Path(p).stem for p in paths)
    return {
        (Path(p).stem if stems[Path(p).stem] == 1 else f"{Path(p).parent.name}_{Path(p).stem}"): p for p in paths
    }


def dotted(path: str) -> str:
    """shared/governor/pacing.py -> shared.governor.pacing"""
    return path.removesuffix(".py").replace("/", ".")


def tally(lines: Iterable[str], modules: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Counts and survivors per module name from mutmut's `NAME: status` lines (others ignored)."""
    by_dotted = {dotted(path): name for name, path in modules.items()}
    results: dict[str, dict[str, Any]] = {}
    for name in modules:
        results[name] = {"path": modules[name], "statuses": Counter(), "survivors": []}
    for line in lines:
        # shared.<package>.<module>.x_<function>__mutmut_<n>: <status> (methods: xǁClassǁmethod__mutmut_<n>)
        m = re.match(r"\s*(shared(?:\.\w+)+?)\.(x\S+): (.+)$", line)
        if not m or m[1] not in by_dotted:
            continue
        entry = results[by_dotted[m[1]]]
        status = m[3].strip()
        entry["statuses"][status] += 1
        if status not in KILLED:
            entry["survivors"].append(f"{m[1]}.{m[2]} ({status})")
    return {name: _counts(r) for name, r in results.items()}


def _counts(r: dict[str, Any]) -> dict[str, Any]:
    statuses: Counter = r["statuses"]
    mutants = sum(statuses.values())
    killed = sum(statuses[s] for s in KILLED)
    return {
        "path": r["path"],
        "mutants": mutants,
        "killed": killed,
        "survived": statuses["survived"],
        "other": mutants - killed - statuses["survived"],  # no tests, suspicious, skipped, not checked
        "survivors": sorted(r["survivors"], key=_natural),
    }


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def score(entry: dict[str, Any]) -> float | None:
    return 100 * entry["killed"] / entry["mutants"] if entry["mutants"] else None


def overall(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = {key: sum(m[key] for m in modules.values()) for key in ("mutants", "killed", "survived", "other")}
    return total


def render(results: dict[str, dict[str, Any]]) -> str:
    """The console table of a run."""
    lines = [f"{'module':16} {'mutants':>8} {'killed':>7} {'survived':>9} {'other':>6} {'score':>7}"]
    rows = list(results.items())
    if len(results) > 1:
        rows.append(("overall", overall(results)))
    for name, c in rows:
        s = score(c)
        lines.append(
            f"{name:16} {c['mutants']:8d} {c['killed']:7d} {c['survived']:9d} {c['other']:6d} "
            f"{'-' if s is None else f'{s:.1f}%':>7}"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def table(recorded: dict[str, Any]) -> str:
    """The markdown table of docs/testing.md from the recorded scores (docs/mutation-scores.json)."""
    modules = recorded["modules"]
    # survived: every mutant not killed (a few no test reached at all: mutmut's "no tests")
    rows = ["| module | mutants | killed | survived | score | target |", "|---|---|---|---|---|---|"]
    for name, c in modules.items():
        target = f"≥ {TARGETS[name]:.0f}%" if name in TARGETS else ""
        rows.append(
            f"| `{c['path']}` | {c['mutants']} | {c['killed']} | {c['survived'] + c['other']} | {_pct(score(c))} | {target} |"
        )
    t = overall(modules)
    rows.append(
        f"| overall | {t['mutants']} | {t['killed']} | {t['survived'] + t['other']} | {_pct(score(t))}"
        f" | ≥ {OVERALL_TARGET:.0f}% |"
    )
    return "\n".join(rows)


def with_table(text: str, recorded: dict[str, Any]) -> str:
    """`text` with the table between the mutation markers regenerated."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{table(recorded)}\n{END}", text)


def load(path: Path = SCORES) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"modules": {}}


def record(results: dict[str, dict[str, Any]], recorded: dict[str, Any], modules: dict[str, str]) -> dict[str, Any]:
    """The recorded scores with this run's modules replaced; modules no longer pure are dropped, and
    the order is setup.cfg's."""
    merged = {**recorded.get("modules", {}), **results}
    return {
        "generated_by": f"tools/mutation.sh (mutmut {version('mutmut')}); do not edit by hand",
        "score": "killed (timeouts included) / mutants",
        "modules": {name: merged[name] for name in modules if name in merged},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation_report")
    parser.add_argument("modules", nargs="*", help="module names (default: every pure module)")
    parser.add_argument("--list", action="store_true", help="print the pure modules: NAME DOTTED")
    parser.add_argument("--write", action="store_true", help="record the run in docs/mutation-scores.json and docs/testing.md")
    parser.add_argument("--render", action="store_true", help="only regenerate the table in docs/testing.md")
    args = parser.parse_args(argv)
    modules = pure_modules()
    if args.list:
        print("\n".join(f"{name} {dotted(path)}" for name, path in modules.items()))
        return 0
    if args.render:
        DOC.write_text(with_table(DOC.read_text(), load()))
        return 0
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        print(f"unknown module(s) {unknown} (one of: {' '.join(modules)})", file=sys.stderr)
        return 2
    chosen = {name: modules[name] for name in (args.modules or modules)}
    results = tally(sys.stdin, chosen)
    print(render(results))
    out = ROOT / "mutants" / "survivors.txt"
    if out.parent.is_dir():
        out.write_text("".join(s + "\n" for r in results.values() for s in r["survivors"]))
        print(f"score = killed (timeouts included) / mutants; survivors: {out.relative_to(ROOT)} (mutmut show NAME)")
    if args.write:
        if any(r["mutants"] == 0 for r in results.values()):
            print("not written: a module has no mutants in the results (did the run fail?)", file=sys.stderr)
            return 1
        recorded = record(results, load(), modules)
        SCORES.write_text(json.dumps(recorded, indent=2, ensure_ascii=False) + "\n")
        DOC.write_text(with_table(DOC.read_text(), recorded))
        print(f"written: {SCORES.relative_to(ROOT)} and the table in {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
