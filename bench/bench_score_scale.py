"""Score-scale designs for heatmaps, measured on a finished demo folder (issue #13).

For the test slides of `<demo>/run`, with the fold models of one MIL model: pooled and per-slide
patch AUC against the ground-truth annotations, and the share of patches above 0.5, for
A: raw P(tumor) x relative evidence, C: the bag classifier applied to each patch (ABMIL/PSMIL),
D: C x relative evidence, E: P shifted by the fold threshold x relative evidence.

Usage: python bench/bench_score_scale.py <demo folder> [psmil|abmil]
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from shapely.geometry import MultiPolygon
from sklearn.metrics import roc_auc_score

from wsi_mil.formats.features import read_features
from wsi_mil.formats.run import RunFolder, load_ensemble
from wsi_mil.localization.evaluate import patch_tumor_fraction, read_annotation
from wsi_mil.localization.inversion import sparse_inversion
from wsi_mil.localization.scores import relative

DESIGNS = ("A_gateP", "C_instprob", "D_instprob_x_rel", "E_gate_thr")


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def slide_designs(models, ckpts, x, c) -> dict:
    out = {k: [] for k in DESIGNS}
    for m, ck in zip(models, ckpts):
        with torch.no_grad():
            o = m.eval()(x, c)
            p = torch.softmax(o.logits, -1)[1].item()
            inst = torch.softmax(m.classifier(o.extras["h"]), -1)[:, 1].numpy()
        inv = relative(sparse_inversion(m, x, c, 1).scores.numpy())
        rel = 0.5 * relative(o.instance_scores.numpy()) + 0.5 * inv
        shifted = 1 / (1 + np.exp(-(logit(p) - logit(ck.get("threshold") or 0.5))))
        out["A_gateP"].append(p * rel)
        out["C_instprob"].append(inst)
        out["D_instprob_x_rel"].append(inst * rel)
        out["E_gate_thr"].append(shifted * rel)
    return {k: np.mean(v, 0) for k, v in out.items()}


def main(root: Path, model: str) -> None:
    run = RunFolder(root / "run")
    _, models, ckpts = load_ensemble(run, model, "all", "cpu")
    splits = pd.read_csv(root / "run" / "splits.csv")
    pooled, truth = {k: [] for k in DESIGNS}, []
    for sid in splits[splits.split == "test"].slide_id:
        bag = read_features(next(root.rglob(f"features/*/{sid}.h5")))
        ann = root / "cohort" / "tumor_annotations" / f"{sid}.geojson"
        tumor = read_annotation(ann) if ann.exists() else MultiPolygon()
        frac = patch_tumor_fraction(bag.coords, float(bag.attrs.get("patch_size_level0", 128)), tumor)
        x, c = torch.from_numpy(bag.features).float(), torch.from_numpy(bag.coords)
        keep = (frac >= 0.5) | (frac <= 0)
        y = frac[keep] >= 0.5
        truth.append(y)
        for k, v in slide_designs(models, ckpts, x, c).items():
            pooled[k].append(v[keep])
            line = f"{sid} {k}: >0.5 {np.mean(v > 0.5):.3f} max {v.max():.3f}"
            if y.any() and not y.all():
                line += f" auc {roc_auc_score(y, v[keep]):.3f}"
            print(line)
    y = np.concatenate(truth)
    for k in DESIGNS:
        print(k, "pooled", round(roc_auc_score(y, np.concatenate(pooled[k])), 4))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "psmil")
