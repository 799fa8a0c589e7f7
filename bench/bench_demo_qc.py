"""The demo with and without painted artefacts: quality control must leave no patch on an
artefact and must not lower the localisation figures (issue: tissue QC).

Runs `run_demo` twice on the same cohort seeds (the slides differ only by the paint; see
`make_cohort(artefacts=...)`), QC in remove mode both times, and prints pooled and per-slide
patch AUCs of every layer, the share of tumour patches above 0.5, and the QC table.
Usage: python bench/bench_demo_qc.py [--out DIR] [--slides 24]
"""

import argparse
import json
from pathlib import Path

from wsi_mil.demo import run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_demo_qc"))
    ap.add_argument("--slides", type=int, default=24)
    args = ap.parse_args()
    runs = {}
    for name, frac in (("with artefacts", 0.5), ("without", 0.0)):
        runs[name] = run_demo(
            args.out / name.replace(" ", "_"), args.slides, artefacts=frac, log=lambda m: None
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
