"""Per-module mutation score from `mutmut results --all true` (read on stdin); used by tools/mutation.sh.

    .venv/bin/mutmut results --all true | python -m tools.mutation_report replies contract
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

KILLED = ("killed", "timeout")  # a mutant that hangs the tests is caught too


def tally(lines: Iterable[str], modules: list[str]) -> tuple[dict[str, Counter], dict[str, list[str]]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        # shared.<stage>.<module>.x_<function>__mutmut_<n>: <status>; modules are named by their last part
        m = re.match(r"\s*shared\.((?:\w+\.)*?)(\w+)\.(x\S+): (.+)$", line)
        if not m or m[2] not in modules:
            continue
        status = m[4].strip()
        counts[m[2]][status] += 1
        if status not in KILLED:
            survivors[m[2]].append(f"shared.{m[1]}{m[2]}.{m[3]} ({status})")
    return counts, survivors


def render(counts: dict[str, Counter], modules: list[str]) -> str:
    lines = [f"{'module':10} {'mutants':>8} {'killed':>7} {'survived':>9} {'other':>6} {'score':>7}"]
    total: Counter = Counter()
    for module in modules:
        c = counts.get(module, Counter())
        n = sum(c.values())
        killed = sum(c[s] for s in KILLED)
        other = n - killed - c["survived"]  # no tests, suspicious, skipped, not checked
        total.update(n=n, killed=killed, survived=c["survived"], other=other)
        score = f"{100 * killed / n:.1f}%" if n else "-"
        lines.append(f"{module:10} {n:8d} {killed:7d} {c['survived']:9d} {other:6d} {score:>7}")
    if len(modules) > 1 and total["n"]:
        lines.append(f"{'overall':10} {total['n']:8d} {total['killed']:7d} {total['survived']:9d} {total['other']:6d}"
                     f" {100 * total['killed'] / total['n']:6.1f}%")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    modules = argv or ["pacing", "replies", "contract", "mime", "limits", "retry"]
    counts, survivors = tally(sys.stdin, modules)
    print(render(counts, modules))
    out = Path("mutants/survivors.txt")
    if out.parent.is_dir():
        out.write_text("".join(s + "\n" for m in modules for s in survivors[m]))
        print(f"score = killed (timeouts included) / mutants; survivors: {out} (mutmut show NAME)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
