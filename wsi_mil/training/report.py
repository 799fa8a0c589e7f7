"""The crossval report: `report.md` (one comparison table over the models of a run) and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import TrainConfig
from ..io import save_figure, write_text
from ..models import model_class
from .metrics import METRICS, MIN_CLASS_FOR_CI, intervals_supported
from .optim import resolve_recipe


def save_plots(
    model_dir: Path,
    model_name: str,
    y: np.ndarray | None,
    mean_prob: np.ndarray | None,
    histories: list[pd.DataFrame],
    classes: list[str],
) -> None:
    """training_curves.png (loss and validation AUC per fold) and roc.png (test ensemble)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, h in enumerate(histories):
        axes[0].plot(h.epoch, h.train_loss, label=f"fold {k} train")
        axes[0].plot(h.epoch, h.val_loss, "--", label=f"fold {k} val")
        axes[1].plot(h.epoch, h.val_auc, label=f"fold {k}")
    axes[0].set(xlabel="epoch", ylabel="loss", title=f"{model_name}: loss")
    axes[1].set(xlabel="epoch", ylabel="AUC", title=f"{model_name}: validation AUC")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(model_dir / "training_curves.png", fig)
    if y is None or len(np.unique(y)) < 2:
        return
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in range(mean_prob.shape[1]) if mean_prob.shape[1] > 2 else [1]:
        fpr, tpr, _ = roc_curve(y == c, mean_prob[:, c])
        ax.plot(fpr, tpr, label=classes[c])
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=f"{model_name}: test ROC (ensemble)"
    )
    ax.legend()
    fig.tight_layout()
    save_figure(model_dir / "roc.png", fig)


def _fmt(v, ci=None) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _of_folds(result: dict, metric: str) -> str:
    """ " (n of k folds)" where some folds had no value (a fold without every class has no AUC)."""
    n, k = result.get("val_folds", {}).get(metric), len(result.get("folds", []))
    return f" ({n} of {k} folds)" if n is not None and n < k else ""


def test_heading(test: pd.DataFrame) -> tuple[str, bool]:
    """The test table's heading (with n per class) and whether it shows bootstrap intervals."""
    names = test.label_name if "label_name" in test else test.label
    per_class = ", ".join(f"{n} {c}" for c, n in sorted(names.value_counts().items()))
    with_ci = intervals_supported(names)
    heading = f"## Test set ({per_class}): majority vote of the fold models (AUC from mean probability)"
    if with_ci:
        return heading + ", 95% bootstrap CI", True
    note = f"no bootstrap intervals: fewer than {MIN_CLASS_FOR_CI} test slides of a class"
    return f"{heading}; {note}", False


def qc_table(table: pd.DataFrame) -> pd.DataFrame | None:
    """Per slide (`table`: slide_id, path) the tissue fraction quality control removed by each
    reason, from its feature file's `qc_*` attributes; None when no file has them."""
    from ..formats.features import read_feature_attrs

    rows = []
    for sid, path in zip(table.slide_id, table.path):
        attrs = read_feature_attrs(path)[0]
        if "qc_removed" in attrs:
            rows.append({"slide_id": sid, **{k[3:]: attrs[k] for k in sorted(attrs) if k.startswith("qc_")}})
    return pd.DataFrame(rows) if rows else None


def qc_lines(qc: pd.DataFrame | None, out: Path, most_rows: int = 40) -> list[str]:
    """The report's quality-control section (the full table goes to qc.csv)."""
    if qc is None:
        return []
    qc.to_csv(out / "qc.csv", index=False)
    reasons = [c for c in qc.columns if c not in ("slide_id", "mode", "removed", "flagged") and qc[c].any()]
    flagged = qc.slide_id[qc.flagged.astype(bool)].tolist()
    lines = [
        "## Tissue quality control",
        "",
        f"{len(qc)} slides; tissue removed per slide: median {100 * qc.removed.median():.1f}%, "
        f"max {100 * qc.removed.max():.1f}% ({qc.slide_id[qc.removed.idxmax()]}); flagged (kept): "
        + (", ".join(flagged) if flagged else "none")
        + ". Per slide and reason in `qc.csv`.",
        "",
    ]
    shown = qc.sort_values("removed", ascending=False).head(most_rows)
    lines += ["| slide | removed | " + " | ".join(reasons) + " |", "|---" * (len(reasons) + 2) + "|"]
    for _, r in shown.iterrows():
        cells = " | ".join(f"{100 * r[c]:.1f}%" for c in reasons)
        lines.append(f"| {r.slide_id} | {100 * r.removed:.1f}% | {cells} |")
    if len(qc) > most_rows:
        lines.append(f"\nThe {most_rows} slides with most tissue removed; all in `qc.csv`.")
    return [*lines, ""]


def write_report(
    out: Path, results: list[dict], splits: pd.DataFrame, cfg: TrainConfig, qc: pd.DataFrame | None = None
) -> str:
    n_test = int((splits.split == "test").sum())
    n_train = int((splits.split == "train").sum())
    grouped = (
        "grouped by case"
        if "case_id" not in splits or (splits.case_id.astype(str) != splits.slide_id.astype(str)).any()
        else "each slide its own case: no case_id given, so one patient's slides may sit on both sides"
    )
    lines = [
        "# wsi-mil cross-validation report",
        "",
        f"{n_train} training slides in {splits[splits.split == 'train'].fold.nunique()} "
        f"folds ({grouped}), {n_test} held-out test slides; seed {cfg.seed}.",
        "",
    ]
    header = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    if n_test:
        heading, with_ci = test_heading(splits[splits.split == "test"])
        lines += [heading, "", *header]
        for r in results:
            cis = {m: r["test_ci"][m] if with_ci else None for m in METRICS}
            lines.append(
                f"| {r['model']} | " + " | ".join(_fmt(r["test"][m], cis[m]) for m in METRICS) + " |"
            )
        lines.append("")
        with_patients = [r for r in results if "test_patient" in r]
        if with_patients:
            n = with_patients[0]["test_patient"]["patients"]
            lines += [
                f"## Test set per patient ({n} patients; each fold model's slide probabilities "
                "averaged per case_id, then voted)",
                "",
                *header,
            ]
            for r in with_patients:
                lines.append(
                    f"| {r['model']} | " + " | ".join(f"{r['test_patient'][m]:.3f}" for m in METRICS) + " |"
                )
            lines.append("")
        elif skipped := next(
            (r["test_patient_skipped"] for r in results if "test_patient_skipped" in r), None
        ):
            lines += [f"No per-patient metrics: {skipped}, so a patient has no one label.", ""]
    inner = all(r.get("selection") == "inner" for r in results)
    estimate = (
        "the held-out test set is the unbiased estimate"
        if n_test
        else "with no held-out test set (`--test-frac 0`) this run has no unbiased estimate"
    )
    note = (
        "Selection-free: each fold is scored by a model whose epoch and threshold were chosen on "
        "another (inner) fold of the training data; the fold never influenced a choice."
        if inner
        else "Optimistic: each fold's metrics are taken at the epoch and threshold chosen on that "
        f"same fold (`selection: outer`); {estimate}."
    )
    fallback = {
        r["model"]: r["selection_fallback_folds"] for r in results if r.get("selection_fallback_folds")
    }
    if fallback:
        folds = "; ".join(f"{m}: fold(s) {', '.join(str(k) for k in ks)}" for m, ks in fallback.items())
        every = all(len(fallback.get(r["model"], [])) == len(r.get("folds", [])) for r in results)
        note = (
            f"{'Optimistic' if every else 'Partly optimistic'}: too few cases for an inner selection split "
            f"in {'every fold' if every else 'some folds'}, which chose their epoch and threshold on the "
            f"reported fold itself (`--selection-fallback`; {folds}); "
            f"{'' if every else 'the other folds are selection-free; '}{estimate}."
        )
    lines += ["## Cross-validation folds: mean +/- std", "", note, "", *header]
    for r in results:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(
                f"{r['val_mean'][m]:.3f} +/- {r['val_std'][m]:.3f}{_of_folds(r, m)}" for m in METRICS
            )
            + " |"
        )
    lines += ["", "## Training recipes (config.yaml has them in full)", ""]
    for r in results:
        rec = resolve_recipe(r["model"], cfg, n_bags=len(splits))
        if getattr(model_class(r["model"]), "slide_level", False):  # fitted in closed form
            lines.append(f"- {r['model']}: {rec.source}")
            continue
        settings = ", ".join(f"{k} {v}" for k, v in rec.kwargs(cfg.model_kwargs).items())
        lines.append(
            f"- {r['model']}: {rec.optimizer} lr {rec.lr:g}, weight decay {rec.weight_decay:g}, "
            f"schedule {rec.schedule}" + (f"; {settings}" if settings else "") + f". {rec.source}"
        )
    lines += ["", *patch_calibration_lines(results)]
    lines += ["", *qc_lines(qc, out)]
    lines += [
        "",
        "Per model: `<model>/metrics.json`, `predictions.csv`, `roc.png`, `training_curves.png`"
        + (
            ", `patch_calibration.json` (and `patch_reliability.png` with annotations)"
            if any("patch_calibration" in r for r in results)
            else ""
        )
        + "; per fold: `model.pt`, `threshold.json`, `history.csv`.",
    ]
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", f"<!DOCTYPE html><html><body>{markdown_html(text, out)}</body></html>\n")
    return text


def patch_calibration_lines(results: list[dict]) -> list[str]:
    """The report's section on the patch probabilities: how each model's were calibrated, and
    their reliability on the annotated test slides when annotations were given."""
    if not any("patch_calibration" in r for r in results):  # only linear probes: no patches
        return []
    lines = [
        "## Patch probabilities (heatmaps): calibration",
        "",
        "A heatmap's combined and patch_alone layers give the probability that a patch is of the "
        "class, calibrated on the out-of-fold slides (`patch_calibration.json`): with annotations "
        "from the annotated patches, without from the MIL assumption that every patch of a slide "
        "of another class is negative.",
        "",
        "| model | class | mode | fitted on | share of the class's own patches | test ECE (combined) "
        "| test ECE (patch alone) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, cal in r.get("patch_calibration", {}).items():
            rel = r.get("patch_reliability", {}).get(name, {})
            ece = [
                _fmt(rel[layer]["ece"]) if layer in rel else "n/a" for layer in ("combined", "patch_alone")
            ]
            annotated = cal.get("annotated_slides", 0)
            fitted = f"{cal['slides']} slides ({annotated} annotated), {cal['patches']} patches"
            prior = _fmt(cal.get("prior")) if cal.get("prior") is not None else "n/a"
            lines.append(
                f"| {r['model']} | {name} | {cal['mode']} | {fitted} | {prior} | {ece[0]} | {ece[1]} |"
            )
    for r in results:
        if "patch_reliability" in r:
            lines += [
                "",
                f"![{r['model']}: patch reliability on the test slides]({r['model']}/patch_reliability.png)",
            ]
    return lines


def markdown_html(text: str, base: Path | None = None) -> str:
    """HTML of the Markdown this module writes: headings, pipe tables, paragraphs, `code`, and
    images `![alt](path)` (a line of their own; inlined as data URIs from `base`, so the page
    stands alone wherever it is copied)."""
    import base64
    import html
    import re

    def inline(t: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(t))

    out, para, rows = [], [], []

    def flush():
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><tr>{head}</tr>{trs}</table>")
            rows.clear()

    for line in text.splitlines():
        image = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if image and base is not None and (base / image.group(2)).exists():
            flush()
            data = base64.b64encode((base / image.group(2)).read_bytes()).decode()
            alt = html.escape(image.group(1))
            out.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}" width="520"></p>')
            continue
        heading = re.match(r"(#+) (.*)", line)
        if line.startswith("|"):
            if para:
                flush()
            rows.append(line)
        elif heading or not line.strip():
            flush()
            if heading:
                level = len(heading.group(1)) + 1  # the page's own title is the h1
                out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        else:
            if rows:
                flush()
            para.append(line.strip())
    flush()
    return "\n".join(out)
