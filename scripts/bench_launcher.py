#!/usr/bin/env python
"""Overhead of ``run_all.py --launcher local`` (submitit subprocesses) against ``--launcher inline``
on the same small grid, each timed end to end as a fresh ``python run_all.py`` command into its own
empty results folder (so both pay Python's start, and each its own feature cache and split files).

    python scripts/bench_launcher.py                                  # quick grid, zsclip + clip_adapter
    python scripts/bench_launcher.py --args "--experiment quick --methods zsclip" --packs 1,4

Prints the wall time of each command and its ratio to inline. Keep the grid small: it runs it
1 + len(--packs) times.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--args", default="--experiment quick --methods zsclip,clip_adapter",
                    help="run_all.py arguments naming the grid")
    ap.add_argument("--packs", default="1,4", help="--pack values to time with the local launcher")
    a = ap.parse_args()
    base = [sys.executable, str(ROOT / "run_all.py"), *shlex.split(a.args), "--no-figures"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ossl-bench-launcher-") as tmp:
        for name, extra in [("inline", ["--launcher", "inline"])] + [
                (f"local, pack {p}", ["--launcher", "local", "--pack", p]) for p in a.packs.split(",")]:
            out = Path(tmp) / name.replace(", ", "_").replace(" ", "")
            cmd = base + ["--results-dir", str(out), *extra]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", file=sys.stderr)
                return r.returncode
            n = len(list((out / "runs").rglob("result.json")))
            tables = (out / "tables" / "table1_acc.csv").read_text()
            rows.append((name, dt, n, tables))
    ref = rows[0]
    print(f"grid: run_all.py {a.args}  ({ref[2]} runs)")
    for name, dt, n, tables in rows:
        same = "same table" if tables == ref[3] else "TABLE DIFFERS"
        print(f"  {name:<14} {dt:7.1f} s   x{dt / ref[1]:.2f} of inline   {n} runs, {same}")
    return 0 if all(r[3] == ref[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
