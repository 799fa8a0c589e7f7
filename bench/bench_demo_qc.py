"""The demo with and without painted artefacts: quality control must leave no patch on an
artefact and must not lower the localisation figures (issue: tissue QC).

Runs `run_demo` twice on the same cohort seeds (the slides differ only by the paint; see
`make_cohort(artefacts=...)`), QC in remove mode both times, and prints pooled and per-slide
patch AUCs of every layer, the share of tumour patches above 0.5, and the QC table.
Usage: python bench/bench_demo_qc.py [--out DIR] [--slides 24] [--cohort-seed 0]
       python bench/bench_demo_qc.py --limits 1,0.25 --cohort-seed 3

`--limits A,B,...`: instead, the painted demo once per `QCConfig.max_patch_artefact` (1: only
"more artefact than tissue" drops a patch), printing for every painted test slide the patches
kept, those touching an artefact and those above 0.5 with their artefact fraction (QC's polygons).
"""

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from shapely.geometry import box, shape
from shapely.ops import unary_union

from wsi_mil.config import QCConfig
from wsi_mil.demo import run_demo


def painted_patches(out: Path, sid: str) -> tuple[int, int, list[tuple[float, float]]]:
    """(patches, patches touching an artefact, [(score, artefact fraction)] of those > 0.5)."""
    scores = pd.read_csv(out / "heatmaps" / f"{sid}_scores.csv")
    layer = json.loads((out / "tissue" / f"{sid}_qc.geojson").read_text())
    arts = unary_union([shape(f["geometry"]) for f in layer["features"]])
    with h5py.File(out / "heatmaps" / f"{sid}_scores.h5") as f:
        size = float(f.attrs["patch_size_level0"])
    frac = np.array(
        [box(x, y, x + size, y + size).intersection(arts).area / size**2 for x, y in zip(scores.x, scores.y)]
    )
    hot = [(round(float(v), 3), round(float(f), 3)) for v, f in zip(scores.combined, frac) if v > 0.5]
    return len(scores), int((frac > 0).sum()), hot


def compare_limits(args) -> None:
    for limit in (float(v) for v in args.limits.split(",")):
        out = args.out / f"limit_{limit:g}"
        s = run_demo(
            out, args.slides, artefacts=0.5, log=lambda m: None, cohort_seed=args.cohort_seed,
            qc=QCConfig(mode="remove", max_patch_artefact=limit),
        )  # fmt: skip
        for sid in sorted(s["qc"]):
            if (out / "heatmaps" / f"{sid}_scores.csv").exists():
                n, touching, hot = painted_patches(out, sid)
                tumour = s["per_slide"][sid]["tumor"]
                print(
                    f"limit {limit:g} {sid} (tumour {tumour}): {n} patches, {touching} on an artefact,"
                    f" > 0.5 (score, artefact fraction): {hot}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_demo_qc"))
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--cohort-seed", type=int, default=0)
    ap.add_argument("--limits", default=None)
    args = ap.parse_args()
    if args.limits:
        return compare_limits(args)
    runs = {}
    for name, frac in (("with artefacts", 0.5), ("without", 0.0)):
        runs[name] = run_demo(
            args.out / name.replace(" ", "_"),
            args.slides,
            artefacts=frac,
            log=lambda m: None,
            cohort_seed=args.cohort_seed,
        )
    print("| run | test AUC psmil / abmil | layer | mean per-slide patch AUC | pooled patch AUC |")
    print("|---|---|---|---|---|")
    for name, s in runs.items():
        loc = s["localization"]
        for layer in loc["mean_slide_patch_auc"]:
            auc = " / ".join(f"{s['test_auc'][m]:.3f}" for m in ("psmil", "abmil"))
            print(
                f"| {name} | {auc} | {layer} | {loc['mean_slide_patch_auc'][layer]:.3f} | "
                f"{loc['pooled_patch_auc'][layer]:.3f} |"
            )
    for name, s in runs.items():
        per = {sid: (r["auc"], r["tumor_above_half"], r["above_half"]) for sid, r in s["per_slide"].items()}
        print(name, "per test slide (combined AUC, tumour above 0.5, all above 0.5):", json.dumps(per))
    qc = runs["with artefacts"]["qc"]
    on = sum(r["patch_centres_on_artefacts"] for r in qc.values())
    half = sum(r["patches_half_on_artefacts"] for r in qc.values())
    print(f"{len(qc)} painted slides; patch centres on an artefact: {on}; patches half on one: {half}")
    for sid, r in qc.items():
        print(sid, r["removed"], "total", r["removed_total"])


if __name__ == "__main__":
    main()
