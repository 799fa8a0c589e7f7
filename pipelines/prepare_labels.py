"""Write labels.csv and slides.csv for a public cohort.

Usage: python pipelines/prepare_labels.py camelyon16 /data/CAMELYON16 --out work/
       python pipelines/prepare_labels.py tcga_nsclc /data/TCGA --out work/
"""

import argparse
from pathlib import Path

from wsi_mil.recipes import camelyon16, tcga_nsclc

BUILDERS = {"camelyon16": camelyon16.build_labels, "tcga_nsclc": tcga_nsclc.build_labels}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=sorted(BUILDERS))
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    table = BUILDERS[args.dataset](args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["path"]).to_csv(args.out / "labels.csv", index=False)
    table[["path"]].to_csv(args.out / "slides.csv", index=False)
    print(f"{len(table)} slides: {table.label.value_counts().to_dict()} -> {args.out}/labels.csv")
