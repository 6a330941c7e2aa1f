"""``python run_all.py``: run an experiment grid, then write the summary, tables and figures.

Finished runs are skipped; unfinished ones resume from their checkpoint; a finished run whose
config hash differs is refused unless ``--force`` (the old result is archived, never overwritten).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import List, Optional

from . import ROOT


def _csv(v: str) -> List[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=None,
                   help="experiment name in configs/experiments/ or a YAML path (default: embedded)")
    p.add_argument("--methods", type=_csv, help="comma-separated method names (default: the experiment's)")
    p.add_argument("--datasets", type=_csv, help="comma-separated dataset names")
    p.add_argument("--shots", type=_csv, help="e.g. 5,20")
    p.add_argument("--seeds", type=_csv, help="e.g. 1,2,3")
    p.add_argument("--results-dir", default=str(ROOT / "results"), help="where runs, tables and figures go")
    p.add_argument("--data-root", default=None, help="folder holding the real datasets")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, wins over every YAML (train.epochs=5, coop.params.n_ctx=4)")
    p.add_argument("--list", action="store_true", help="list registered methods, datasets, experiments")
    p.add_argument("--dry-run", action="store_true", help="print the grid and each run's status")
    p.add_argument("--status", action="store_true", help="show complete / partial / failed / missing runs")
    p.add_argument("--force", action="store_true", help="rerun runs whose config changed (archives the old)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary, tables and figures")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    from .launch import add_arguments
    add_arguments(p)  # --launcher inline|local|slurm and its resources (benchmark/launch.py)
    return p


def do_list() -> None:
    from .experiment import known_experiments, method_sets
    from .registry import DATASETS, METHODS

    print("methods:")
    paper = method_sets().get("paper", [])
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        flag = "" if name in paper else "  [not a paper method: runs when named]"
        print(f"  {name:<16} {doc[0] if doc else ''}{flag}")
    print("datasets:")
    for name, cls in DATASETS.items():
        need = " (needs --data-root)" if cls.needs_root else ""
        print(f"  {name:<16} {cls.description}{need}")
    print("experiments:")
    for name in known_experiments():
        print(f"  {name}")


def caption_lines(exp) -> List[str]:
    """The experiment's ``caption`` (a string or a list of strings) as lines for the tables."""
    cap = exp.get("caption") or []
    return [cap] if isinstance(cap, str) else [str(c) for c in cap]


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .engine import Engine
    from .errors import BenchmarkError, RunLockedError
    from .experiment import DEFAULT_EXPERIMENT, build_grid, load_experiment
    from . import report

    try:
        if args.list:
            do_list()
            return 0
        exp = load_experiment(args.experiment or DEFAULT_EXPERIMENT)
        grid = build_grid(exp, args.methods, args.datasets, args.shots, args.seeds, args.sets,
                          args.data_root, args.device)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results_dir)
    if not (args.dry_run or args.status):
        problem = unwritable(results)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    engine = Engine(results, force=args.force)
    runs = grid.runs
    from .launch import cell_key, cell_label
    label = lambda c: cell_label(cell_key(c))  # noqa: E731
    print(f"experiment {exp['name']}: {len(grid.methods)} methods x {len(grid.datasets)} datasets x "
          f"shots {grid.shots} x seeds {grid.seeds} = {len(runs)} runs -> {results}")
    if args.dry_run or args.status:
        return show_status(engine, runs, label, args.dry_run, args.force)
    failed = []
    busy = []  # runs another live process holds: waited for after ours
    from .launch import launcher_kind
    try:
        args.launcher = launcher_kind(exp, args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.report_only and args.launcher != "inline":
        from .launch import run_grid
        try:
            failed = run_grid(args, exp, grid, results)
        except BenchmarkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if failed is None:  # --no-wait: the jobs build nothing; --report-only does once they end
            return 0
    elif not args.report_only:
        todo = [c for c in runs if engine.status(c) != "complete"]
        print(f"{len(runs) - len(todo)} complete, {len(todo)} to run")
        per_method = defaultdict(list)
        t_grid = time.time()
        for i, c in enumerate(todo):
            known = [t for ts in per_method.values() for t in ts]
            rest = todo[i:]
            eta = sum((sum(per_method[r.label]) / len(per_method[r.label])) if per_method[r.label]
                      else (sum(known) / len(known) if known else 0.0) for r in rest)
            eta_s = f", about {_fmt_s(eta)} left" if known else ""
            print(f"[{i + 1}/{len(todo)}] {label(c)}{eta_s}", flush=True)
            t0 = time.time()
            try:
                r = engine.run(c)
            except KeyboardInterrupt:
                print("interrupted: rerun the same command to resume", file=sys.stderr)
                return 130
            except RunLockedError as exc:
                print(f"  running in process {exc.pid}: its result is awaited at the end")
                busy.append(c)
                continue
            except Exception as exc:  # noqa: BLE001 - one failed run must not stop the grid
                failed.append((label(c), exc))
                print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                if not isinstance(exc, BenchmarkError):
                    traceback.print_exc()
                if args.fail_fast:
                    break
                continue
            dt = time.time() - t0
            per_method[c.label].append(dt)
            m = r["metrics"]
            print(f"  acc {m['acc']:.2f}  ba {m['ba_closed']:.2f}  auroc {m['auroc']:.2f}  ({dt:.1f}s)")
        if todo:
            print(f"grid finished in {_fmt_s(time.time() - t_grid)}")
        if busy and not (failed and args.fail_fast):
            try:
                failed += await_others(engine, busy, label)
            except KeyboardInterrupt:
                print("interrupted: rerun the same command to resume", file=sys.stderr)
                return 130
    incomplete = [(c, engine.status(c)) for c in runs]
    incomplete = [(c, st) for c, st in incomplete if st != "complete"]
    if incomplete:
        # tables only from a complete, single-config grid: the old ones are marked stale
        stale = report.mark_stale(results, [f"{label(c)}: {st}" for c, st in incomplete])
        print(f"tables not written: {len(incomplete)} of {len(runs)} runs are not complete"
              + (f"; the previous summary, tables and figures were renamed *.stale ({len(stale)} files)"
                 if stale else ""), file=sys.stderr)
        for c, st in incomplete[:20]:
            print(f"  [{st:>8}] {label(c)}", file=sys.stderr)
        if len(incomplete) > 20:
            print(f"  ... and {len(incomplete) - 20} more (--status lists them)", file=sys.stderr)
    else:
        rc = write_reports(report, engine, grid, exp, runs, results, args.no_figures)
        if rc:
            return rc
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for name, exc in failed:
            print(f"  {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 1 if incomplete else 0


def write_reports(report, engine, grid, exp, runs, results: Path, no_figures: bool) -> int:
    """Tables, then summary.csv, then figures, from the grid's (complete) runs. A table that
    refuses the cells (mixed configurations) leaves every output untouched but marked stale."""
    from .engine import run_dir
    from .errors import BenchmarkError

    paths = [run_dir(results, c) / "result.json" for c in runs]
    try:
        df = report.collect(paths)
        ddof = int((exp.get("table") or {}).get("std_ddof", 0))
        written = report.write_tables(df, results / "tables", grid.methods, grid.datasets, grid.shots,
                                      ddof, n_seeds=len(grid.seeds), notes=caption_lines(exp))
        if exp.get("_curve_points"):
            written += report.write_curve(df, results / "tables", None if no_figures else results / "figures",
                                          exp["_curve_points"], exp["curve"].get("label") or exp["curve"]["key"],
                                          caption_lines(exp))
        report.write_summary(df, results / "summary.csv")
        if not no_figures:
            written += report.write_figures(df, results / "figures", grid.methods, grid.datasets, grid.shots)
            order = sorted(runs, key=lambda c: (-c.shots, c.seed))  # prefer the most-shot, first seed
            written += report.write_patch_figures([run_dir(results, c) for c in order], results / "figures")
    except BenchmarkError as exc:
        report.mark_stale(results, [str(exc)])
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.clear_stale(results)
    print(f"wrote {results / 'summary.csv'} and {len(written)} table/figure files")
    md = results / "tables" / "table1_acc.md"
    if md.exists():
        print(md.read_text())
    return 0


def unwritable(results: Path) -> Optional[str]:
    """Why the results directory cannot be written (None when it can): checked once, up front."""
    import tempfile

    try:
        results.mkdir(parents=True, exist_ok=True)
        for d in [results] + [results / n for n in ("runs", "splits", "tables", "figures") if (results / n).is_dir()]:
            with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
                pass
    except OSError as exc:
        return (f"the results directory {results} is not writable ({type(exc).__name__}: "
                f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}). Fix its "
                f"permissions or free space, or choose another --results-dir.")
    return None


def show_status(engine, runs, label, dry_run: bool, force: bool) -> int:
    """``--status`` / ``--dry-run``: each run's state, the damaged files and why; ``--dry-run`` also
    checks what each pending run needs (dataset root and layout, shots per class) and returns 1 if
    any run would fail."""
    from .checks import data_problem
    from .protocol import manifest_problem

    counts, would_fail, memo, manifests, said = Counter(), 0, {}, set(), set()
    for c in runs:
        st, damaged = engine.status_and_damage(c)
        counts[st] += 1
        notes = [f"{p.name}: {why} (quarantined and redone by the next run)" for p, why in damaged]
        bad = manifest_problem(engine.results_dir, c.dataset, c.shots, c.seed, c.eval.split)
        if bad and bad[0] not in manifests:
            manifests.add(bad[0])
            print(f"  damaged split manifest {bad[0]}: {bad[1]} (set aside and rewritten by the next run)")
        fail = None
        if dry_run and st != "complete":
            fail = data_problem(engine, c, memo)
            if fail is None and st == "stale" and not force:
                fail = "finished with another config: pass --force to rerun it (the old result is archived)"
        if dry_run or st != "complete" or notes:
            shown = fail
            if fail and fail in said:  # a problem shared by many runs is explained once
                shown = fail.splitlines()[0] + " (as above)"
            said.add(fail)
            print(f"  [{st:>8}] {label(c)}" + (f"  WOULD FAIL: {shown}" if fail else ""))
            for n in notes:
                print(f"             {n}")
        would_fail += fail is not None
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    stale = engine.results_dir / "tables" / "STALE.txt"
    if stale.exists():
        print(f"tables: stale (the last run_all.py could not rebuild them; why: {stale})")
    if would_fail:
        print(f"{would_fail} run(s) would fail (see WOULD FAIL above)", file=sys.stderr)
        return 1
    return 0


def await_others(engine, busy, label, poll_s: float = 2.0) -> list:
    """Wait until no other live process holds any of ``busy`` (runs they were running when we
    reached them), then run those still not complete (their runner died). Returns the failures."""
    from .engine import RunLock, run_dir

    def holder(c):  # "pid@host" of the live process holding the run (RunLock.holder), not ours
        who = RunLock.holder(run_dir(engine.results_dir, c))
        return who if who and who != RunLock.me() else None

    said = False
    while True:
        holders = [holder(c) for c in busy]
        held = set(holders) - {None}
        if not held:
            break
        if not said:
            n = sum(h is not None for h in holders)
            print(f"waiting for {n} run(s) held by process(es) {', '.join(map(str, sorted(held)))}",
                  flush=True)
            said = True
        time.sleep(poll_s)
    failed = []
    for c in busy:
        if engine.status(c) == "complete":
            continue
        print(f"[rerun] {label(c)} (its other runner stopped)", flush=True)
        try:
            engine.run(c)
        except Exception as exc:  # noqa: BLE001 - as in the main loop
            failed.append((label(c), exc))
            print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    return failed
