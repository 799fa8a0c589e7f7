"""Write labels.csv and slides.csv for a public cohort (and, for Camelyon16, annotations/:
links to the training and testing lesion XMLs, the folder configs/camelyon16.yaml names).

Usage: python pipelines/prepare_labels.py camelyon16 /data/CAMELYON16 --out work/
       python pipelines/prepare_labels.py tcga_nsclc /data/TCGA --out work/
"""

import argparse
from pathlib import Path

from wsi_mil.recipes import camelyon16, tcga_nsclc


def link_annotations(root: Path, out: Path) -> int:
    """Camelyon16: one folder of links to both splits' lesion XMLs; returns how many."""
    folder = out / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for split in ("train", "test"):
        for xml in sorted(camelyon16.annotation_dir(root, split).glob("*.xml")):
            link = folder / xml.name.lower()
            if not link.exists():
                link.symlink_to(xml.resolve())
            n += 1
    return n


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
    if args.dataset == "camelyon16":
        print(f"{link_annotations(args.root, args.out)} lesion annotations -> {args.out}/annotations")
    print(f"{len(table)} slides: {table.label.value_counts().to_dict()} -> {args.out}/labels.csv")
