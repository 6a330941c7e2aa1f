#!/usr/bin/env python
"""Tune an embedded preset on VALIDATION data only: run a grid of settings with ``eval.split=val``
and print each setting's validation metrics.

    python scripts/sweep_embedded.py --methods coop --grid train.lr=0.02,0.05 --grid train.epochs=5,10
    python scripts/sweep_embedded.py --methods cfsg_clip --grid train.iterations=40,80 --seeds 1 --shots 20
    python scripts/sweep_embedded.py --from-results results_sweep          # only print the table

Every combination of the ``--grid`` values (cartesian product; ``key=v1,v2,...``, keys as for
``run_all.py --set``) runs the experiment's grid (default: ``embedded``, restricted by --methods,
--datasets, --shots, --seeds) with ``eval.split=val``: trained on the usual labeled set and
unlabeled pool, evaluated on the synthetic datasets' validation split (disjoint from train and test,
drawn like test), never on the test split. Each setting gets its own folder under --results-dir.
The table reads only runs whose resolved config says ``eval.split: val`` and refuses anything else,
so a preset's YAML comment can quote it: validation figures, never test figures.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ("acc", "auroc")


def _csv(v: str) -> List[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def settings(grid: List[str]) -> List[List[str]]:
    """The cartesian product of ``key=v1,v2`` entries as lists of ``key=value`` strings."""
    axes = []
    for g in grid:
        if "=" not in g:
            raise SystemExit(f"--grid expects key=v1,v2,... (e.g. train.lr=0.01,0.05), got {g!r}")
        key, values = g.split("=", 1)
        if key.strip().split(".")[-1] == "split" and "eval" in key:
            raise SystemExit("--grid cannot set eval.split: a sweep evaluates on the validation split only")
        axes.append([f"{key.strip()}={v}" for v in _csv(values)])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def slug(sets: List[str]) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9_.=-]", "_", s) for s in sets) or "preset"


def collect(results: Path) -> Dict[Tuple[str, str], Dict[str, Dict[str, List[float]]]]:
    """{(setting, label): {dataset: {metric: [values over seeds and shots]}}} of validation runs."""
    from benchmark.report import read_result

    out: Dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for p in sorted(results.glob("*/runs/*/*/*/result.json")):
        r = read_result(p)
        split = r["config"]["eval"].get("split", "test")
        if split != "val":
            raise SystemExit(f"{p} was evaluated on the {split!r} split: a sweep reads validation runs only")
        setting = p.parts[len(results.parts)]
        for m in METRICS:
            out[(setting, r["label"])][r["dataset"]][m].append(r["metrics"][m])
    return out


def table(results: Path) -> str:
    data = collect(results)
    if not data:
        return f"no validation runs under {results}"
    datasets = sorted({d for v in data.values() for d in v})
    head = "| setting | method | " + " | ".join(f"{d} acc" for d in datasets) + " | mean acc | mean AUROC | runs |"
    lines = ["validation split (eval.split=val), mean over seeds and shots",
             head, "|" + "---|" * (len(datasets) + 5)]
    for (setting, label), per_ds in sorted(data.items()):
        accs = [mean(per_ds[d]["acc"]) for d in datasets if d in per_ds]
        aurocs = [mean(per_ds[d]["auroc"]) for d in datasets if d in per_ds]
        n = sum(len(per_ds[d]["acc"]) for d in per_ds)
        cells = [f"{mean(per_ds[d]['acc']):.1f}" if d in per_ds else "-" for d in datasets]
        lines.append(f"| {setting} | {label} | " + " | ".join(cells)
                     + f" | {mean(accs):.1f} | {mean(aurocs):.1f} | {n} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="embedded")
    p.add_argument("--methods", type=_csv)
    p.add_argument("--datasets", type=_csv)
    p.add_argument("--shots", type=_csv)
    p.add_argument("--seeds", type=_csv)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept setting (repeat for a cartesian product)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed override for every setting")
    p.add_argument("--results-dir", default=str(ROOT / "results_sweep"))
    p.add_argument("--from-results", default=None, help="only print the table of this sweep folder")
    args = p.parse_args()
    if args.from_results:
        print(table(Path(args.from_results)))
        return 0
    if any(s.split("=", 1)[0].endswith("eval.split") for s in args.sets):
        raise SystemExit("--set eval.split is not allowed: a sweep evaluates on the validation split only")
    from benchmark.engine import Engine
    from benchmark.experiment import build_grid, load_experiment

    exp = load_experiment(args.experiment)
    results = Path(args.results_dir)
    failed = 0
    for combo in settings(args.grid):
        grid = build_grid(exp, args.methods, args.datasets, args.shots, args.seeds,
                          args.sets + combo + ["eval.split=val"])
        engine = Engine(results / slug(combo))
        for c in grid.runs:
            try:
                r = engine.run(c)
            except Exception as exc:  # noqa: BLE001 - one failed run must not stop the sweep
                failed += 1
                print(f"FAILED {slug(combo)} {c.dataset}/{c.label}/{c.shots}/{c.seed}: {exc}", file=sys.stderr)
                continue
            print(f"{slug(combo)} {c.dataset}/{c.label} {c.shots}-shot seed {c.seed}: "
                  f"val acc {r['metrics']['acc']:.2f} auroc {r['metrics']['auroc']:.2f}", flush=True)
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
