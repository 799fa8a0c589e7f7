"""Same-run comparison of the CLI end to end between two checkouts (e.g. before and after a
refactor): `wsi-mil extract` on synthetic slides and `wsi-mil crossval` on a feature cohort,
median of --runs, each run into a fresh output folder.

Usage: python bench/bench_shape.py --old /path/to/old/checkout [--runs 3]
(the old checkout is imported through PYTHONPATH; `python -m wsi_mil.cli` runs in both).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsi_mil.synthetic import make_feature_cohort, write_synthetic_slide  # noqa: E402

EXTRACT = ["--encoder", "resnet18", "--random-weights", "--target-mpp", "1.0", "--patch-size", "128"]
TRAIN = ["--models", "abmil,psmil", "--folds", "3", "--epochs", "8", "--patience", "8", "--seed", "1"]


def timed(cmd, env, cwd) -> float:
    t0 = time.perf_counter()
    # cwd outside both checkouts: `python -m` puts the cwd first on sys.path
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=cwd)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    slides = work / "slides"
    slides.mkdir()
    for i in range(4):
        write_synthetic_slide(slides / f"s{i}.tif", 4000, 3000, 0.5, tumor_regions=i % 2, seed=20 + i)
    make_feature_cohort(work / "cohort", n_bags=64, dim=256, seed=3)
    new = str(Path(__file__).resolve().parents[1])
    results = {}
    for label, root in (("old", args.old), ("new", new)):
        env = {**os.environ, "PYTHONPATH": root}
        cli = [sys.executable, "-m", "wsi_mil.cli" if label == "old" else "wsi_mil"]
        ex, cv = [], []
        for r in range(args.runs):
            out = work / f"{label}{r}"
            ex.append(timed([*cli, "extract", str(slides), "--out", str(out / "w"), *EXTRACT], env, work))
            cohort = work / "cohort"
            cv_args = [
                "crossval",
                "--features",
                str(cohort / "features"),
                "--labels",
                str(cohort / "labels.csv"),
            ]
            cv.append(timed([*cli, *cv_args, "--out", str(out / "run"), *TRAIN], env, work))
            shutil.rmtree(out, ignore_errors=True)
        results[label] = e, c = float(np.median(ex)), float(np.median(cv))
        print(f"{label}: extract {e:.1f} s, crossval {c:.1f} s (median of {args.runs})", flush=True)
    (e0, c0), (e1, c1) = results["old"], results["new"]
    print(f"new/old: extract {e1 / e0:.3f}, crossval {c1 / c0:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
