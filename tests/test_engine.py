"""Engine: determinism, resume after a kill, frozen CLIP, result safety, feature cache, files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.engine import CRASH_ENV, Engine, metrics_from_predictions, run_dir
from benchmark.errors import ResultExistsError
from conftest import TESTS, toy_cfg

TRAIN = ["train.epochs=6", "train.checkpoint_every=2", "train.lr=0.05"]


def _preds(d):
    with np.load(d / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def test_same_seed_reproduces_a_run_exactly(tmp_path):
    cfg = toy_cfg(shots=4, sets=TRAIN)
    Engine(tmp_path / "a").run(cfg)
    Engine(tmp_path / "b").run(cfg)
    pa, pb = _preds(run_dir(tmp_path / "a", cfg)), _preds(run_dir(tmp_path / "b", cfg))
    assert np.array_equal(pa["test_logits"], pb["test_logits"])
    la = torch.load(run_dir(tmp_path / "a", cfg) / "learned.pt")
    lb = torch.load(run_dir(tmp_path / "b", cfg) / "learned.pt")
    assert all(torch.equal(la[k], lb[k]) for k in la)
    # and the training did something: the learned weight moved away from its text init
    pc = _preds(run_dir(tmp_path / "a", cfg))
    Engine(tmp_path / "c").run(toy_cfg(shots=4, seed=2, sets=TRAIN))
    assert not np.array_equal(pc["test_logits"], _preds(run_dir(tmp_path / "c", toy_cfg(shots=4, seed=2, sets=TRAIN)))["test_logits"])


def test_killed_run_resumes_to_identical_metrics(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    script = str(TESTS / "_run_one.py")
    full = subprocess.run([sys.executable, script, str(tmp_path / "full"), "linear_probe", *TRAIN],
                          capture_output=True, text=True, env=env, cwd=TESTS)
    assert full.returncode == 0, full.stderr
    killed = subprocess.run([sys.executable, script, str(tmp_path / "kill"), "linear_probe", *TRAIN],
                            capture_output=True, text=True, env=dict(env, **{CRASH_ENV: "5"}), cwd=TESTS)
    assert killed.returncode == 137
    cfg = toy_cfg(shots=4, sets=TRAIN)
    d = run_dir(tmp_path / "kill", cfg)
    assert (d / "checkpoint.pt").exists() and not (d / "result.json").exists()
    assert torch.load(d / "checkpoint.pt", weights_only=False)["step"] == 4
    resumed = subprocess.run([sys.executable, script, str(tmp_path / "kill"), "linear_probe", *TRAIN],
                             capture_output=True, text=True, env=env, cwd=TESTS)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == json.loads(full.stdout.strip().splitlines()[-1])
    r = json.loads((d / "result.json").read_text())
    assert r["cost"]["resumed_from_step"] == 4 and not (d / "checkpoint.pt").exists()
    pf, pk = _preds(run_dir(tmp_path / "full", cfg)), _preds(d)
    assert np.array_equal(pf["test_logits"], pk["test_logits"])


def test_only_method_parameters_change(tmp_path):
    eng = Engine(tmp_path)
    cfg = toy_cfg(shots=4, sets=TRAIN)
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    eng.run(cfg)
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    learned = torch.load(run_dir(tmp_path, cfg) / "learned.pt")
    assert list(learned) == ["weight"]


def test_finished_result_is_never_silently_overwritten(tmp_path):
    eng = Engine(tmp_path)
    cfg = toy_cfg(shots=2)
    r1 = eng.run(cfg)
    assert eng.run(cfg)["finished_at"] == r1["finished_at"]  # finished: skipped
    changed = toy_cfg(shots=2, sets=["train.lr=0.3"])
    assert eng.status(changed) == "stale"
    with pytest.raises(ResultExistsError, match="--force"):
        eng.run(changed)
    d = run_dir(tmp_path, cfg)
    assert json.loads((d / "result.json").read_text())["config_hash"] == r1["config_hash"]
    r2 = Engine(tmp_path, force=True).run(changed)
    archived = list((d / "archive").glob("*/result.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["config_hash"] == r1["config_hash"]
    assert r2["config_hash"] != r1["config_hash"]


def test_result_json_contents_and_recomputable_metrics(tmp_path):
    cfg = toy_cfg(shots=4, sets=TRAIN)
    r = Engine(tmp_path).run(cfg)
    for key in ("metrics", "config", "config_hash", "split_hash", "cost", "environment", "known_score"):
        assert key in r
    assert r["cost"]["trainable_params"] == 6 // 2 * 32  # K=3 known classes x embed_dim 32
    assert set(r["metrics"]) >= {"acc", "ba_closed", "ba_open", "auroc", "fpr95", "h_score"}
    assert r["config"]["train"]["epochs"] == 6
    preds = _preds(run_dir(tmp_path, cfg))
    again, _, primary = metrics_from_predictions(preds, int(preds["num_known"]), "auto")
    assert primary == r["known_score"] and again == pytest.approx(r["metrics"])
    assert preds["test_logits"].shape[1] == 3


def test_feature_cache_matches_fresh_encoding_and_tracks_the_checkpoint(tmp_path, micro_backbone):
    from benchmark.loader import FeatureCache, build_transforms, eval_loader
    from benchmark.config import DataConfig
    from benchmark.registry import DATASETS
    import contextlib

    split = DATASETS.get("toy")().load("test")
    tf = build_transforms(micro_backbone.preprocess_cfg, DataConfig())["test"]
    cache = FeatureCache(tmp_path)
    f1 = cache.get(micro_backbone, "toy", split, tf, 16, "cpu", contextlib.nullcontext)
    fresh = torch.cat([micro_backbone.encode_image(b["test"]).pooled
                       for b in eval_loader(split, np.arange(len(split)), tf, 16)])
    assert torch.equal(f1, fresh)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    f2 = cache.get(micro_backbone, "toy", split, tf, 16, "cpu", contextlib.nullcontext)
    assert torch.equal(f1, f2) and len(list(tmp_path.glob("*.pt"))) == 1
    old = micro_backbone.identity
    try:
        micro_backbone.identity = old + "-other-checkpoint"
        cache.get(micro_backbone, "toy", split, tf, 16, "cpu", contextlib.nullcontext)
    finally:
        micro_backbone.identity = old
    assert len(list(tmp_path.glob("*.pt"))) == 2  # a new checkpoint gets its own entry


def test_generic_ssl_loop_runs_and_logs_mask_rate(tmp_path):
    cfg = toy_cfg(shots=2, sets=["ssl.enabled=true", "ssl.threshold=0.0", "train.epochs=2"])
    Engine(tmp_path).run(cfg)
    logs = [json.loads(l) for l in (run_dir(tmp_path, cfg) / "log.jsonl").read_text().splitlines()]
    assert logs and logs[-1]["mask_rate"] == 1.0 and "loss_u" in logs[-1]
