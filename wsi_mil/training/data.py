"""Labels, leak-free splits and bag datasets for slide-level training.

Labels CSV: `slide_id,label` plus optional `case_id` (patient) and `split` (train/test).
Splits follow the PSMIL paper's protocol (appendix A.3, after DTFD-MIL and DSMIL): a held-out
test set (the `split` column, else a stratified fraction drawn by case), and k stratified folds
over the rest, grouped by case so no patient sits on both sides of a split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import WsiMilError
from ..formats.features import feature_files, read_features
from ..wsi.slide import SLIDE_SUFFIXES, slide_id

LABEL_COLUMNS = ("slide_id", "label", "case_id", "split")  # read whatever their case
log = logging.getLogger("wsi_mil")


@dataclass
class Cohort:
    table: pd.DataFrame  # slide_id, label (int), label_name, case_id, path, [split]
    classes: list[str]


def read_label_table(labels_csv: str | Path) -> pd.DataFrame:
    """The labels CSV as written by users: headers in any case, ids as slide file names, labels
    trimmed, repeated rows kept once; one line naming the file for anything it cannot take."""
    labels_csv = Path(labels_csv)
    if not labels_csv.exists():
        raise WsiMilError(f"{labels_csv}: labels file not found; check the path given to --labels")
    df = pd.read_csv(labels_csv, dtype=str)
    df.columns = [str(c).strip() for c in df.columns]
    df = df.rename(columns={c: c.lower() for c in df.columns if c.lower() in LABEL_COLUMNS})
    missing_cols = {"slide_id", "label"} - set(df.columns)
    if missing_cols:
        header = ",".join(map(str, df.columns))
        hint = next(
            (
                f"; its header has a '{sep}': separate columns with commas"
                for sep in (";", "\t")
                if sep in header
            ),
            "",
        )
        raise WsiMilError(
            f"{labels_csv}: needs columns slide_id,label (missing {', '.join(sorted(missing_cols))}; "
            f"header: {header[:80]}){hint}"
        )
    df = df.dropna(subset=["slide_id", "label"])
    df["label"] = df["label"].str.strip()
    # ids written as file names (tumor_001.svs) name the slide the feature file is named after
    df["slide_id"] = [
        slide_id(s) if Path(s).suffix.lower() in SLIDE_SUFFIXES else s for s in df.slide_id.str.strip()
    ]
    _refuse_duplicates(df, labels_csv)
    repeated = int(df.slide_id.duplicated().sum())
    if repeated:
        log.warning(
            "%s: %d repeated row(s) of the same slide with the same values, kept once", labels_csv, repeated
        )
    return df.drop_duplicates("slide_id")


def load_labels(labels_csv: str | Path, features_dir: str | Path, allow_missing: bool = False) -> Cohort:
    """Match label rows to `<features_dir>/<slide_id>.h5`; one clear error for any mismatch."""
    labels_csv, features_dir = Path(labels_csv), Path(features_dir)
    files = {p.stem: p for p in feature_files(features_dir)}
    df = read_label_table(labels_csv)
    no_file = sorted(set(df.slide_id) - set(files))
    no_label = sorted(set(files) - set(df.slide_id))
    if no_file or no_label:
        parts = []
        if no_file:
            parts.append(
                f"{len(no_file)} labelled slide(s) have no feature file in "
                f"{features_dir}: {', '.join(no_file[:8])}"
            )
        if no_label:
            parts.append(
                f"{len(no_label)} feature file(s) have no label in {labels_csv}: {', '.join(no_label[:8])}"
            )
        msg = "; ".join(parts)
        if not allow_missing:
            raise WsiMilError(msg + " (fix the CSV, or pass --allow-missing to skip them)")
        log.warning("%s (skipped)", msg)
        df = df[~df.slide_id.isin(no_file)]
    if df.empty:
        raise WsiMilError(f"{labels_csv}: no labelled slide has features in {features_dir}")
    names = df["label"].astype(str)
    numeric = pd.to_numeric(df["label"], errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        classes = [str(int(v)) for v in sorted(numeric.unique())]
        names = numeric.astype(int).astype(str)
    else:
        classes = sorted(names.unique())
        spellings = pd.Series(classes).groupby(pd.Series(classes).str.lower()).agg(list)
        clash = next((s for s in spellings if len(s) > 1), None)
        if clash:
            raise WsiMilError(
                f"{labels_csv}: labels {' and '.join(map(repr, clash))} differ only in case; write one "
                "spelling for each class"
            )
    df = df.assign(
        label_name=names.values,
        label=names.map({c: i for i, c in enumerate(classes)}).values,
        path=df.slide_id.map(lambda s: str(files[s])),
    )
    if "case_id" not in df.columns:
        df["case_id"] = df["slide_id"]
    df["case_id"] = df["case_id"].fillna(df["slide_id"])
    if "split" in df.columns:
        df["split"] = df["split"].fillna("train").str.lower()
        bad = sorted(set(df.split) - {"train", "test"})
        if bad:
            raise WsiMilError(f"{labels_csv}: split column must be train or test (found {bad})")
        both = sorted(c for c, g in df.groupby("case_id").split if g.nunique() > 1)
        if both:
            raise WsiMilError(
                f"{labels_csv}: {len(both)} case(s) have slides on both sides of the split column "
                f"({', '.join(map(str, both[:5]))}{', ...' if len(both) > 5 else ''}); give all slides of a "
                "case the same split, so no patient is in training and test"
            )
    if len(classes) < 2:
        raise WsiMilError(f"{labels_csv}: needs at least two classes (found {classes})")
    return Cohort(df.reset_index(drop=True), classes)


def _refuse_duplicates(df: pd.DataFrame, labels_csv: Path) -> None:
    """A slide named twice with different labels (or splits, or cases) is an error naming both rows."""
    cols = [c for c in ("label", "case_id", "split") if c in df.columns]
    for sid, group in df.groupby("slide_id", sort=False):
        distinct = group[cols].astype(str).drop_duplicates()
        if len(distinct) > 1:
            rows = [int(i) + 2 for i in group.index[:2]]  # CSV line numbers (header is line 1)
            a, b = (", ".join(f"{c}={v}" for c, v in r.items()) for r in distinct.head(2).to_dict("records"))
            raise WsiMilError(
                f"{labels_csv}: slide {sid} appears on lines {rows[0]} and {rows[1]} with conflicting "
                f"values ({a} vs {b}); keep one row per slide"
            )


def stratified_group_folds(labels, groups, k, seed, warn: str = "") -> np.ndarray:
    """Fold index per row; k reduced when a class has fewer cases than k (said in a warning
    about `warn`, the split's name, when given)."""
    per_class = int(pd.Series(groups).groupby(np.asarray(labels)).nunique().min())
    k_eff = max(2, min(k, per_class))
    if k_eff < k and warn:
        log.warning(
            "%s: only %d case(s) in the smallest class, so %d parts instead of %d", warn, per_class, k_eff, k
        )
    fold = np.full(len(labels), -1)
    cv = StratifiedGroupKFold(n_splits=k_eff, shuffle=True, random_state=seed)
    for i, (_, val) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        fold[val] = i
    return fold


def make_splits(cohort: Cohort, folds: int = 5, test_frac: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """Add `split` (train/test) and `fold` (validation fold of each train slide) columns."""
    df = cohort.table.copy()
    if "split" not in df.columns:
        df["split"] = "train"
        if test_frac > 0:
            _refuse_small_classes(df, cohort.classes, 3, "a test split and folds", ", or pass --test-frac 0")
            n_parts = max(2, int(round(1 / test_frac)))
            test_fold = stratified_group_folds(
                df.label.values,
                df.case_id.values,
                n_parts,
                seed,
                warn=f"test split (--test-frac {test_frac:g})",
            )
            df.loc[test_fold == 0, "split"] = "test"
            if test_fold.max() + 1 < n_parts:
                log.warning(
                    "the test split holds 1/%d of the cases (%d of %d slides), not %g",
                    test_fold.max() + 1, int((df.split == "test").sum()), len(df), test_frac,
                )  # fmt: skip
    train = df.split == "train"
    _refuse_small_classes(df[train], cohort.classes, 2, "cross-validation (every fold must train on it)", "")
    if train.sum() < 4:
        given = "split" in cohort.table.columns
        fix = "put more slides in the train split" if given else "add slides or lower --test-frac"
        raise WsiMilError(
            f"only {int(train.sum())} training slides: too few for {folds}-fold cross-validation "
            f"(needs 4); {fix}"
        )
    df["fold"] = -1
    df.loc[train, "fold"] = stratified_group_folds(
        df.label[train].values, df.case_id[train].values, folds, seed + 1, warn="cross-validation folds"
    )
    return df


def _refuse_small_classes(df: pd.DataFrame, classes: list[str], least: int, purpose: str, fix: str) -> None:
    """One line naming every class with fewer than `least` cases in `df`: with fewer, a class
    lands on one side only, and the other side's models never see it."""
    cases = df.groupby("label").case_id.nunique().reindex(range(len(classes)), fill_value=0)
    few = [f"{classes[i]} ({n})" for i, n in cases.items() if n < least]
    if few:
        raise WsiMilError(
            f"too few cases for {purpose}: {', '.join(few)}, needs {least} per class; add cases, or "
            f"merge the class into another{fix}"
        )


def load_bags(paths: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every bag read once and validated (float16 features, coords), keyed by path; a bad file
    stops here with one line naming it, before any training output is written."""
    out = {}
    for p in paths:
        bag = read_features(p)
        out[p] = (torch.from_numpy(bag.features.astype(np.float16)), torch.from_numpy(bag.coords))
    return out


def validate_bags(paths: list[str]) -> None:
    """Read and validate every bag once without keeping it (the lazy-loading path)."""
    for p in paths:
        read_features(p)


class BagDataset(torch.utils.data.Dataset):
    """Bags from feature files: (features float32 [N, D], coords [N, 2], label).

    `preload=True` keeps every bag in RAM as float16 (half the memory, one read per file);
    otherwise files are opened lazily on each access (safe with DataLoader workers).
    `max_instances` samples that many instances per bag (training only, seeded per access).
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        preload: bool = True,
        max_instances: int | None = None,
        seed: int = 0,
        loaded: dict | None = None,
    ):
        self.paths, self.labels = list(paths), list(labels)
        self.max_instances = max_instances
        self.rng = np.random.default_rng(seed)
        self.cache = None
        if preload:
            loaded = loaded if loaded is not None else {}
            missing = [p for p in self.paths if p not in loaded]
            loaded.update(load_bags(missing))
            self.cache = [loaded[p] for p in self.paths]

    @property
    def in_dim(self) -> int:
        return int(self[0][0].shape[1])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.cache is not None:
            feats, coords = self.cache[i]
        else:
            bag = read_features(self.paths[i])
            feats, coords = torch.from_numpy(bag.features), torch.from_numpy(bag.coords)
        if self.max_instances and len(feats) > self.max_instances:
            idx = np.sort(self.rng.choice(len(feats), self.max_instances, replace=False))
            feats, coords = feats[idx], coords[idx]
        return feats.float(), coords, torch.tensor(self.labels[i])
