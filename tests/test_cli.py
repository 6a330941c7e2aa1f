"""run_all.py end to end on the toy world: grid, files, tables, skip/resume, errors."""
import json

import pandas as pd
import pytest
import yaml

from benchmark.cli import main
from conftest import TOY_EXPERIMENT


@pytest.fixture()
def exp(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump({**TOY_EXPERIMENT, "methods": ["zsclip", "linear_probe"],
                                 "datasets": ["toy"], "shots": [2, 4], "seeds": [1, 2]}))
    return str(p)


def test_full_grid_writes_results_tables_and_figures(exp, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["--experiment", exp, "--results-dir", str(out), "--no-figures"]) == 0
    runs = list((out / "runs").rglob("result.json"))
    assert len(runs) == 8
    df = pd.read_csv(out / "summary.csv")
    assert set(df.method) == {"zsclip", "linear_probe"} and set(df.seed) == {1, 2}
    # the table cell is the mean of the seeds' values, computed independently here
    acc = df[(df.metric == "acc") & (df.method == "linear_probe") & (df.shots == 4)].value
    table = pd.read_csv(out / "tables" / "table1_acc.csv", index_col=0)
    assert table.loc["linear_probe", "toy 4-shot"].startswith(f"{acc.mean():.2f} ± {acc.std(ddof=0):.2f}")
    md = (out / "tables" / "table2_ba.md").read_text()
    assert "**" in md and "| zsclip |" in md
    assert (out / "tables" / "table1_acc.tex").read_text().count(r"\textbf") >= 2
    # a second invocation skips every finished run
    capsys.readouterr()
    assert main(["--experiment", exp, "--results-dir", str(out), "--no-figures"]) == 0
    assert "8 complete, 0 to run" in capsys.readouterr().out


def test_one_method_one_seed_with_a_figure(exp, tmp_path):
    out = tmp_path / "res"
    assert main(["--experiment", exp, "--results-dir", str(out), "--methods", "zsclip",
                 "--seeds", "1", "--shots", "2"]) == 0
    assert (out / "figures" / "acc.png").stat().st_size > 1000
    assert (out / "tables" / "table1_acc.md").exists()
    r = json.loads(next((out / "runs").rglob("result.json")).read_text())
    assert r["method"] == "zsclip" and r["seed"] == 1


def test_dry_run_status_and_list(exp, tmp_path, capsys):
    assert main(["--experiment", exp, "--results-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "= 8 runs" in out and out.count("[ missing]") == 8
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "zsclip" in out and "toy" in out
    assert main(["--experiment", exp, "--results-dir", str(tmp_path), "--status"]) == 0
    assert "missing 8" in capsys.readouterr().out


def test_bad_names_and_keys_exit_with_a_clear_message(exp, tmp_path, capsys):
    assert main(["--experiment", exp, "--methods", "zsclp", "--dry-run"]) == 2
    assert "Did you mean 'zsclip'" in capsys.readouterr().err
    assert main(["--experiment", exp, "--datasets", "toi", "--dry-run"]) == 2
    assert "Did you mean 'toy'" in capsys.readouterr().err
    assert main(["--experiment", exp, "--set", "train.lrr=1", "--dry-run"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
