"""Summary, paper-shaped tables and figures, built from ``result.json`` files alone.

* ``results/summary.csv``: long format, one row per (run, metric).
* ``results/tables/<table>.{md,tex,csv}``: rows = methods, columns = dataset x shots, cells
  mean ± std over seeds, best mean per column in bold. ``table1_acc`` and ``table2_ba`` are the
  paper's two tables (``acc`` and ``ba_closed``); the open-set metrics get their own tables.
* ``results/figures/<metric>.png``: grouped bars with std error bars.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd

from .errors import BenchmarkError
from .integrity import RESULT_KEYS, read_json
from .io import atomic_write_text

TABLES = {  # file stem -> (metric, title)
    "table1_acc": ("acc", "Closed-set accuracy (%) on ID test images"),
    "table2_ba": ("ba_closed", "Balanced accuracy (%) over K+1 classes, closed-set prediction (paper protocol)"),
    "ba_open": ("ba_open", "Open-set balanced accuracy (%), threshold from labeled ID data"),
    "auroc": ("auroc", "ID-vs-OOD AUROC (%) of the known-score"),
    "fpr95": ("fpr95", "FPR (%) on OOD at 95% TPR on ID (lower is better)"),
    "h_score": ("h_score", "H-score (%): harmonic mean of known accuracy and unknown recall"),
}
LOWER_IS_BETTER = {"fpr95"}
FIGURE_METRICS = ("acc", "ba_closed", "auroc", "h_score")


def read_result(path: Path) -> dict:
    """A run's ``result.json``, read once and checked for the keys a table needs (a damaged file
    raises :class:`BenchmarkError` saying what to do)."""
    r, why = read_json(Path(path), RESULT_KEYS)
    if why:
        raise BenchmarkError(f"{path} is damaged ({why}); run run_all.py again: it sets the file aside "
                             f"and redoes the run")
    return r


def collect(result_paths: Iterable[Path]) -> pd.DataFrame:
    rows = []
    for p in result_paths:
        r = read_result(p)
        for metric, value in r["metrics"].items():
            if metric == "open_threshold":
                continue
            rows.append({"method": r.get("label") or r["method"], "dataset": r["dataset"], "shots": r["shots"],
                         "seed": r["seed"], "metric": metric, "value": value,
                         "known_score": r.get("known_score"), "config_hash": r["config_hash"],
                         "cell_hash": r.get("cell_hash", ""), "split_hash": r["split_hash"],
                         "seconds": r["cost"]["total_seconds"]})
    return pd.DataFrame(rows, columns=["method", "dataset", "shots", "seed", "metric", "value",
                                       "known_score", "config_hash", "cell_hash", "split_hash", "seconds"])


def write_summary(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def cell_stats(df: pd.DataFrame, metric: str, ddof: int = 0) -> pd.DataFrame:
    sub = df[df.metric == metric]
    mixed = sub.groupby(["method", "dataset", "shots"])["cell_hash"].nunique()
    if (mixed > 1).any():
        bad = ", ".join(f"{m}/{d}/{k}" for (m, d, k) in mixed[mixed > 1].index)
        raise BenchmarkError(f"table cells mix runs with different configurations: {bad}. Rerun the "
                             f"stale runs (--force) so each cell averages one configuration.")
    g = sub.groupby(["method", "dataset", "shots"])["value"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=ddof).fillna(0.0), "n": g.count()}).reset_index()


def table(df: pd.DataFrame, metric: str, methods: Sequence[str], datasets: Sequence[str],
          shots: Sequence[int], ddof: int = 0, n_seeds: Optional[int] = None):
    """Returns (cells: DataFrame of strings, means: DataFrame, best: DataFrame of bools)."""
    st = cell_stats(df, metric, ddof)
    cols = [(d, k) for d in datasets for k in shots]
    means = pd.DataFrame(np.nan, index=list(methods), columns=pd.MultiIndex.from_tuples(cols))
    stds, ns = means.copy(), means.copy()
    for _, r in st.iterrows():
        if r["method"] in means.index and (r["dataset"], r["shots"]) in means.columns:
            means.loc[r["method"], (r["dataset"], r["shots"])] = r["mean"]
            stds.loc[r["method"], (r["dataset"], r["shots"])] = r["std"]
            ns.loc[r["method"], (r["dataset"], r["shots"])] = r["n"]
    lower = metric in LOWER_IS_BETTER
    best = means.eq(means.min() if lower else means.max()) & means.notna()
    cells = means.copy().astype(object)
    for m in means.index:
        for c in means.columns:
            if np.isnan(means.loc[m, c]):
                cells.loc[m, c] = "–"
                continue
            s = f"{means.loc[m, c]:.2f} ± {stds.loc[m, c]:.2f}"
            if n_seeds and ns.loc[m, c] < n_seeds:
                s += f" (n={int(ns.loc[m, c])})"
            cells.loc[m, c] = s
    return cells, means, best


def _fmt_cols(cols) -> List[str]:
    return [f"{d} {k}-shot" for d, k in cols]


def to_markdown(cells, best, title: str, caption: str) -> str:
    head = "| Method | " + " | ".join(_fmt_cols(cells.columns)) + " |"
    sep = "|---|" + "---|" * len(cells.columns)
    lines = [f"### {title}", "", head, sep]
    for m in cells.index:
        vals = [f"**{cells.loc[m, c]}**" if best.loc[m, c] else str(cells.loc[m, c]) for c in cells.columns]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", caption, ""]
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    return s.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%").replace("–", "--")


def to_latex(cells, best, title: str, caption: str) -> str:
    datasets = list(dict.fromkeys(d for d, _ in cells.columns))
    shots = list(dict.fromkeys(k for _, k in cells.columns))
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "c" * len(cells.columns) + "}", r"\toprule",
             "Method & " + " & ".join(rf"\multicolumn{{{len(shots)}}}{{c}}{{{_tex_escape(d)}}}" for d in datasets) + r" \\",
             " & " + " & ".join(f"{k}-shot" for _ in datasets for k in shots) + r" \\", r"\midrule"]
    for m in cells.index:
        vals = []
        for c in cells.columns:
            v = _tex_escape(str(cells.loc[m, c]))
            vals.append(rf"\textbf{{{v}}}" if best.loc[m, c] else v)
        lines.append(_tex_escape(m) + " & " + " & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(title)}. {_tex_escape(caption)}}}",
              r"\end{table}", ""]
    return "\n".join(lines)


def write_tables(df: pd.DataFrame, out_dir: Path, methods, datasets, shots, ddof: int = 0,
                 n_seeds: Optional[int] = None, notes: Sequence[str] = ()) -> List[Path]:
    """``notes``: caption lines of the experiment (its ``caption`` key: budget rule, tuning split)."""
    out_dir = Path(out_dir)
    written = []
    std_name = "population std (ddof=0, as CoOp's parser)" if ddof == 0 else f"sample std (ddof={ddof})"
    for stem, (metric, title) in TABLES.items():
        if df.empty or not (df.metric == metric).any():
            continue
        cells, means, best = table(df, metric, methods, datasets, shots, ddof, n_seeds)
        caption = (f"Mean ± {std_name} over seeds {sorted(set(df.seed))}; best per column in bold"
                   + (" (lowest)." if metric in LOWER_IS_BETTER else ".")
                   + "".join(f" {n}" for n in notes))
        md = to_markdown(cells, best, title, caption)
        atomic_write_text(out_dir / f"{stem}.md", md)
        atomic_write_text(out_dir / f"{stem}.tex", to_latex(cells, best, title, caption))
        flat = cells.copy()
        flat.columns = _fmt_cols(cells.columns)
        atomic_write_text(out_dir / f"{stem}.csv", flat.rename_axis("method").to_csv())
        written += [out_dir / f"{stem}.{e}" for e in ("md", "tex", "csv")]
    return written


def write_figures(df: pd.DataFrame, out_dir: Path, methods, datasets, shots) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in FIGURE_METRICS:
        sub = df[df.metric == metric].copy()
        if sub.empty:
            continue
        sub["setting"] = sub["dataset"] + "\n" + sub["shots"].astype(str) + "-shot"
        order = [f"{d}\n{k}-shot" for d in datasets for k in shots]
        order = [o for o in order if o in set(sub.setting)]
        hue = [m for m in methods if m in set(sub.method)]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(order) * max(1, len(hue)) / 3), 4))
        sns.barplot(data=sub, x="setting", y="value", hue="method", order=order, hue_order=hue,
                    errorbar="sd", ax=ax)
        ax.set_xlabel("")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(dict((m, t) for m, t in TABLES.values()).get(metric, metric))
        ax.legend(fontsize=7, ncol=min(4, len(hue)))
        written.append(_save_figure(fig, out_dir / f"{metric}.png"))
    return written


def write_patch_figures(run_dirs: Iterable[Path], out_dir: Path) -> List[Path]:
    """Figure-5-style overlays: for each (method, dataset), the first run that saved a patch
    selection gets a grid of test images with the selected patches highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen, written = set(), []
    for d in run_dirs:
        p = Path(d) / "patches.npz"
        if not p.exists():
            continue
        method, dataset = Path(d).parent.name, Path(d).parent.parent.name
        if (method, dataset) in seen:
            continue
        seen.add((method, dataset))
        z = np.load(p)
        masks = [k for k in z.files if k.startswith("mask_")]
        imgs, (gh, gw) = z["images"], z["grid"]
        n = len(imgs)
        fig, axes = plt.subplots(1 + len(masks), n, figsize=(1.6 * n, 1.7 * (1 + len(masks))), squeeze=False)
        for j in range(n):
            axes[0, j].imshow(imgs[j])
            axes[0, j].set_title(str(z["labels"][j])[:28], fontsize=6)
            for r, key in enumerate(masks, start=1):
                m = z[key][j].reshape(gh, gw).astype(float)
                h, w = imgs[j].shape[:2]
                up = np.kron(m, np.ones((h // gh, w // gw)))
                shown = imgs[j].astype(float) / 255.0
                shown = shown * (0.25 + 0.75 * up[..., None])
                axes[r, j].imshow(shown)
                if j == 0:
                    axes[r, j].set_ylabel(key[len("mask_"):], fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{method} on {dataset}: patches kept by the selection (bright)", fontsize=8)
        written.append(_save_figure(fig, Path(out_dir) / f"patches_{method}_{dataset}.png"))
    return written


def _save_figure(fig, path: Path) -> Path:
    """tight_layout, then write the PNG atomically (a reader never sees half a file)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


STALE_NOTE = "STALE.txt"


def _derived_files(results: Path) -> List[Path]:
    results = Path(results)
    out = [results / "summary.csv"]
    for sub, exts in (("tables", ("md", "tex", "csv")), ("figures", ("png",))):
        for e in exts:
            out += sorted((results / sub).glob(f"*.{e}"))
    return [p for p in out if p.is_file()]


def mark_stale(results: Path, reasons: Sequence[str]) -> List[Path]:
    """The summary, tables and figures no longer describe the requested grid (a cell is missing,
    failed, damaged or ran with another config): each is renamed ``<name>.stale`` (never shown as
    current, never deleted) and ``tables/STALE.txt`` says why. Returns the renamed files."""
    results = Path(results)
    moved = []
    for p in _derived_files(results):
        target = p.with_name(p.name + ".stale")
        os.replace(p, target)
        moved.append(target)
    note = ("The summary, tables and figures of this results directory are stale: the requested grid "
            "is not complete or not one configuration per cell. The previous files are kept as "
            "*.stale. Rerun run_all.py (with --force where a config changed) to rebuild them.\n\n"
            + "".join(f"- {r}\n" for r in reasons))
    atomic_write_text(results / "tables" / STALE_NOTE, note)
    return moved


def clear_stale(results: Path) -> None:
    """After a complete rebuild: drop the stale marker and the superseded ``*.stale`` copies."""
    results = Path(results)
    (results / "tables" / STALE_NOTE).unlink(missing_ok=True)
    for p in [results / "summary.csv.stale"] + sorted((results / "tables").glob("*.stale")) \
            + sorted((results / "figures").glob("*.stale")):
        p.unlink(missing_ok=True)


CURVE_METRICS = ("acc", "auroc")


def write_curve(df: pd.DataFrame, tables_dir: Path, figures_dir: Optional[Path], points: Dict[str, tuple],
                axis: str, notes: Sequence[str] = ()) -> List[Path]:
    """A curve experiment (``curve:`` in its YAML): for each metric of CURVE_METRICS, a table (rows =
    methods, columns = the curve's values, cells = mean ± std over seeds; one table per dataset and
    shots) and one figure with a line per method (mean over seeds, std as a band)."""
    if df.empty:
        return []
    sub = df[df.method.isin(points) & df.metric.isin(CURVE_METRICS)].copy()
    sub["base"] = sub.method.map(lambda m: str(points[m][0]))
    sub["x"] = sub.method.map(lambda m: points[m][1])
    methods = list(dict.fromkeys(str(m) for m, _ in points.values()))
    xs = list(dict.fromkeys(v for _, v in points.values()))
    written: List[Path] = []
    g = sub.groupby(["dataset", "shots", "metric", "base", "x"])["value"]
    stats = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0).fillna(0.0), "n": g.count()}).reset_index()
    settings = list(dict.fromkeys(zip(stats.dataset, stats.shots)))
    lines = []
    for metric in CURVE_METRICS:
        for ds, k in settings:
            s = stats[(stats.metric == metric) & (stats.dataset == ds) & (stats.shots == k)]
            lines += [f"### {metric} against {axis}: {ds}, {k} shots", "",
                      f"| method | " + " | ".join(str(x) for x in xs) + " |", "|---|" + "---|" * len(xs)]
            for m in methods:
                cells = []
                for x in xs:
                    r = s[(s.base == m) & (s.x == x)]
                    cells.append(f"{r['mean'].iloc[0]:.1f} ± {r['std'].iloc[0]:.1f}" if len(r) else "–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            n = sorted(set(s.n.astype(int)))
            lines += ["", f"Mean ± population std over seeds (runs per point: {n})." + "".join(f" {t}" for t in notes), ""]
    path = Path(tables_dir) / "curve.md"
    atomic_write_text(path, "\n".join(lines))
    written.append(path)
    if figures_dir is None:
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds, k in settings:
        fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 3.8), squeeze=False)
        for ax, metric in zip(axes[0], CURVE_METRICS):
            s = stats[(stats.metric == metric) & (stats.dataset == ds) & (stats.shots == k)]
            for m in methods:
                r = s[s.base == m].set_index("x").reindex(xs).dropna()
                if r.empty:
                    continue
                x = [float(v) for v in r.index]
                ax.plot(x, r["mean"], marker="o", label=m)
                ax.fill_between(x, r["mean"] - r["std"], r["mean"] + r["std"], alpha=0.15)
            if all(isinstance(v, (int, float)) and v > 0 for v in xs):
                ax.set_xscale("log", base=2)
                ax.set_xticks([float(v) for v in xs], [str(v) for v in xs])
            ax.set_xlabel(axis)
            ax.set_ylabel(f"{metric} (%)")
            ax.set_title(f"{metric} on {ds}, {k} shots")
        axes[0, 0].legend(fontsize=7)
        written.append(_save_figure(fig, Path(figures_dir) / f"curve_{ds}_{k}shot.png"))
    return written
