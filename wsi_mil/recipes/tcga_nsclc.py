"""TCGA-NSCLC (LUAD vs LUSC) labels from GDC download folders.

Slides under a folder named for their project (`TCGA-LUAD/...`, `TCGA-LUSC/...`) get that
label; `case_id` is the patient barcode (first 12 characters, e.g. TCGA-05-4244), so all
slides of one patient stay on one side of every split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import WsiMilError

PROJECTS = {"TCGA-LUAD": "LUAD", "TCGA-LUSC": "LUSC"}


def build_labels(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    rows = []
    for project, label in PROJECTS.items():
        for p in sorted((root / project).rglob("*.svs")):
            rows.append({"slide_id": p.stem, "label": label, "case_id": p.name[:12], "path": str(p)})
    if not rows:
        raise WsiMilError(
            f"{root}: no slides under TCGA-LUAD/ or TCGA-LUSC/ (download the "
            "diagnostic slides of both projects from the GDC portal)"
        )
    return pd.DataFrame(rows).drop_duplicates("slide_id")
