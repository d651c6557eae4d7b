"""Compare two runs of the causal-LM table: does a rerun reproduce it?

    python benchmarks/quality/lm/compare.py OLD.json NEW.json [--tolerance 1]

Prints every exact-match cell that differs (rows present in both runs), rows whose chosen
parameters differ (a changed grid or search rather than noise) and rows in one run only.
Exits 1 when a cell of a row with the same chosen parameters differs by more than
``--tolerance`` points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "src"))
    from alloykit.demo.lm.experiment import table_differences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the earlier run's table .json")
    parser.add_argument("new", type=Path, help="the rerun's table .json")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points (default 1)")
    args = parser.parse_args()
    result = table_differences(json.loads(args.old.read_text()), json.loads(args.new.read_text()))
    moved = {(kind, row) for kind, row, _, _ in result["chosen"]}
    worst = 0.0
    for cell in result["changed"]:
        same_choice = (cell.kind, cell.row) not in moved
        if same_choice:
            worst = max(worst, cell.points)
        note = "" if same_choice else " (chosen parameters differ)"
        print(f"{cell.kind}: {cell.row}, {cell.skill}: {cell.old:.1f} -> {cell.new:.1f}{note}")
    for kind, row, before, after in result["chosen"]:
        print(f"{kind}: {row}: chosen parameters differ ({before} -> {after})")
    for line in result["missing"]:
        print(f"in one run only: {line}")
    print(
        f"{len(result['cells'])} cells compared, {len(result['changed'])} differ; largest "
        f"difference with the same chosen parameters: {worst:.1f} points"
    )
    return 1 if worst > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
