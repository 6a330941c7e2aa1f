"""run_all.py --launcher local|slurm (benchmark/launch.py) on the toy world.

The local tests run the tasks as real submitit subprocesses; the SLURM tests use submitit's own
SlurmExecutor with submitit's mocked sbatch/sacct (``submitit.slurm.test_slurm.mocked_slurm``) and
run each array task in this process, as SLURM would run it on a node."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.engine import Engine, run_dir
from benchmark.experiment import build_grid, load_experiment
from conftest import ROOT, TOY_EXPERIMENT

TRAIN = {"train": {"epochs": 6, "batch_size": 8, "lr": 0.05, "checkpoint_every": 2, "log_every": 1},
         "ssl": {"unlabeled_batch_size": 8}}


def _exp(tmp_path, name="toy", config=None, **keys):
    p = tmp_path / f"{name}.yaml"
    body = {**TOY_EXPERIMENT, "name": name, "methods": ["zsclip", "linear_probe"], "datasets": ["toy"],
            "shots": [4], "seeds": [1, 2], "config": config or TRAIN, **keys}
    p.write_text(yaml.safe_dump(body))
    return str(p)


def _local(exp, out, *extra):
    # the tasks use this process's torch threads, so that their float results can be compared bit for bit
    return main(["--experiment", exp, "--results-dir", str(out), "--no-figures", "--launcher", "local",
                 "--cpus", str(torch.get_num_threads()), *extra])


def _runs(exp):
    return build_grid(load_experiment(exp)).runs


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _steps(d):
    return [json.loads(l)["step"] for l in (d / "log.jsonl").read_text().splitlines()]


def _jobs(out):
    return sorted(p.name for p in (Path(out) / "submitit").iterdir() if p.name != "%j")


def test_local_grid_equals_inline(tmp_path):
    exp = _exp(tmp_path)
    assert main(["--experiment", exp, "--results-dir", str(tmp_path / "inline"), "--no-figures"]) == 0
    assert _local(exp, tmp_path / "local", "--pack", "4") == 0
    assert len(_jobs(tmp_path / "local")) == 1  # 4 cells in one task
    for cfg in _runs(exp):
        a, b = run_dir(tmp_path / "inline", cfg), run_dir(tmp_path / "local", cfg)
        ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
        assert ra["metrics"] == rb["metrics"] and ra["config_hash"] == rb["config_hash"]
        assert ra["metrics_by_score"] == rb["metrics_by_score"]
        pa, pb = _npz(a / "predictions.npz"), _npz(b / "predictions.npz")
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
        if (a / "learned.pt").exists() or (b / "learned.pt").exists():
            la, lb = torch.load(a / "learned.pt"), torch.load(b / "learned.pt")
            assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    for t in ("table1_acc.csv", "table2_ba.csv", "auroc.csv"):
        assert (tmp_path / "inline" / "tables" / t).read_text() == (tmp_path / "local" / "tables" / t).read_text()


def test_finished_cells_are_not_resubmitted(tmp_path, capsys):
    exp = _exp(tmp_path)
    out = tmp_path / "res"
    assert main(["--experiment", exp, "--results-dir", str(out), "--no-figures", "--methods", "zsclip"]) == 0
    done = {c.seed: (run_dir(out, c) / "result.json").read_text() for c in _runs(exp) if c.method == "zsclip"}
    capsys.readouterr()
    assert _local(exp, out, "--pack", "4") == 0
    assert "2 complete, 2 to run" in capsys.readouterr().out
    (job,) = _jobs(out)
    from submitit.core.utils import DelayedSubmission

    submitted = DelayedSubmission.load(out / "submitit" / job / f"{job}_submitted.pkl")
    assert sorted(key[0] for key, _ in submitted.args[0]) == ["linear_probe", "linear_probe"]
    for c in _runs(exp):
        if c.method == "zsclip":  # untouched, byte for byte
            assert (run_dir(out, c) / "result.json").read_text() == done[c.seed]
    # everything finished: nothing is submitted at all
    assert _local(exp, out) == 0
    assert "4 complete, 0 to run" in capsys.readouterr().out and _jobs(out) == [job]


def test_sigkilled_task_is_resubmitted_and_resumes_to_the_same_result(tmp_path):
    # long enough (96 steps, a checkpoint every 2) to be killed in the middle of its training
    train = {**TRAIN, "train": {**TRAIN["train"], "epochs": 48}}
    exp = _exp(tmp_path, config=train, methods=["linear_probe"], seeds=[1])
    (cfg,) = _runs(exp)
    out = tmp_path / "res"
    d = run_dir(out, cfg)
    killed = []

    def killer():
        t_end = time.time() + 300
        while time.time() < t_end and not killed:
            if (d / "checkpoint.pt").exists() and (d / ".lock").exists():
                pid = int((d / ".lock").read_text().split("@")[0])
                os.kill(pid, signal.SIGKILL)  # the task's own process, as the OOM killer would
                killed.append(torch.load(d / "checkpoint.pt", weights_only=False)["step"])
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    assert _local(exp, out, "--retries", "1") == 0
    th.join(5)
    assert killed, "the task finished before it could be killed"
    r = json.loads((d / "result.json").read_text())
    assert r["cost"]["resumed_from_step"] == killed[0]
    launch = json.loads((d / "launch.json").read_text())
    assert launch["state"] == "complete" and launch["attempts"][0]["outcome"] == "died"
    assert len(_jobs(out)) == 2
    # an uninterrupted run of the same config gives the same metrics and predictions
    ref = Engine(tmp_path / "ref").run(cfg)
    assert r["metrics"] == ref["metrics"]
    pk, pr = _npz(d / "predictions.npz"), _npz(run_dir(tmp_path / "ref", cfg) / "predictions.npz")
    assert all(np.array_equal(pk[k], pr[k]) for k in pr)


def test_real_error_fails_with_its_message_after_the_retry_bound(tmp_path, capsys):
    # a damaged weights file (random bytes): torch.load raises inside the run, an error the suite
    # does not recognise as bad input, so it is retried, twice at most here, then reported
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    exp = _exp(tmp_path, methods=["zsclip"], seeds=[1],
               backbone={"model": TOY_EXPERIMENT["backbone"]["model"], "pretrained": str(bad)})
    out = tmp_path / "res"
    assert _local(exp, out, "--retries", "1") == 1
    err = capsys.readouterr().err
    assert "toy/zsclip/4-shot/seed1: CellFailed: UnpicklingError" in err
    (cfg,) = _runs(exp)
    d = run_dir(out, cfg)
    launch = json.loads((d / "launch.json").read_text())
    assert launch["state"] == "failed" and len(launch["attempts"]) == 2
    assert all(a["outcome"] == "failed" and a["error"].startswith("UnpicklingError") for a in launch["attempts"])
    assert len(_jobs(out)) == 2 and Engine(out).status(cfg) == "failed"
    assert "UnpicklingError" in (d / "error.txt").read_text()


def test_bad_input_is_reported_without_a_retry(tmp_path):
    # the task itself, in this process: a BenchmarkError (here a missing checkpoint file) fails the
    # same way every time, so the task marks it not worth a retry
    from benchmark.config import config_hash
    from benchmark.launch import GridTask, cell_key

    exp = load_experiment(_exp(tmp_path, methods=["zsclip"], seeds=[1], backbone={
        "model": TOY_EXPERIMENT["backbone"]["model"], "pretrained": str(tmp_path / "missing.pt")}))
    (cfg,) = build_grid(exp).runs
    task = GridTask(exp, str(tmp_path / "res"), [], None, None, False, None)
    (rec,) = task([(cell_key(cfg), config_hash(cfg))])
    assert rec["outcome"] == "failed" and rec["retry"] is False and "missing.pt" in rec["error"]
    (ok,) = GridTask(load_experiment(_exp(tmp_path, methods=["zsclip"], seeds=[1])), str(tmp_path / "res"),
                     [], None, None, False, None)([(cell_key(cfg), "0" * 16)])
    assert ok["outcome"] == "failed" and "changed after submission" in ok["error"]


def test_two_launchers_on_one_results_dir_never_run_a_cell_twice(tmp_path, capsys):
    train = {**TRAIN, "train": {**TRAIN["train"], "epochs": 100, "checkpoint_every": 1000}}
    exp = _exp(tmp_path, config=train, methods=["linear_probe"], shots=[2, 4])
    cells = _runs(exp)
    out = tmp_path / "res"
    # a third process holds the last cell's run lock: both launchers must wait for it, then both
    # resubmit that cell at the same moment, and only one of their tasks may run it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    last = run_dir(out, cells[-1])
    last.mkdir(parents=True)
    (last / ".lock").write_text(str(holder.pid))
    rcs = []
    threads = [threading.Thread(target=lambda: rcs.append(_local(exp, out, "--pack", "4"))) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        t_end = time.time() + 300
        while time.time() < t_end and not all(Engine(out).status(c) == "complete" for c in cells[:-1]):
            time.sleep(0.2)
        assert Engine(out).status(cells[-1]) == "missing"  # nobody ran it under the held lock
    finally:
        holder.kill()
        holder.wait()
    for t in threads:
        t.join(300)
    assert rcs == [0, 0]
    for c in cells:
        d = run_dir(out, c)
        r = json.loads((d / "result.json").read_text())
        # trained exactly once: one log of steps 1..total, no restart, no resume
        assert _steps(d) == list(range(1, r["cost"]["steps"] + 1))
        assert r["cost"]["resumed_from_step"] is None
    printed = capsys.readouterr().out
    assert printed.count("is being run by another process: waiting for it") >= 2
    assert printed.count("| linear_probe |") == 2  # each launcher ends with the full table


# -- SLURM, through submitit's SlurmExecutor with submitit's mocked sbatch ----------------------
@pytest.fixture()
def slurm(monkeypatch):
    """submitit's mocked sbatch/sacct/srun: submit inside ``mock.context()``; the array tasks then
    run outside it (the mock answers no other command, and a node runs real ones)."""
    from submitit.core.test_core import MockedSubprocess
    from submitit.slurm.slurm import SlurmJob

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    threads = torch.get_num_threads()
    yield MockedSubprocess(known_cmds=["srun"])
    SlurmJob.watcher.clear()
    for s, h in saved.items():  # process_job installs submitit's handlers in this process
        signal.signal(s, h)
    torch.set_num_threads(threads)  # a task sets its torch threads from launcher cpus


def _run_array_task(mock, out, job_id):
    from submitit.core import submission
    from submitit.slurm.slurm import SlurmJob

    job = SlurmJob(folder=out / "submitit" / "%j", job_id=job_id)
    with mock.job_context(job_id):
        submission.process_job(job.paths.folder)
    return job


def test_slurm_sbatch_script_resources_and_array(tmp_path, slurm):
    launcher = {"gpus": 1, "cpus": 2, "mem_gb": 8, "time": "1:30:00", "partition": "gpu", "account": "lab",
                "sbatch": {"constraint": "a100"}, "setup": ["module load cuda/12.4"], "array_parallelism": 2,
                "pack": 2}
    exp = _exp(tmp_path, launcher=launcher)
    out = tmp_path / "res"
    with slurm.context():
        assert main(["--experiment", exp, "--results-dir", str(out), "--no-figures", "--launcher", "slurm",
                     "--no-wait", "--account", "other", "--sbatch", "qos=high"]) == 0
    launch = json.loads((out / "submitit" / "last_launch.json").read_text())
    ids = [j["job_id"] for j in launch["jobs"]]
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array of two tasks
    array_id = ids[0].split("_")[0]
    sbatch = (out / "submitit" / array_id / f"{array_id}_submission.sh").read_text()
    lines = set(sbatch.splitlines())
    for want in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --account=other",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8GB",
                 "#SBATCH --time=90", "#SBATCH --constraint=a100", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=ossl-toy", "module load cuda/12.4"):
        assert want in lines, (want, sbatch)
    assert f"export PYTHONPATH={ROOT}" in sbatch
    # while the array "runs": --status reads the shared folder; then each task runs as on a node
    for jid in ids:
        _run_array_task(slurm, out, jid)
    assert all(Engine(out).status(c) == "complete" for c in _runs(exp))
    assert main(["--experiment", exp, "--results-dir", str(out), "--report-only", "--no-figures"]) == 0
    assert (out / "tables" / "table1_acc.md").exists()


@pytest.mark.parametrize("time_limit,countdown", [(None, 3), ("1", 2)], ids=["preempted", "time-limit"])
def test_slurm_requeue_signal_requeues_and_resumes_from_the_checkpoint(tmp_path, slurm, monkeypatch,
                                                                        time_limit, countdown):
    """SLURM's USR2 (preemption, or the time limit near): submitit asks the Checkpointable task for
    its resubmission and requeues it (a time limit uses up one of max_num_timeout=3; a plain task
    would not be requeued at all there); the requeued task resumes from the engine's checkpoint."""
    from unittest.mock import patch

    import submitit

    exp = _exp(tmp_path, methods=["linear_probe"], seeds=[1])
    (cfg,) = _runs(exp)
    out = tmp_path / "res"
    with slurm.context():
        assert main(["--experiment", exp, "--results-dir", str(out), "--launcher", "slurm", "--no-wait",
                     *(["--time", time_limit] if time_limit else [])]) == 0
    (jid,) = [j["job_id"] for j in json.loads((out / "submitit" / "last_launch.json").read_text())["jobs"]]
    # SLURM's preemption signal arrives right after the checkpoint of step 4
    real = Engine._checkpoint

    def checkpoint_then_preempted(self, path, chash, method, opt, step, train_seconds):
        real(self, path, chash, method, opt, step, train_seconds)
        if step == 4:
            os.kill(os.getpid(), submitit.JobEnvironment._usr_sig())
            time.sleep(1)  # the handler runs here

    monkeypatch.setattr(Engine, "_checkpoint", checkpoint_then_preempted)
    with patch("submitit.slurm.slurm.SlurmJobEnvironment._requeue") as requeue, pytest.raises(SystemExit):
        _run_array_task(slurm, out, jid)
    requeue.assert_called_once_with(countdown)
    d = run_dir(out, cfg)
    assert (d / "checkpoint.pt").exists() and not (d / "result.json").exists() and not (d / ".lock").exists()
    monkeypatch.setattr(Engine, "_checkpoint", real)
    _run_array_task(slurm, out, jid)  # SLURM starts the requeued task again
    r = json.loads((d / "result.json").read_text())
    assert r["cost"]["resumed_from_step"] == 4
    assert _steps(d) == list(range(1, r["cost"]["steps"] + 1))
    ref = Engine(tmp_path / "ref").run(cfg)
    assert r["metrics"] == ref["metrics"]


def test_launcher_option_errors(tmp_path, capsys):
    exp = _exp(tmp_path, launcher={"gpu": 1})
    assert main(["--experiment", exp, "--results-dir", str(tmp_path), "--launcher", "local"]) == 2
    assert "unknown launcher key 'gpu'; did you mean 'gpus'" in capsys.readouterr().err
    exp = _exp(tmp_path, launcher={"time": "soon"})
    assert main(["--experiment", exp, "--results-dir", str(tmp_path), "--launcher", "local"]) == 2
    assert "H:MM:SS" in capsys.readouterr().err


def test_parse_time():
    from benchmark.launch import parse_time

    # sbatch --time's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
    assert [parse_time(v) for v in (90, "90", "90:30", "1:30:00", "0:00:30", "2-1", "2-1:30", "2-00:00:01")] == \
        [90, 90, 91, 90, 1, 2940, 2970, 2881]
    for bad in ("soon", "1:2:3:4", "0", -5):
        with pytest.raises(Exception, match="time"):
            parse_time(bad)


def test_run_lock_across_hosts_heartbeat_and_stale_takeover(tmp_path, monkeypatch):
    # array tasks on other nodes share the results folder: their pid means nothing here, so a lock
    # written on another host counts as held while its heartbeat is fresh, and is taken over once stale
    import socket

    from benchmark.engine import RunLock
    from benchmark.errors import RunLockedError

    d = tmp_path / "run"
    d.mkdir()
    lock = d / ".lock"
    other = f"{os.getpid() + 1}@not-{socket.gethostname()}"
    lock.write_text(other)
    assert RunLock.holder(d) == other
    with pytest.raises(RunLockedError, match=other):
        RunLock(d).__enter__()
    old = time.time() - RunLock.STALE_S - 1
    os.utime(lock, (old, old))
    assert RunLock.holder(d) is None
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    with RunLock(d):
        assert lock.read_text() == RunLock.me()
        os.utime(lock, (old, old))
        time.sleep(0.5)  # the holder's heartbeat touches the file again
        assert time.time() - lock.stat().st_mtime < 5 and RunLock.holder(d) == RunLock.me()
    assert not lock.exists()
    # a same-host lock: held while its pid lives, taken over once it is dead (a bare pid: older files)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(sleeper.pid))
        assert RunLock.holder(d) == f"{sleeper.pid}@{socket.gethostname()}"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert RunLock.holder(d) is None


def test_launcher_kind_and_auto_resources(monkeypatch):
    """The experiment's launcher: kind applies when --launcher is not given; array_parallelism auto
    = usable cores // cpus (local only); pack auto = one task per process slot."""
    import argparse

    from benchmark import launch
    from benchmark.errors import ConfigError

    ns = lambda **kw: argparse.Namespace(**{"launcher": None, **kw})  # noqa: E731
    assert launch.launcher_kind({}, ns()) == "inline"
    assert launch.launcher_kind({"launcher": {"kind": "local"}}, ns()) == "local"
    assert launch.launcher_kind({"launcher": {"kind": "local"}}, ns(launcher="inline")) == "inline"
    with pytest.raises(ConfigError, match="did you mean 'local'"):
        launch.launcher_kind({"launcher": {"kind": "locl"}}, ns())
    monkeypatch.setattr(launch, "usable_cpus", lambda: 5)
    exp = {"launcher": {"kind": "local", "cpus": 2, "array_parallelism": "auto", "pack": "auto"}}
    opts = launch.resolve_auto("local", launch.options(exp, ns()), 192)
    assert opts["array_parallelism"] == 2 and opts["pack"] == 96  # 5 // 2 slots, 192 / 2
    opts = launch.resolve_auto("local", launch.options(exp, ns(cpus=1)), 7)
    assert opts["array_parallelism"] == 5 and opts["pack"] == 2  # ceil(7 / 5)
    with pytest.raises(ConfigError, match="local only"):
        launch.resolve_auto("slurm", launch.options(exp, ns()), 10)
    slurm = launch.options({"launcher": {"pack": "auto"}}, ns())
    assert launch.resolve_auto("slurm", slurm, 10)["pack"] == 1  # no parallelism limit: a cell per task
    with pytest.raises(ConfigError, match="positive integer or auto"):
        launch.options({"launcher": {"pack": "many"}}, ns())


def test_experiment_launcher_kind_local_runs_without_the_flag(tmp_path, capsys):
    """An experiment whose launcher: section says kind: local runs its grid as submitit tasks (pack
    auto: one task per slot) when the command line names no launcher, prints each cell's metrics
    once as it finishes; results equal inline's."""
    exp = _exp(tmp_path, launcher={"kind": "local", "cpus": torch.get_num_threads(),
                                   "array_parallelism": 2, "pack": "auto"})
    out = tmp_path / "local"
    assert main(["--experiment", exp, "--results-dir", str(out), "--no-figures"]) == 0
    assert len(_jobs(out)) == 2  # 4 cells, 2 slots -> 2 tasks of 2 cells
    printed = capsys.readouterr().out
    for cfg in _runs(exp):
        acc = json.loads((run_dir(out, cfg) / "result.json").read_text())["metrics"]["acc"]
        line = f"toy/{cfg.label}/{cfg.shots}-shot/seed{cfg.seed}: acc {acc:.2f}"
        assert printed.count(line) == 1, (line, printed)
    assert [f"[{i}/4]" in printed for i in range(1, 5)] == [True] * 4
    assert main(["--experiment", exp, "--results-dir", str(tmp_path / "inline"), "--no-figures",
                 "--launcher", "inline"]) == 0
    assert not (tmp_path / "inline" / "submitit").exists()
    for t in ("table1_acc.csv", "auroc.csv"):
        assert (out / "tables" / t).read_text() == (tmp_path / "inline" / "tables" / t).read_text()
