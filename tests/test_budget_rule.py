"""The embedded grid's budget rule (issue 13): every trained method sees the same number of labeled
images, E passes over its labeled set, read from the resolved configs of the default grid."""
import math

import pytest

from benchmark.engine import Engine
from benchmark.experiment import build_grid, load_experiment
from benchmark.registry import DATASETS, METHODS


def labeled_images_seen(cfg, n_labeled: int):
    """Labeled images one run sees, from its resolved config alone (None if the schedule is not
    counted in passes over the labeled set, e.g. a fixed number of iterations)."""
    t = cfg.train
    if t.iterations or t.iterations_per_shot or t.epoch_over != "labeled":
        return None
    if n_labeled % t.batch_size:  # the loader drops the last partial batch of a pass
        return None
    return t.epochs * (n_labeled // t.batch_size) * t.batch_size


def violations(grid, passes: int):
    bad = []
    for cfg in grid.runs:
        if not METHODS.get(cfg.method).trains:
            continue
        n = cfg.shots * math.ceil(DATASETS.get(cfg.dataset)().num_classes() / 2)
        seen = labeled_images_seen(cfg, n)
        if seen != passes * n:
            bad.append(f"{cfg.label} {cfg.dataset} {cfg.shots}-shot: {seen} labeled images, expected {passes * n}")
    return bad


def test_every_trained_method_of_the_default_grid_sees_the_same_labeled_images():
    exp = load_experiment("embedded")
    grid = build_grid(exp)
    passes = exp["config"]["train"]["epochs"]
    trained = {c.method for c in grid.runs if METHODS.get(c.method).trains}
    assert trained == {"clip_lora", "clip_adapter", "coop", "locoop", "plot", "maple", "cfsg_clip"}
    assert violations(grid, passes) == []
    # the same batch too, hence the same number of optimisation steps per shot setting
    assert {c.train.batch_size for c in grid.runs if c.method in trained} == {exp["config"]["train"]["batch_size"]}
    # the tables' caption states the rule with the same number of passes
    assert any(f"{passes} passes over its labeled set" in line for line in exp["caption"])
    # the check fails when one method's preset breaks the rule
    broken = build_grid(exp, methods=["coop", "clip_lora"], seeds=[1],
                        sets=["coop.train.epochs=10", "clip_lora.train.iterations=10"])
    assert len(violations(broken, passes)) == 2 * len(broken.datasets) * len(broken.shots)


def test_the_engine_takes_the_rule_s_steps(tmp_path):
    exp = load_experiment("embedded")
    grid = build_grid(exp, methods=["clip_adapter"], datasets=["synth_cub"], shots=[5], seeds=[1],
                      sets=["device=cpu"])
    r = Engine(tmp_path).run(grid.runs[0])
    passes, batch = exp["config"]["train"]["epochs"], exp["config"]["train"]["batch_size"]
    assert r["cost"]["steps"] * batch == passes * 5 * 12


def test_budget_curve_experiment_expands_every_trained_method_over_the_budgets():
    exp = load_experiment("budget_curve")
    values = exp["curve"]["values"]
    assert len(values) >= 4 and len(exp["datasets"]) == 1
    assert load_experiment("embedded")["config"]["train"]["epochs"] in values  # the default budget is a point
    grid = build_grid(exp)
    base = {c.method for c in build_grid(load_experiment("embedded"), datasets=["synth_cub"],
                                         shots=[20], seeds=[1]).runs if METHODS.get(c.method).trains}
    assert {c.method for c in grid.runs} == base
    for c in grid.runs:
        method, v = exp["_curve_points"][c.label]
        assert c.method == method and c.train.epochs == v and c.label == f"{method}@{v}"
        # apart from the budget, each point is the method's default-grid config
        ref = build_grid(load_experiment("embedded"), methods=[method], datasets=[c.dataset],
                         shots=[c.shots], seeds=[c.seed]).runs[0]
        ref.train.epochs = v
        ref.label = c.label
        assert ref == c


def test_curve_report_means_over_seeds(tmp_path):
    import pandas as pd

    from benchmark.report import write_curve

    points = {"a@1": ("a", 1), "a@2": ("a", 2), "b@1": ("b", 1), "b@2": ("b", 2)}
    rows = []
    for label, vals in {"a@1": [50, 60], "a@2": [70, 70], "b@1": [40, 44], "b@2": [41, 45]}.items():
        for seed, v in enumerate(vals, start=1):
            for metric in ("acc", "auroc"):
                rows.append({"method": label, "dataset": "d", "shots": 20, "seed": seed, "metric": metric,
                             "value": v if metric == "acc" else 100 - v})
    out = write_curve(pd.DataFrame(rows), tmp_path, tmp_path, points, "passes")
    md = (tmp_path / "curve.md").read_text()
    assert "| a | 55.0 ± 5.0 | 70.0 ± 0.0 |" in md and "| b | 42.0 ± 2.0 | 43.0 ± 2.0 |" in md
    assert "| a | 45.0 ± 5.0 | 30.0 ± 0.0 |" in md  # the AUROC table
    assert (tmp_path / "curve_d_20shot.png") in out
