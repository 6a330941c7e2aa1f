#!/usr/bin/env python
"""Where a grid's wall time goes, per method: ``bench_speed.py --profile`` (or this script).

    python scripts/bench_speed.py --profile                                   # the default grid
    python scripts/bench_speed.py --profile --datasets synth_cub --seeds 1    # a slice of it
    python scripts/bench_speed.py --profile --set train.epochs=4 --json p.json

Runs ``run_all.py`` (every extra option is passed on) into a fresh temporary results folder, in this
process, with timers around the engine's and the backbone's public pieces (never a method by name),
and prints, per method, the mean seconds per run of each part:

* ``load``: the backbone (loaded once per process, deep-copied for methods that edit it), the
  dataset (rendered once per process for the embedded world) and the run's split manifest;
* ``setup``: building the method (its text classifier, if any) and ``Method.setup`` with the
  engine's frozen features (computed once per backbone and dataset, then read from disk);
* ``train``, split into ``data`` (loading and augmenting the step's images, collation, view-cache
  lookups), ``text`` and ``image`` (forward passes of the text and image towers, with or without
  gradient), ``loss`` (the rest of ``training_step`` and of the generic SSL loop: heads, losses,
  Sinkhorn...), ``backward``, ``optim`` (optimiser step and ``zero_grad``) and ``other`` (schedule,
  logs, checkpoints);
* ``eval``, split into ``data`` (test-view images), ``image`` / ``text`` (tower passes) and ``rest``
  (heads and metrics);
* ``write``: predictions, learned state, result files and the run's environment record;
* ``other``: what the timers do not cover (config hashing, locks...).

Timers are exclusive: a tower pass inside ``training_step`` counts as ``image`` and not as ``loss``.
The clock is ``time.perf_counter``; on CUDA each timed piece synchronises the device first (which
slows an asynchronous run slightly). ``--json FILE`` keeps the per-run records.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (phase, part) columns of the table, in print order
COLUMNS = [("load", ""), ("setup", ""), ("train", "data"), ("train", "text"), ("train", "image"),
           ("train", "loss"), ("train", "backward"), ("train", "optim"), ("train", "other"),
           ("eval", "data"), ("eval", "text"), ("eval", "image"), ("eval", "rest"), ("write", ""),
           ("other", "")]


class Profiler:
    """Exclusive timers on a stack: each timed call's own time, its timed callees' excluded."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.stack: List[list] = []  # [key, start, time in timed callees]
        self.run: Dict[tuple, float] = defaultdict(float)
        self.phase = "other"

    def key(self, part: str) -> tuple:
        """The (phase, part) column a timed call's own time goes to."""
        phase = self.phase
        if part in ("load", "setup", "write"):
            return (part, "")
        if phase == "train":
            return ("train", "other" if part == "phase" else part)
        if phase == "eval":
            return ("eval", part if part in ("data", "text", "image") else "rest")
        if phase == "setup":  # Method.setup with its frozen features (tower passes included)
            return ("setup", "")
        return ("setup", "") if part in ("data", "text", "image") else ("other", "")

    def wrap(self, fn: Callable, part: str, phase: str = "") -> Callable:
        prof = self

        def timed(*args, **kwargs):
            old = prof.phase
            if phase:
                prof.phase = phase
            key = prof.key("phase" if phase else part)
            prof.sync()
            frame = [key, time.perf_counter(), 0.0]
            prof.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                prof.sync()
                total = time.perf_counter() - frame[1]
                prof.stack.pop()
                prof.run[key] += total - frame[2]
                if prof.stack:
                    prof.stack[-1][2] += total
                prof.phase = old

        timed.__wrapped__ = fn
        return timed


def install(prof: Profiler) -> None:
    """Wrap the engine's and the backbone's pieces (class attributes: every instance sees them)."""
    import torch

    import benchmark.engine as E
    import benchmark.loader as L
    from benchmark.backbone import CLIPBackbone
    from benchmark.registry import METHODS

    def patch(owner, name, part, phase=""):
        setattr(owner, name, prof.wrap(getattr(owner, name), part, phase))

    patch(E.Engine, "backbone", "load")
    patch(E.Engine, "dataset", "load")
    patch(E, "load_or_create", "load")
    patch(E.Engine, "_setup", "setup", phase="setup")
    patch(E.Engine, "_train", "train", phase="train")
    patch(E.Engine, "_predict_all", "eval", phase="eval")
    patch(E.Engine, "_metrics", "eval", phase="eval")
    patch(E.Engine, "_save_patch_selection", "write")
    for name in ("atomic_savez", "atomic_torch_save", "atomic_write_json", "environment"):
        patch(E, name, "write")
    patch(L.ViewDataset, "__getitem__", "data")
    patch(L, "_collate", "data")
    patch(L.ViewFeatureCache, "lookup", "data")
    patch(L.ViewFeatureCache, "ensure", "data")
    patch(CLIPBackbone, "encode_image", "image")
    patch(CLIPBackbone, "encode_text_embeddings", "text")
    patch(torch.Tensor, "backward", "backward")
    from benchmark.method import Method

    done = set()
    for _, plugin in METHODS.items():  # each plugin's (and its bases') __init__ and training_step
        for cls in plugin.__mro__:
            if cls in done or not issubclass(cls, Method) or cls is Method:
                continue
            done.add(cls)
            if "__init__" in vars(cls):
                patch(cls, "__init__", "setup")
            if "training_step" in vars(cls):
                patch(cls, "training_step", "loss")
    real_opt = E.make_optimizer

    def make_optimizer(groups, tc):
        opt = real_opt(groups, tc)
        opt.step = prof.wrap(opt.step, "optim")
        opt.zero_grad = prof.wrap(opt.zero_grad, "optim")
        return opt

    E.make_optimizer = make_optimizer
    real_run = E.Engine._run

    def run(self, cfg, d, chash):
        prof.run = defaultdict(float)
        prof.phase = "other"
        t0 = time.perf_counter()
        out = real_run(self, cfg, d, chash)
        total = time.perf_counter() - t0
        rec = {"method": cfg.label, "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed,
               "total": total, "parts": {f"{a}/{b}" if b else a: v for (a, b), v in prof.run.items()}}
        covered = sum(prof.run.values())
        rec["parts"]["other"] = rec["parts"].get("other", 0.0) + max(0.0, total - covered)
        prof.records.append(rec)
        return out

    prof.records = []
    E.Engine._run = run


def table(records: List[dict]) -> str:
    by = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    cols = [f"{a}/{b}" if b else a for a, b in COLUMNS]
    short = {"load": "load", "setup": "setup", "train/data": "t.data", "train/text": "t.text",
             "train/image": "t.image", "train/loss": "t.loss", "train/backward": "t.bwd",
             "train/optim": "t.opt", "train/other": "t.oth", "eval/data": "e.data", "eval/text": "e.text",
             "eval/image": "e.image", "eval/rest": "e.rest", "write": "write", "other": "other"}
    lines = [f"{'method':<14}{'runs':>5}{'s/run':>7}" + "".join(f"{short[c]:>8}" for c in cols)]
    grand = defaultdict(float)
    n_all = 0
    for m, rs in by.items():
        n = len(rs)
        n_all += n
        sums = defaultdict(float)
        for r in rs:
            for k, v in r["parts"].items():
                sums[k] += v
                grand[k] += v
        tot = sum(r["total"] for r in rs)
        grand["_total"] += tot
        lines.append(f"{m:<14}{n:>5}{tot / n:>7.2f}" + "".join(f"{sums[c] / n:>8.3f}" for c in cols))
    tot = grand["_total"]
    lines.append(f"{'all (s)':<14}{n_all:>5}{tot:>7.1f}" + "".join(f"{grand[c]:>8.1f}" for c in cols))
    lines.append(f"{'all (%)':<14}{'':>5}{100.0:>7.0f}" + "".join(f"{100 * grand[c] / max(tot, 1e-9):>8.1f}"
                                                                 for c in cols))
    lines.append("seconds per run (mean over the method's runs), exclusive: t.* = training (data, text tower, "
                 "image tower, loss and heads, backward, optimiser, other), e.* = evaluation (data, text "
                 "tower, image tower, heads and metrics); the last rows: the grid's total seconds and shares")
    return "\n".join(lines)


GROUPS = [("load + setup", ("load", "setup")), ("train: data", ("train/data",)),
          ("train: text tower", ("train/text",)), ("train: image tower", ("train/image",)),
          ("train: backward", ("train/backward",)),
          ("train: loss, optimiser, rest", ("train/loss", "train/optim", "train/other")),
          ("eval: data", ("eval/data",)), ("eval: towers, heads, metrics", ("eval/text", "eval/image", "eval/rest")),
          ("write + other", ("write", "other"))]


def markdown(records: List[dict]) -> str:
    """The table as Markdown, parts grouped (README): seconds per run, and the grid's shares."""
    by = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    lines = ["| method | s/run | " + " | ".join(g for g, _ in GROUPS) + " |",
             "|---|---:|" + "---:|" * len(GROUPS)]
    grand = defaultdict(float)
    for m, rs in by.items():
        n = len(rs)
        sums = defaultdict(float)
        for r in rs:
            for k, v in r["parts"].items():
                sums[k] += v
                grand[k] += v
            grand["_total"] += r["total"]
        lines.append(f"| {m} | {sum(r['total'] for r in rs) / n:.2f} | "
                     + " | ".join(f"{sum(sums[k] for k in ks) / n:.2f}" for _, ks in GROUPS) + " |")
    tot = grand["_total"]
    lines.append(f"| all runs (s, share) | {tot:.0f} | " + " | ".join(
        f"{sum(grand[k] for k in ks):.0f} ({100 * sum(grand[k] for k in ks) / max(tot, 1e-9):.0f} %)"
        for _, ks in GROUPS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the per-run records here")
    p.add_argument("--results-dir", default=None, help="default: a fresh temporary folder")
    p.add_argument("--from-json", default=None, help="only print the table of a --json file's runs")
    p.add_argument("--markdown", action="store_true", help="with --from-json: a Markdown table, parts grouped")
    p.add_argument("--only-datasets", default=None, help="with --from-json: keep only these datasets' runs")
    p.add_argument("--runs", default=None, help="with --from-json: keep only the runs of these seeds "
                   "(e.g. 1 or 1,2), to compare a slice of a full grid's profile with a profile of the slice")
    args, rest = p.parse_known_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        recs = data["runs"]
        if args.runs:
            keep = {int(x) for x in args.runs.split(",")}
            recs = [r for r in recs if r["seed"] in keep]
        if args.only_datasets:
            recs = [r for r in recs if r["dataset"] in args.only_datasets.split(",")]
        print(f"profile of {args.from_json} ({' '.join(data.get('argv', [])) or 'the default grid'}"
              f"{', seeds ' + args.runs if args.runs else ''}"
              f"{', datasets ' + args.only_datasets if args.only_datasets else ''}):")
        print(markdown(recs) if args.markdown else table(recs))
        return 0
    import torch

    from benchmark.cli import main as run_all

    sync = (lambda: torch.cuda.synchronize()) if torch.cuda.is_available() else (lambda: None)
    prof = Profiler(sync)
    install(prof)
    out = Path(args.results_dir) if args.results_dir else Path(tempfile.mkdtemp(prefix="ossl-profile-"))
    t0 = time.perf_counter()
    # the profiler hooks this process: the runs must run here, whatever the experiment's launcher
    inline = [] if "--launcher" in rest else ["--launcher", "inline"]
    rc = run_all(rest + inline + ["--results-dir", str(out), "--no-figures"])
    wall = time.perf_counter() - t0
    print()
    print(table(prof.records))
    runs = sum(r["total"] for r in prof.records)
    print(f"grid wall time {wall:.1f} s: runs {runs:.1f} s, outside runs (start-up of the grid, "
          f"reports) {wall - runs:.1f} s  [results in {out}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": rest, "wall_s": wall, "runs": prof.records}, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
