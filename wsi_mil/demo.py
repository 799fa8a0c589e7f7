"""`wsi-mil demo`: a synthetic cohort through every stage, with a report at the end.

synthesise slides (with ground-truth tumor masks; one tumour slide holds only a
micro-metastasis of 1-3 patches) -> extract (segment, tile, encode) -> crossval (PSMIL and ABMIL
on the same splits, patch calibration on the annotated out-of-fold slides) -> heatmap on the
test slides -> evaluate-localization -> report.html. The test split is written into labels.csv
(whole cases, the micro-metastasis among them, so the report shows it on held-out slides).
Every stage skips work already done, so a second run resumes at once. Encoder weights are random (nothing can be downloaded offline); the
synthetic tumor differs from normal tissue in colour and texture, which random
convolutional features still separate.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .config import PipelineConfig, QCConfig, TilingConfig, TrainConfig
from .errors import WsiMilError
from .io import write_json, write_text
from .pipeline.layout import Layout
from .pipeline.runner import run_stage
from .pipeline.stages import ExtractStage
from .training.report import markdown_html
from .wsi.collect import SlideEntry

DEMO_TILING = TilingConfig(target_mpp=1.0, patch_size=128, min_tissue=0.5)


def test_split(labels: pd.DataFrame, micro: str, n_each: int = 3, seed: int = 0) -> list[str]:
    """'test' for whole cases until at least `n_each` tumour and `n_each` normal slides are in,
    starting with the micro-metastasis slide's case; 'train' for the rest."""
    case_of = dict(zip(labels.slide_id, labels.case_id))
    cases = [case_of[micro]] + list(np.random.default_rng(seed).permutation(sorted(set(labels.case_id))))
    chosen: set = set()
    for case in cases:
        test = labels[labels.case_id.isin(chosen)]
        if (test.label == "tumor").sum() >= n_each and (test.label == "normal").sum() >= n_each:
            break
        chosen.add(case)
    return ["test" if c in chosen else "train" for c in labels.case_id]


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _img_tag(path: Path, width: int = 360) -> str:
    if not path.exists():
        return "<em>missing</em>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}">'


def run_demo(
    out: str | Path = "wsi_mil_demo",
    n_slides: int = 24,
    encoder: str = "resnet18",
    epochs: int = 30,
    folds: int = 5,
    n_heatmaps: int = 3,
    log: Callable[[str], None] = print,
    artefacts: float = 0.5,
    qc: QCConfig | None = None,
    cohort_seed: int = 0,
) -> dict:
    """Run the whole pipeline on a synthetic cohort; returns timings and headline metrics.

    A fraction `artefacts` of the slides carry painted pen, blur, fold and bubble artefacts
    (ground truth in cohort/artefact_annotations/), which quality control removes (`qc`, default
    remove mode). `cohort_seed` draws another cohort (benches choose settings on those)."""
    from .localization.evaluate import evaluate_folder
    from .pipeline.heatmap import HeatmapRequest, heatmap_slide
    from .synthetic import make_cohort
    from .training.crossval import run_crossval

    out = Path(out)
    timings = {}
    t0 = time.perf_counter()
    cohort_dir = out / "cohort"
    slides_dir = cohort_dir / "slides"
    truth_dir = cohort_dir / "tumor_annotations"
    artefact_dir = cohort_dir / "artefact_annotations"
    if not (cohort_dir / "labels.csv").exists() or len(list(slides_dir.glob("*.tif"))) < n_slides:
        log(f"synthesising {n_slides} slides (one with a micro-metastasis)")
        cohort = make_cohort(cohort_dir, n_slides, seed=cohort_seed, micro=1, artefacts=artefacts)
        truth_dir.mkdir(parents=True, exist_ok=True)
        artefact_dir.mkdir(parents=True, exist_ok=True)
        for s in cohort:
            (truth_dir / f"{s.path.stem}.geojson").write_text(json.dumps(s.tumor_geojson()))
            if s.artefacts:
                (artefact_dir / f"{s.path.stem}.geojson").write_text(json.dumps(s.artefact_geojson()))
        micro = next(s.path.stem for s in cohort if s.is_tumor)  # make_cohort's first tumour slide
        labels = pd.read_csv(cohort_dir / "labels.csv")
        labels["split"] = test_split(labels, micro, n_each=max(1, round(n_slides / 8)))
        labels["lesion"] = ["micro-metastasis" if sid == micro else "" for sid in labels.slide_id]
        labels.to_csv(cohort_dir / "labels.csv", index=False)
    timings["synthesise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = PipelineConfig(tiling=DEMO_TILING, qc=qc or QCConfig(mode="remove"))
    cfg.extract.encoder, cfg.extract.random_weights, cfg.extract.workers = encoder, True, 0
    layout = Layout(out)
    entries = [SlideEntry(p) for p in sorted(slides_dir.glob("*.tif"))]

    extraction = run_stage(
        ExtractStage(layout, cfg), entries, on_start=lambda e, i, n: log(f"extract [{i + 1}/{n}] {e.name}")
    )
    if not extraction.ok:
        raise WsiMilError(f"demo: extraction failed for {', '.join(extraction.failed)}")
    timings["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # 18 training slides: an inner selection split would leave ~3 slides to pick each fold's
    # epoch (PSMIL attention patch AUC 0.26 vs 0.92 with selection on the fold; benchmarks.md).
    # The demo's results are the held-out test slides, untouched by either choice; the report
    # marks the fold numbers as optimistic.
    train = TrainConfig(
        folds=folds,
        test_frac=0.25,
        epochs=epochs,
        patience=10,
        lr=2e-4,
        seed=0,
        bootstrap=500,
        selection="outer",
    )
    run_dir = out / "run"
    results = run_crossval(
        layout.features_dir(encoder),
        cohort_dir / "labels.csv",
        run_dir,
        train,
        ["psmil", "abmil"],
        progress=log,
        annotations=truth_dir,
    )
    timings["crossval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    splits = pd.read_csv(run_dir / "splits.csv")
    test = splits[splits.split == "test"].sort_values("label", ascending=False)
    heat_dir = out / "heatmaps"
    labels = pd.read_csv(cohort_dir / "labels.csv").fillna("")
    micro = set(labels.slide_id[labels.get("lesion", pd.Series(dtype=str)) == "micro-metastasis"])
    tumours = sorted(test.slide_id[test.label_name == "tumor"], key=lambda sid: sid not in micro)
    normals = test.slide_id[test.label_name != "tumor"].tolist()
    shown = (tumours[: max(1, n_heatmaps - 1)] + normals)[:n_heatmaps]
    summaries = []
    for sid in test.slide_id:  # score every test slide (cheap); full exports for a few
        if (
            not (heat_dir / f"{sid}_scores.h5").exists()
            or sid in shown
            and not (heat_dir / f"{sid}.html").exists()
        ):
            summaries.append(
                heatmap_slide(
                    slides_dir / f"{sid}.tif",
                    run_dir,
                    heat_dir,
                    features=layout.features(encoder, sid),
                    work=out,
                    request=HeatmapRequest("psmil", viewer=sid in shown, target="tumor"),
                    cfg=cfg,
                )
            )
            log(f"heatmap {sid}")
        else:
            summaries.append({"slide": sid, "probabilities": ""})
    timings["heatmap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    loc = evaluate_folder(heat_dir, truth_dir)
    write_json(heat_dir / "localization.json", loc)
    timings["evaluate"] = time.perf_counter() - t0

    slide_p = {r["slide"]: r["probabilities"] for r in summaries}
    summary = {
        "test_auc": {r["model"]: r["test"]["auc"] for r in results},
        "test_accuracy": {r["model"]: r["test"]["accuracy"] for r in results},
        "localization": {
            k: loc[k]
            for k in ("mean_slide_patch_auc", "pooled_patch_auc", "pooled_patch_auc_shuffled", "slide_auc")
        },
        "ece": {k: v["ece"] for k, v in loc["reliability"].items()},
        "froc": {k: v["froc"] for k, v in loc["froc"].items()},
        "per_slide": {
            sid: {
                "tumor": r["tumor"],
                "micro_metastasis": sid in micro,
                "tumor_patches": r["tumor_patches"],
                **{k: r["combined"][k] for k in ("auc", "top", "tumor_above_half", "above_half")},
            }
            for sid, r in loc["per_slide"].items()
        },
        "qc": qc_summary(layout, encoder, artefact_dir),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    from .localization.render import plot_reliability

    plot_reliability({"tumor": loc["reliability"]}, heat_dir / "reliability.png", "psmil: test slides")
    _write_report(out, run_dir, heat_dir, truth_dir, slides_dir, shown, summary, encoder, slide_p)
    write_json(out / "summary.json", summary)
    return summary


def qc_summary(layout: Layout, encoder: str, artefact_dir: Path) -> dict:
    """Per slide with painted artefacts: the tissue fraction QC removed by each reason and the
    patches left over a ground-truth artefact (centre inside it; and more than half covered;
    `SyntheticSlide.artefact_geojson`: blur, fold and bubble where they cover tissue)."""
    import shapely

    from .formats.features import read_features
    from .formats.tissue_geojson import geojson_to_polygons, read_tissue

    out = {}
    for path in sorted(artefact_dir.glob("*.geojson")):
        sid = path.stem
        truth = shapely.union_all(
            list(geojson_to_polygons(json.loads(path.read_text())).geoms)
        )  # kinds overlap
        bag = read_features(layout.features(encoder, sid), validate=False)
        size = float(bag.attrs["patch_size_level0"])
        xy = bag.coords.astype(float)
        centre = shapely.contains_xy(truth, xy[:, 0] + size / 2, xy[:, 1] + size / 2)
        boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + size, xy[:, 1] + size)
        covered = shapely.area(shapely.intersection(boxes, truth)) / size**2
        qc = read_tissue(layout.tissue(sid)).qc or {}
        out[sid] = {
            "removed": {r: f for r, f in (qc.get("removed_fraction") or {}).items() if f},
            "removed_total": qc.get("removed_total"),
            "patches": len(xy),
            "patch_centres_on_artefacts": int(centre.sum()),
            "patches_half_on_artefacts": int((covered > 0.5).sum()),
        }
    return out


def _qc_section(qc: dict) -> str:
    """The report's quality-control table (slides with painted artefacts)."""
    if not qc:
        return ""
    rows = "".join(
        f"<tr><td>{sid}</td><td>{', '.join(f'{k} {100 * v:.1f}%' for k, v in r['removed'].items()) or 'none'}</td>"
        f"<td>{r['patches']}</td><td>{r['patch_centres_on_artefacts']}</td><td>{r['patches_half_on_artefacts']}</td></tr>"
        for sid, r in qc.items()
    )
    return f"""<h2>Tissue quality control</h2>
<p>Slides with painted artefacts (pen ink, a defocused band, a fold, a bubble; ground truth in
cohort/artefact_annotations/: ink wherever painted, the others where they cover tissue). Quality control (<code>--qc remove</code>) cut them out of the
tissue before tiling: the table gives the share of each slide's tissue removed per reason and
the patches that still lie on a painted artefact.</p>
<table><tr><th>slide</th><th>tissue removed, by reason</th><th>patches</th><th>patch centres on an artefact</th>
<th>patches more than half on an artefact</th></tr>{rows}</table>"""


def _truth_png(slide_path: Path, truth: Path, png: Path) -> None:
    """The slide thumbnail with the ground-truth tumor outlined (for the report)."""
    import cv2

    from .formats.tissue_geojson import read_geojson_polygons
    from .io import save_png
    from .wsi.readers import open_slide

    with open_slide(slide_path) as s:
        thumb, mpp = s.thumbnail_at_mpp(8.0)
        px = mpp / s.mpp
    img = thumb.copy()
    for poly in read_geojson_polygons(truth).geoms:
        pts = (np.asarray(poly.exterior.coords)[:, :2] / px).astype(np.int32)
        cv2.polylines(img, [pts], True, (0, 0, 0), 2)
    save_png(png, img)


def _write_report(out, run_dir, heat_dir, truth_dir, slides_dir, shown, summary, encoder, slide_p):
    report_md = (run_dir / "report.md").read_text()
    report_md = "\n".join(report_md.splitlines()[1:])  # its title: this page has its own
    rows = []
    for sid in shown:
        truth_png = heat_dir / f"{sid}_truth.png"
        if not truth_png.exists():
            _truth_png(slides_dir / f"{sid}.tif", truth_dir / f"{sid}.geojson", truth_png)
        rows.append(
            f"<tr><td>{sid}<br>{html.escape(slide_p.get(sid, ''))}<br><a href='heatmaps/{sid}.html'>open viewer</a></td>"
            f"<td>{_img_tag(truth_png)}</td><td>{_img_tag(heat_dir / f'{sid}_heatmap.png', 460)}</td></tr>"
        )
    loc = summary["localization"]
    loc_rows = "".join(
        f"<tr><td>{n}</td><td>{_num(loc['mean_slide_patch_auc'][n])}</td><td>{_num(loc['pooled_patch_auc'][n])}</td>"
        f"<td>{_num(loc['pooled_patch_auc_shuffled'][n])}</td><td>{_num(summary['ece'].get(n))}</td>"
        f"<td>{_num(summary['froc'][n])}</td></tr>"
        for n in loc["mean_slide_patch_auc"]
    )
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
    slide_rows = "".join(
        f"<tr><td>{sid}{' (micro-metastasis)' if r['micro_metastasis'] else ''}</td><td>{html.escape(slide_p.get(sid, ''))}</td>"
        f"<td>{r['tumor_patches']}</td><td>{_num(r['auc'])}</td><td>{_num(r['top'])}</td>"
        f"<td>{pct(r['tumor_above_half'])}</td><td>{pct(r['above_half'])}</td></tr>"
        for sid, r in summary["per_slide"].items()
    )
    timing_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in summary["timings_s"].items())
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>wsi-mil demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:20px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}</style></head><body>
<h1>wsi-mil demo report</h1>
<p>A synthetic cohort (tumor and normal slides with ground-truth tumor masks; one tumour slide
holds only a micro-metastasis of a few patches) run through segmentation, tiling, feature
extraction ({html.escape(encoder)}, <b>random weights</b>: no download is possible offline, so
features are random convolutional features), 5-fold cross-validation of PSMIL and ABMIL with a
held-out test set, patch calibration on the annotated out-of-fold slides, heatmaps and
localization against the ground truth.</p>
<h2>Slide-level classification</h2>{markdown_html(report_md, run_dir)}
<p>{_img_tag(run_dir / "psmil" / "roc.png", 320)} {_img_tag(run_dir / "abmil" / "roc.png", 320)}</p>
<h2>Localization on the test slides (PSMIL)</h2>
<p>combined and patch_alone: the probability that a patch is tumour (calibrated out of fold);
attention and inversion: ranks within each slide. Per-slide patch AUC is the mean over the
tumour slides; the pooled AUC is shown beside the pooled AUC of the same scores shuffled within
each slide (what the pooled number owes to telling slides apart, not patches); ECE is the
expected calibration error of the probability layers over all labelled test patches; FROC is
Camelyon16's lesion-level score (its Evaluation_FROC.py protocol). Slide AUC
{_num(loc.get("slide_auc"))}.</p>
<table><tr><th>layer</th><th>per-slide patch AUC</th><th>pooled AUC</th><th>pooled, shuffled within slides</th><th>ECE</th><th>FROC</th></tr>{loc_rows}</table>
<h3>Per test slide (combined layer)</h3>
<table><tr><th>slide</th><th>slide probabilities</th><th>tumour patches</th><th>patch AUC</th><th>top patch</th><th>tumour patches above 0.5</th><th>all patches above 0.5</th></tr>{slide_rows}</table>
<h3>Reliability of the patch probabilities (test slides)</h3>
<p>{_img_tag(heat_dir / "reliability.png", 460)}</p>
<h2>Heatmaps next to ground truth</h2>
<table><tr><th>slide</th><th>ground truth (black outline)</th><th>PSMIL combined: P(patch is tumor)</th></tr>{"".join(rows)}</table>
{_qc_section(summary["qc"])}
<h2>Stage timings (s)</h2><table>{timing_rows}</table>
</body></html>"""
    write_text(out / "report.html", page)
