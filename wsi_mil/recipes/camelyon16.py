"""Camelyon16 labels from the dataset's own layout (Bejnordi et al., JAMA 2017).

training/normal/normal_*.tif -> normal, training/tumor/tumor_*.tif -> tumor (split train);
testing/images/test_*.tif with testing/reference.csv (`Test_001,Tumor,...` / `Test_002,Normal`)
-> split test. Tumor annotations (ASAP XML) sit in */lesion_annotations/ for localization.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from ..errors import WsiMilError


def build_labels(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    rows = []
    for label in ("normal", "tumor"):
        for p in sorted((root / "training" / label).glob(f"{label}_*.tif")):
            rows.append(
                {"slide_id": p.stem, "label": label, "case_id": p.stem, "split": "train", "path": str(p)}
            )
    ref = root / "testing" / "reference.csv"
    if ref.exists():
        with open(ref, newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip():
                    continue
                sid = row[0].strip().lower()
                p = root / "testing" / "images" / f"{sid}.tif"
                if p.exists():
                    rows.append(
                        {
                            "slide_id": sid,
                            "label": row[1].strip().lower(),
                            "case_id": sid,
                            "split": "test",
                            "path": str(p),
                        }
                    )
    if not rows:
        raise WsiMilError(
            f"{root}: no Camelyon16 slides found (expected training/normal, "
            "training/tumor and testing/images with testing/reference.csv)"
        )
    return pd.DataFrame(rows)


def annotation_dir(root: str | Path, split: str) -> Path:
    return Path(root) / ("training" if split == "train" else "testing") / "lesion_annotations"
