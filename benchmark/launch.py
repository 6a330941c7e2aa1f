"""``run_all.py --launcher local|slurm``: the grid as submitit jobs (one job array per grid).

Each array task runs one grid cell, or a pack of cells (``pack``), through the same code as the
inline loop: :func:`benchmark.experiment.build_grid` for that cell, then :meth:`Engine.run` (same
result files, same run lock, same resume from the last checkpoint). Cells already complete are
never submitted. Tasks are :class:`submitit.helpers.Checkpointable`: on SLURM's time-limit or
preemption signal submitit requeues the task, which resumes from the engine's last checkpoint.
A task that ends without a result (a real error, or killed) is resubmitted at most ``retries``
times by the waiting launcher; after that the cell is reported failed with its error. When every
task has ended the launcher builds the tables (or, with ``--no-wait``, the user does with
``--report-only``).

Resources come from the experiment YAML's ``launcher:`` section, overridden by the command line:

    launcher:
      gpus: 1              # GPUs per task (SLURM --gpus-per-node; local: CUDA_VISIBLE_DEVICES)
      cpus: 8              # CPUs per task (SLURM --cpus-per-task); also the task's torch threads
      mem_gb: 32           # memory per task
      time: "8:00:00"      # time limit per task: minutes, H:MM:SS or D-HH:MM:SS
      partition: gpu
      account: my_lab
      qos: normal
      sbatch: {constraint: a100, mail-type: END}   # any other sbatch option, verbatim
      setup: ["module load cuda/12.4", "source ~/venvs/ossl/bin/activate"]  # lines before srun
      kind: slurm          # the launcher when the command line names none (inline | local | slurm;
                           # absent: inline)
      array_parallelism: 16   # tasks running at once (SLURM's %N; local: processes at once; local
                              # also takes auto: the usable CPU cores // cpus)
      pack: 1              # grid cells per task (auto: the cells to run / tasks at once, rounded
                           # up: one task per process slot)
      retries: 2           # resubmissions of a cell whose task ended without a result
      max_num_timeout: 3   # requeues after hitting the time limit (preemptions are not counted)
      signal_delay_s: 120  # SLURM sends the requeue signal this long before the time limit
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import ROOT
from .errors import BenchmarkError, ConfigError, nearest

LAUNCHERS = ("inline", "local", "slurm")
_ENV_LOCK = threading.Lock()  # os.environ is edited around a submission (launchers in threads: tests)
# the experiment's launcher: keys; the values we use when neither the YAML nor the CLI gives one
DEFAULTS: Dict[str, Any] = {
    "kind": None,  # None: inline, unless --launcher says otherwise
    "gpus": None, "cpus": None, "mem_gb": None,
    "time": 24 * 60,  # our default: one day per task (local's own default of 2 min would kill runs)
    "partition": None, "account": None, "qos": None, "sbatch": {}, "setup": [],
    "array_parallelism": None,  # SLURM: submitit's default (256); local: 1 process at a time
    "pack": 1,
    "retries": 2,  # our default: a transient failure (node, file system) gets two more chances
    "max_num_timeout": 3,  # submitit's default
    "signal_delay_s": 120,  # our default: time to finish a step and leave; checkpoints are periodic
}
CLI_KEYS = {"gpus": "gpus", "cpus": "cpus", "mem_gb": "mem_gb", "time": "time", "partition": "partition",
            "account": "account", "qos": "qos", "array_parallelism": "array_parallelism", "pack": "pack",
            "retries": "retries"}
CellKey = Tuple[str, str, int, int]  # (label, dataset, shots, seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher (submitit): resources override the experiment's launcher: section")
    g.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="inline: this process, one run after another; local: submitit "
                        "subprocesses on this machine; slurm: one SLURM job array (default: the "
                        "experiment's launcher: kind, else inline)")
    g.add_argument("--gpus", type=int, help="GPUs per task")
    g.add_argument("--cpus", type=int, help="CPUs per task (also the task's torch threads)")
    g.add_argument("--mem-gb", dest="mem_gb", type=float, help="memory per task, GB")
    g.add_argument("--time", help="time limit per task: minutes, H:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option (repeatable), e.g. --sbatch constraint=a100")
    g.add_argument("--array-parallelism", dest="array_parallelism", type=int,
                   help="tasks running at once")
    g.add_argument("--pack", type=int, help="grid cells per task (the embedded world's runs take seconds)")
    g.add_argument("--retries", type=int, help="resubmissions of a cell whose task ended without a result")
    g.add_argument("--no-wait", action="store_true",
                   help="submit and return; build the tables later with --report-only")


# -- options ----------------------------------------------------------------------------------
def parse_time(v: Any) -> int:
    """Minutes from a number of minutes or SLURM's time forms: ``M``, ``M:S``, ``H:M:S``, ``D-H``,
    ``D-H:M``, ``D-H:M:S`` (seconds are rounded up to a minute)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        minutes = int(-(-v // 1))
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(v).strip())
        parts = [int(x) for x in m.group(2).split(":")] if m else []
        if not m or (m.group(1) is not None and len(parts) > 3):
            raise ConfigError(f"launcher time {v!r}: expected minutes (90), H:MM:SS (1:30:00) or "
                              f"D-HH:MM:SS (2-00:00:00), as sbatch --time")
        if m.group(1) is not None:  # D-H[:M[:S]]
            h, mi, sec = (parts + [0, 0])[:3]
            minutes = int(m.group(1)) * 1440 + h * 60 + mi + (sec > 0)
        else:  # M | M:S | H:M:S
            h, mi, sec = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
            minutes = h * 60 + mi + (sec > 0)
    if minutes <= 0:
        raise ConfigError(f"launcher time {v!r} must be positive")
    return minutes


def options(exp: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """The launcher options: our defaults < the experiment's ``launcher:`` < the command line."""
    section = exp.get("launcher") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"experiment key launcher: expected a mapping of {', '.join(DEFAULTS)}, got {section!r}")
    for k in section:
        if k not in DEFAULTS:
            raise ConfigError(f"unknown launcher key {k!r}; did you mean {nearest(str(k), DEFAULTS)!r}? "
                              f"Valid keys: {', '.join(DEFAULTS)}.")
    opts = {**DEFAULTS, **{k: v for k, v in section.items() if v is not None}}
    opts["sbatch"] = dict(opts["sbatch"] or {})
    opts["setup"] = list(opts["setup"] or [])
    for attr, key in CLI_KEYS.items():
        v = getattr(args, attr, None)
        if v is not None:
            opts[key] = v
    for kv in getattr(args, "sbatch", None) or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--sbatch {kv!r}: expected KEY=VALUE, e.g. --sbatch constraint=a100")
        opts["sbatch"][k.strip().lstrip("-")] = v
    opts["time"] = parse_time(opts["time"])
    for k in ("pack", "array_parallelism", "gpus", "cpus"):
        if opts[k] == "auto" and k in ("pack", "array_parallelism"):
            continue
        if opts[k] is not None and (not isinstance(opts[k], int) or opts[k] < (0 if k == "gpus" else 1)):
            auto = " or auto" if k in ("pack", "array_parallelism") else ""
            raise ConfigError(f"launcher {k} must be a positive integer{auto}, got {opts[k]!r}")
    if not isinstance(opts["retries"], int) or opts["retries"] < 0:
        raise ConfigError(f"launcher retries must be an integer >= 0, got {opts['retries']!r}")
    return opts


def launcher_kind(exp: Dict[str, Any], args: argparse.Namespace) -> str:
    """The launcher to use: ``--launcher``, else the experiment's ``launcher: kind``, else inline."""
    kind = getattr(args, "launcher", None) or (exp.get("launcher") or {}).get("kind") or "inline"
    if kind not in LAUNCHERS:
        raise ConfigError(f"launcher kind {kind!r}: expected one of {', '.join(LAUNCHERS)} "
                          f"(did you mean {nearest(str(kind), LAUNCHERS)!r}?)")
    return kind


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_auto(kind: str, opts: Dict[str, Any], n_todo: int) -> Dict[str, Any]:
    """``array_parallelism: auto`` (local: one process slot per ``cpus`` usable cores) and ``pack:
    auto`` (the cells to run split evenly over the slots, in grid order: one task per slot, so each
    slot pays the process start once; on SLURM without a parallelism limit: one cell per task)."""
    opts = dict(opts)
    if opts["array_parallelism"] == "auto":
        if kind != "local":
            raise ConfigError("launcher array_parallelism: auto counts this machine's cores, so it "
                              "applies to --launcher local only; give SLURM a number")
        opts["array_parallelism"] = max(1, usable_cpus() // int(opts["cpus"] or 1))
    if opts["pack"] == "auto":
        lanes = opts["array_parallelism"] or (1 if kind == "local" else max(1, n_todo))
        opts["pack"] = max(1, -(-n_todo // lanes))
    return opts


def make_executor(kind: str, folder: Path, opts: Dict[str, Any], job_name: str):
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind,
                               slurm_max_num_timeout=int(opts["max_num_timeout"]))
    params: Dict[str, Any] = {"name": job_name, "timeout_min": opts["time"], "nodes": 1, "tasks_per_node": 1}
    if opts["gpus"] is not None:
        params["gpus_per_node"] = opts["gpus"]
    if opts["cpus"] is not None:
        params["cpus_per_task"] = opts["cpus"]
    if opts["mem_gb"] is not None:
        params["mem_gb"] = opts["mem_gb"]
    if kind == "slurm":
        for k in ("partition", "account", "qos"):
            if opts[k]:
                params[f"slurm_{k}"] = opts[k]
        if opts["array_parallelism"]:
            params["slurm_array_parallelism"] = opts["array_parallelism"]
        params["slurm_signal_delay_s"] = int(opts["signal_delay_s"])
        # tasks import this checkout's benchmark/ (not another installed copy)
        params["slurm_setup"] = [f"export PYTHONPATH={_shq(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
                                 *opts["setup"]]
        if opts["sbatch"]:
            params["slurm_additional_parameters"] = dict(opts["sbatch"])
    ex.update_parameters(**params)
    return ex


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(s)


# -- the task -----------------------------------------------------------------------------------
try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; without it only the inline launcher works
    _Checkpointable = object


class GridTask(_Checkpointable):
    """One array task: runs its cells with :meth:`Engine.run`, one after another.

    Checkpointable: on the requeue signal submitit pickles this callable with its arguments and
    requeues it; the new task skips its finished cells and resumes the unfinished one from the
    engine's checkpoint. Returns one outcome per cell (``ran``/``skipped``/``busy``/``failed``):
    a cell's error is reported, not raised, so one bad cell does not hide its pack's others."""

    def __init__(self, experiment: Dict[str, Any], results_dir: str, sets: List[str],
                 data_root: Optional[str], device: Optional[str], force: bool, threads: Optional[int]):
        self.experiment = experiment
        self.results_dir = results_dir
        self.sets = list(sets)
        self.data_root = data_root
        self.device = device
        self.force = force
        self.threads = threads

    def config(self, key: CellKey):
        from .experiment import build_grid

        label, ds, shots, seed = key
        grid = build_grid(self.experiment, [label], [ds], [shots], [seed], self.sets, self.data_root,
                          self.device)
        return grid.runs[0]

    def __call__(self, cells: List[Tuple[CellKey, str]]) -> List[Dict[str, Any]]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        from .config import config_hash
        from .engine import Engine
        from .errors import RunLockedError

        engine = Engine(self.results_dir, force=self.force)
        out = []
        for key, chash in cells:
            key = tuple(key)
            t0 = time.time()
            rec: Dict[str, Any] = {"cell": list(key)}
            try:
                cfg = self.config(key)
                if config_hash(cfg) != chash:
                    raise ConfigError(
                        f"the config of {cell_label(key)} changed after submission (hash {config_hash(cfg)}, "
                        f"submitted {chash}): a YAML was edited while the grid ran; rerun the launcher")
                if engine.status(cfg) == "complete":
                    rec["outcome"] = "skipped"
                else:
                    print(f"{cell_label(key)}", flush=True)
                    m = engine.run(cfg)["metrics"]
                    rec["outcome"] = "ran"
                    print(f"  acc {m['acc']:.2f}  ba {m['ba_closed']:.2f}  auroc {m['auroc']:.2f}  "
                          f"({time.time() - t0:.1f}s)", flush=True)
            except RunLockedError as exc:
                rec.update(outcome="busy", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - reported per cell, retried by the launcher
                # bad input (a BenchmarkError) fails the same way every time: not worth a retry
                rec.update(outcome="failed", error=f"{type(exc).__name__}: {exc}",
                           retry=not isinstance(exc, BenchmarkError))
                print(f"  FAILED: {rec['error']}", file=sys.stderr, flush=True)
                traceback.print_exc()
            rec["seconds"] = round(time.time() - t0, 3)
            out.append(rec)
        return out

    def checkpoint(self, *args: Any, **kwargs: Any):
        # the state worth keeping is the engine's checkpoint on disk: requeue the same cells
        print("requeue signal: the task will be requeued and resume from the last checkpoint", flush=True)
        return super().checkpoint(*args, **kwargs)


def cell_label(key: CellKey) -> str:
    """How the runners name a grid cell in their messages: ``<dataset>/<label>/<k>-shot/seed<s>``."""
    label, ds, shots, seed = key
    return f"{ds}/{label}/{shots}-shot/seed{seed}"


def cell_key(cfg) -> CellKey:
    return (cfg.label, cfg.dataset, int(cfg.shots), int(cfg.seed))


# -- the launcher -------------------------------------------------------------------------------
class CellFailed(BenchmarkError):
    pass


@dataclass
class _Cell:
    cfg: Any
    key: CellKey
    chash: str
    dir: Path  # the cell's run folder (run_dir), computed once: the wait loop polls it
    attempts: List[Dict[str, Any]] = field(default_factory=list)


def _started(d: Path) -> bool:
    """Did a task get to this cell (a lock, checkpoint or error file is there)?"""
    return any((d / n).exists() for n in (".lock", "checkpoint.pt", "error.txt"))


def _job_error(job, kind: str) -> str:
    """The message of a job that returned no result (its exception, or its log's tail)."""
    if kind == "local" and not job.paths.result_pickle.exists():
        # the local task process died (killed): no result pickle will come, do not wait for one
        tail = ""
        for p in (job.paths.stderr, job.paths.stdout):
            if p.exists():
                lines = [l for l in p.read_text(errors="replace").splitlines() if l.strip()]
                tail = lines[-1] if lines else ""
                if tail:
                    break
        return f"task ended without a result (killed?); last log line: {tail!r}; log: {job.paths.stderr}"
    exc = job.exception()
    if exc is None:
        return "task returned no result"
    lines = [l for l in str(exc).splitlines() if l.strip()]
    err = [l for l in lines if re.match(r"^\w+(Error|Exception|Interrupt)\b", l)]
    return (err[-1] if err else lines[-1] if lines else type(exc).__name__) + f" (log: {job.paths.stderr})"


def run_grid(args: argparse.Namespace, exp: Dict[str, Any], grid, results: Path,
             poll_s: Optional[float] = None) -> Optional[List[Tuple[str, Exception]]]:
    """Runs the grid's unfinished cells as submitit jobs; returns the failed cells (label, error),
    or None with ``--no-wait`` (tables are then the user's ``--report-only``)."""
    from .config import config_hash
    from .engine import Engine, run_dir
    from .io import atomic_write_json

    kind = launcher_kind(exp, args)
    opts = options(exp, args)
    engine = Engine(results, force=args.force)
    cells = [_Cell(c, cell_key(c), config_hash(c), run_dir(results, c)) for c in grid.runs]
    todo = [c for c in cells if engine.status(c.cfg) != "complete"]
    opts = resolve_auto(kind, opts, len(todo))
    print(f"{len(cells) - len(todo)} complete, {len(todo)} to run ({kind}, {opts['pack']} cell(s) per task)")
    if not todo:
        return []
    folder = results / "submitit"
    ex = make_executor(kind, folder, opts, f"ossl-{exp.get('name', 'grid')}")
    shown = {k: v for k, v in opts.items() if v not in (None, [], {}) and k not in ("pack", "kind")}
    print("resources per task: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    task = GridTask({k: v for k, v in exp.items()}, str(results), list(args.sets or []), args.data_root,
                    args.device, bool(args.force), opts["cpus"])
    pack = int(opts["pack"])
    slots = (opts["array_parallelism"] or 1) if kind == "local" else None
    poll = poll_s if poll_s is not None else (0.2 if kind == "local" else 30.0)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}

    def packs(cs: List[_Cell]) -> List[List[_Cell]]:
        return [cs[i:i + pack] for i in range(0, len(cs), pack)]

    def submit(batch: List[List[_Cell]]):
        from submitit.helpers import environment_variables

        try:
            with _ENV_LOCK, environment_variables(**env):  # the environment the tasks start with
                jobs = ex.map_array(task, [[(c.key, c.chash) for c in p] for p in batch])
        except Exception as exc:  # noqa: BLE001 - sbatch refused (partition, account, limits ...)
            raise BenchmarkError(f"submitting to {kind} failed: {type(exc).__name__}: {exc}") from exc
        ids = sorted({j.job_id.split("_")[0] for j in jobs})
        print(f"submitted {len(batch)} task(s) ({sum(map(len, batch))} cells) as job {', '.join(ids)}; "
              f"logs in {folder}", flush=True)
        return list(zip(jobs, batch))

    pending = packs(todo)
    if args.no_wait:
        jobs = submit(pending)
        atomic_write_json(folder / "last_launch.json", {
            "launcher": kind, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": [{"job_id": j.job_id, "cells": [cell_label(c.key) for c in p]} for j, p in jobs]})
        print("not waiting (--no-wait): watch with --status; when the jobs have ended build the tables "
              "with --report-only, and rerun this command to retry cells that did not finish")
        return None

    if args.fail_fast:
        print("note: --fail-fast applies to --launcher inline; here a failed cell is retried (--retries)")
    try:
        return _wait(kind, ex, submit, packs, pending, slots, poll, opts, cells, todo, engine, results)
    except KeyboardInterrupt:
        print(f"interrupted: submitted jobs may still be running (see {folder}; on SLURM: squeue, "
              f"scancel); rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


def _wait(kind, ex, submit, packs, pending, slots, poll, opts, cells, todo, engine, results):
    """Submit packs as slots free up, collect each ended job's outcomes, resubmit (bounded), and
    wait out cells that another process is running; returns the failed cells."""
    from .engine import RunLock
    from .io import atomic_write_json

    running: List[Tuple[Any, List[_Cell]]] = []
    watching: List[_Cell] = []
    failed: List[Tuple[str, Exception]] = []
    n_done = len(cells) - len(todo)
    shown: set = set()  # cells already reported finished while their task still ran

    def finished_line(c: _Cell, outcome: str) -> str:
        from .report import read_result

        try:
            m = read_result(c.dir / "result.json")["metrics"]
            what = f"acc {m['acc']:.2f}  ba {m['ba_closed']:.2f}  auroc {m['auroc']:.2f}"
        except Exception:  # noqa: BLE001 - a progress line never fails the grid
            what = outcome
        return f"[{n_done}/{len(cells)}] {cell_label(c.key)}: {what}"

    while pending or running or watching:
        free = len(pending) if slots is None else max(0, slots - len(running))
        if free and pending:
            batch, pending = pending[:free], pending[free:]
            running += submit(batch)
        time.sleep(poll)
        for job, p in running:  # progress: cells whose result appeared while their task runs on
            for c in p:
                if (c.key not in shown and (c.dir / "result.json").exists()
                        and engine.status(c.cfg) == "complete"):
                    shown.add(c.key)
                    n_done += 1
                    print(finished_line(c, "ran"), flush=True)
        still = []
        for job, p in running:
            if not job.done():
                still.append((job, p))
                continue
            recs: Dict[CellKey, Dict[str, Any]] = {}
            job_err = None
            if kind == "local" and not job.paths.result_pickle.exists():
                job_err = _job_error(job, kind)
            else:
                try:
                    recs = {tuple(r["cell"]): r for r in job.result()}
                except Exception:  # noqa: BLE001 - the job died or raised outside a cell
                    job_err = _job_error(job, kind)
            retry: List[_Cell] = []
            # the pack's first unfinished cell: the one its task was running when it died
            first_open = next((x for x in p if engine.status(x.cfg) != "complete"), None)
            for c in p:
                rec = recs.get(c.key) or {"outcome": "died", "error": job_err}
                d = c.dir
                if engine.status(c.cfg) == "complete":
                    if c.key not in shown:
                        shown.add(c.key)
                        n_done += 1
                        print(finished_line(c, rec["outcome"]), flush=True)
                    if c.attempts:
                        c.attempts.append({"job_id": job.job_id, "outcome": rec["outcome"]})
                        atomic_write_json(d / "launch.json", {"state": "complete", "attempts": c.attempts})
                    continue
                if rec["outcome"] == "busy":
                    print(f"  {cell_label(c.key)} is being run by another process: waiting for it", flush=True)
                    watching.append(c)
                    continue
                if rec["outcome"] == "died" and not _started(d) and c is not first_open:
                    retry.append(c)  # its pack's task died before reaching it: not an attempt
                    continue
                c.attempts.append({"job_id": job.job_id, "outcome": rec["outcome"],
                                   "error": rec.get("error") or job_err})
                n_fail = len(c.attempts)
                left = opts["retries"] + 1 - n_fail if rec.get("retry", True) else 0
                state = "retrying" if left > 0 else "failed"
                atomic_write_json(d / "launch.json", {"state": state, "attempts": c.attempts})
                print(f"  {cell_label(c.key)}: attempt {n_fail} {rec['outcome']}: {c.attempts[-1]['error']}"
                      + (f"; resubmitting ({left} left)" if left > 0 else "; giving up"), flush=True)
                if left > 0:
                    retry.append(c)
                else:
                    failed.append((cell_label(c.key), CellFailed(
                        f"{c.attempts[-1]['error']} (after {n_fail} attempts; see {d / 'launch.json'})")))
            pending += packs(retry)
        running = still
        for c in list(watching):
            d = c.dir
            if RunLock.holder(d):
                continue
            watching.remove(c)
            if engine.status(c.cfg) == "complete":
                n_done += 1
                print(f"[{n_done}/{len(cells)}] {cell_label(c.key)}: finished by another process", flush=True)
            else:
                pending += packs([c])
    return failed
