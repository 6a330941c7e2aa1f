#!/usr/bin/env python
"""Wall time of an experiment grid, per method and per run.

    python scripts/bench_grid.py                       # the default grid, in a fresh temp results dir
    python scripts/bench_grid.py --methods coop --seeds 1
    python scripts/bench_grid.py --from-results results   # summarise runs already finished there

Runs ``run_all.py`` (same options) into a fresh results folder, so nothing is skipped, then prints,
for each method, the number of runs, the mean and max seconds per run (train / eval split) and the
total, and the whole grid's wall time. Any extra option is passed to run_all.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def summarise(results: Path) -> str:
    rows = defaultdict(list)
    for p in sorted(results.glob("runs/*/*/*/result.json")):
        r = json.loads(p.read_text())
        rows[r.get("label") or r["method"]].append(r["cost"])
    lines = [f"{'method':<16}{'runs':>5}{'mean s/run':>12}{'train':>8}{'eval':>8}{'max':>8}{'total s':>9}"]
    grand = 0.0
    for m, costs in rows.items():
        tot = sum(c["total_seconds"] for c in costs)
        grand += tot
        n = len(costs)
        lines.append(f"{m:<16}{n:>5}{tot / n:>12.2f}{sum(c['train_seconds'] for c in costs) / n:>8.2f}"
                     f"{sum(c['eval_seconds'] for c in costs) / n:>8.2f}"
                     f"{max(c['total_seconds'] for c in costs):>8.2f}{tot:>9.1f}")
    lines.append(f"{'all runs':<16}{sum(len(v) for v in rows.values()):>5}{'':>44}{grand:>9.1f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-results", default=None, help="only summarise this results folder")
    args, rest = p.parse_known_args()
    if args.from_results:
        print(summarise(Path(args.from_results)))
        return 0
    from benchmark.cli import main as run_all

    out = Path(tempfile.mkdtemp(prefix="ossl-bench-"))
    t0 = time.time()
    rc = run_all(rest + ["--results-dir", str(out), "--no-figures"])
    wall = time.time() - t0
    print(summarise(out))
    print(f"grid wall time (including start-up and reports): {wall:.1f} s  [results in {out}]")
    return rc


if __name__ == "__main__":
    sys.exit(main())
