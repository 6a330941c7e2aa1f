#!/usr/bin/env python
"""Wall time of an experiment grid, per method and per run.

    python scripts/bench_grid.py                       # the default grid, in a fresh temp results dir
    python scripts/bench_grid.py --methods coop --seeds 1
    python scripts/bench_grid.py --from-results results   # summarise runs already finished there

Runs ``run_all.py`` (same options) into a fresh results folder, so nothing is skipped, then prints,
for each method, the number of runs, the mean and max seconds per run (train / eval split) and the
total, and the whole grid's wall time. Any extra option is passed to run_all.py.

``--paired`` runs the grid twice, method by method in alternation (so both sides share the machine's
load): once as the experiment runs by default (its speed options and its launcher: on the embedded
world two 1-thread processes) and once with every speed option off (``OFF_SETS``) in one process
(``--launcher inline``), into two fresh folders, then prints each method's total seconds of runs on
both sides (a run on 1 thread takes longer than on 2, so with the local launcher the wall ratio is
the one to read), the wall ratio, and whether the two sides' tables (``tables/*.md``) are identical.
Add ``--launcher inline`` to compare the speed options alone, both sides in one process.
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


def _costs(results: Path) -> dict:
    """label -> the ``cost`` records of its finished runs under ``results``."""
    from benchmark.report import read_result

    rows = defaultdict(list)
    for p in sorted(results.glob("runs/*/*/*/result.json")):
        r = read_result(p)
        rows[r.get("label") or r["method"]].append(r["cost"])
    return rows


def summarise(results: Path) -> str:
    rows = _costs(results)
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


# every speed option off: the official-shaped path (the options and their defaults: README)
OFF_SETS = ["train.short_text=false", "train.sdpa_blocks=false", "eval.memo_mb=0", "data.batch_normalize=false",
            "data.cached_views=0", "cfsg_clip.params.batch_passes=false"]


def _method_seconds(results: Path) -> dict:
    return defaultdict(float, {m: sum(c["total_seconds"] for c in costs) for m, costs in _costs(results).items()})


def paired(rest) -> int:
    from benchmark.cli import main as run_all
    from benchmark.experiment import DEFAULT_EXPERIMENT, expand_methods, load_experiment

    exp_name = rest[rest.index("--experiment") + 1] if "--experiment" in rest else DEFAULT_EXPERIMENT
    if "--methods" in rest:
        i = rest.index("--methods")
        methods, rest = rest[i + 1].split(","), rest[:i] + rest[i + 2:]
    else:
        methods = expand_methods(load_experiment(exp_name).get("methods") or "all")
    on, off = Path(tempfile.mkdtemp(prefix="ossl-bench-on-")), Path(tempfile.mkdtemp(prefix="ossl-bench-off-"))
    rc = 0
    wall = {"on": 0.0, "off": 0.0}
    for k, m in enumerate(methods):
        off_args = ([] if "--launcher" in rest else ["--launcher", "inline"]) + sum((["--set", s] for s in OFF_SETS), [])
        sides = [("on", on, []), ("off", off, off_args)]
        for name, folder, extra in (sides if k % 2 == 0 else sides[::-1]):
            t0 = time.time()
            rc |= run_all(rest + extra + ["--methods", m, "--results-dir", str(folder), "--no-figures"])
            wall[name] += time.time() - t0
    # each call above wrote tables of its own method only: rebuild both sides' tables from every run
    # (with the side's settings, so that every run's config hash matches)
    for name, folder, extra in sides:
        rc |= run_all(rest + extra + ["--methods", ",".join(methods), "--results-dir", str(folder),
                                      "--report-only", "--no-figures"])
    s_on, s_off = _method_seconds(on), _method_seconds(off)
    print(f"{'method':<16}{'default s':>10}{'all off s':>10}{'speed-up':>10}")
    for m in s_off:
        print(f"{m:<16}{s_on.get(m, 0):>10.1f}{s_off[m]:>10.1f}{s_off[m] / max(s_on.get(m, 0), 1e-9):>9.2f}x")
    print(f"{'runs total':<16}{sum(s_on.values()):>10.1f}{sum(s_off.values()):>10.1f}"
          f"{sum(s_off.values()) / max(sum(s_on.values()), 1e-9):>9.2f}x")
    print(f"{'wall':<16}{wall['on']:>10.1f}{wall['off']:>10.1f}{wall['off'] / max(wall['on'], 1e-9):>9.2f}x")
    diff = [p.name for p in sorted((off / "tables").glob("*.md"))
            if not (on / "tables" / p.name).exists() or (on / "tables" / p.name).read_text() != p.read_text()]
    print("tables identical" if not diff else f"tables that differ: {', '.join(diff)}")
    print(f"[results in {on} and {off}]")
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-results", default=None, help="only summarise this results folder")
    p.add_argument("--paired", action="store_true", help="default speed options vs all off, alternating")
    args, rest = p.parse_known_args()
    if args.from_results:
        print(summarise(Path(args.from_results)))
        return 0
    if args.paired:
        return paired(rest)
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
