"""Tissue QC (issue #31): artefact area removed and clean tissue lost, per artefact type, on the
shared real slide with artefacts painted in and on synthetic slides; and QC's cost next to
segmentation + tiling (--qc off) on the 40,000 x 30,000 px synthetic slide.

Artefacts are painted from ground-truth masks (`synthetic.artefact_masks` / `paint_artefacts`):
pen strokes (blue, green, red, black), a Gaussian-defocused band (sigma 3 um), a fold
(transmission ** 2.5) and a bubble. The real slide is painted at level 0 and written as a
pyramidal TIFF, so QC sees it through the same reader as any slide.

  removed = artefact area (within the segmented tissue) that QC cut out, any reason
  own      = the part cut out under the artefact's own reason (pens: its colour)
  clean lost = segmented tissue outside every artefact (dilated 24 um: painted edges are soft)
               that QC cut out

Thresholds are chosen on other seeds (synthetic 200-205; real painted 1-6, one kind per copy) than these.

Usage: python bench/bench_qc.py [--synthetic 3] [--runs 5] [--no-timing]
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, large_slide, median_time  # noqa: E402

from wsi_mil.config import QCConfig, TilingConfig  # noqa: E402
from wsi_mil.synthetic import (  # noqa: E402
    ARTEFACT_KINDS,
    artefact_masks,
    on_tissue,
    paint_artefacts,
    write_synthetic_slide,
)
from wsi_mil.wsi.qc import apply_qc  # noqa: E402
from wsi_mil.wsi.readers import open_slide  # noqa: E402
from wsi_mil.wsi.tiling import tile  # noqa: E402
from wsi_mil.wsi.tissue import rasterize_polygons, segment_tissue  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
GRID_UM = 4.0  # um/px of the evaluation grid (the synthetic ground truth's)


def write_tiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    import tifffile

    res = 10_000.0 / mpp
    with tifffile.TiffWriter(path) as tif:
        img, ds = rgb, 1
        while True:
            tif.write(
                img, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                resolution=(res / ds, res / ds), resolutionunit="CENTIMETER",
                subfiletype=0 if ds == 1 else 1, metadata=None,
            )  # fmt: skip
            if max(img.shape[:2]) <= 1024:
                break
            ds *= 4
            img = cv2.resize(rgb, (rgb.shape[1] // ds, rgb.shape[0] // ds), interpolation=cv2.INTER_AREA)


def evaluate(path: Path, truth: dict, cfg: QCConfig, painted: dict | None = None) -> dict:
    """Per kind: (artefact px, removed px, own-reason px); and (clean px, clean lost px)."""
    with open_slide(path) as slide:
        slide.thumbnail_at_mpp(cfg.detail_mpp)
        before = segment_tissue(slide)
        after = apply_qc(slide, before, cfg)
        px0 = GRID_UM / slide.mpp
        h, w = next(iter(truth.values())).shape
        pre = before.rasterize(w, h, px0) > 0
        post = after.rasterize(w, h, px0) > 0
        own = {r: rasterize_polygons(p, w, h, px0) > 0 for r, p in after.artefacts.items()}
    cut = pre & ~post
    rows = {}
    for kind, m in truth.items():
        area = m & pre
        mine = own.get(kind, np.zeros_like(m))
        rows[kind] = (int(area.sum()), int((area & cut).sum()), int((area & mine).sum()))
    any_art = np.zeros_like(pre)
    for m in (painted or truth).values():  # all paint, also over glass, is not clean tissue
        any_art |= m
    k = int(round(24 / GRID_UM))
    any_art = cv2.dilate(any_art.astype(np.uint8), np.ones((2 * k + 1,) * 2, np.uint8)) > 0
    clean = pre & ~any_art
    rows["_clean"] = (int(clean.sum()), int((clean & cut).sum()))
    rows["_qc"] = after.qc
    return rows


def real_case(cfg: QCConfig, seed: int = 0, together: bool = False) -> dict:
    """The real slide painted with each artefact kind on a copy of its own (the slide is
    1.1 x 1.5 mm: painted together, six artefacts overlap and one kind's area is removed under
    another's reason), or with all of them at once (`together`)."""
    with open_slide(REAL) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
        tissue = segment_tissue(slide)
    h, w = round(rgb.shape[0] * mpp / GRID_UM), round(rgb.shape[1] * mpp / GRID_UM)
    t = tissue.rasterize(w, h, GRID_UM / mpp) > 0
    kinds = ("pen_blue", "pen_green", "pen_red", "pen_black", "blur", "fold")
    CACHE.mkdir(exist_ok=True)
    rows: dict = {"_clean": (0, 0)}
    for group in [kinds] if together else [(k,) for k in kinds]:
        truth = on_tissue(artefact_masks(t, np.random.default_rng(seed), group, GRID_UM, scale_um=300), t)
        out = CACHE / "qc_real_painted.tif"
        write_tiff(out, paint_artefacts(rgb, truth, mpp, GRID_UM), mpp)
        found = evaluate(out, truth, cfg)
        rows.update({k: found[k] + (found["_clean"] if not together else ()) for k in group})
        rows["_clean"] = tuple(a + b for a, b in zip(rows["_clean"], found["_clean"]))
    return rows


def synthetic_case(i: int, cfg: QCConfig) -> dict:
    path = CACHE / f"qc_synthetic_{i}.tif"
    s = write_synthetic_slide(path, 3000, 2000, 0.5, tumor_regions=1, seed=100 + i, artefacts=True)
    truth = on_tissue(s.artefacts, s.tissue_mask)
    return evaluate(path, truth, cfg, s.artefacts)


def table(name: str, results: list[dict]) -> None:
    print(f"\n{name}: {len(results)} slide(s)")
    own_copy = all(len(r[k]) == 5 for r in results for k in ARTEFACT_KINDS if k in r)
    extra = " clean tissue lost on its copy |" if own_copy else ""
    print("| artefact | area (mm2) | removed | by its own reason |" + extra)
    print("|---|---|---|---|" + ("---|" if own_copy else ""))
    mm2 = (GRID_UM / 1000) ** 2
    for kind in ARTEFACT_KINDS:
        rows = [r[kind] for r in results if kind in r]
        if not rows:
            continue
        a, rem, own = (sum(x[i] for x in rows) for i in range(3))
        line = f"| {kind} | {a * mm2:.3f} | {100 * rem / max(a, 1):.1f}% | {100 * own / max(a, 1):.1f}% |"
        if own_copy:
            c, lost = (sum(x[i] for x in rows) for i in (3, 4))
            line += f" {100 * lost / max(c, 1):.2f}% |"
        print(line)
    c, lost = (sum(r["_clean"][i] for r in results) for i in range(2))
    print(f"| clean tissue lost | {c * mm2:.3f} | {100 * lost / max(c, 1):.2f}% | |")


def clean_loss(cfg: QCConfig, n: int) -> None:
    """Fraction of tissue QC removes on slides without artefacts (the real one, synthetic)."""
    paths = [REAL] + [
        write_synthetic_slide(
            CACHE / f"qc_clean_{i}.tif", 3000, 2000, 0.5, tumor_regions=1, seed=100 + i
        ).path
        for i in range(n)
    ]
    print("\nslides without artefacts: tissue fraction QC removes (by reason)")
    for p in paths:
        with open_slide(p) as slide:
            q = apply_qc(slide, segment_tissue(slide), cfg).qc
        reasons = {r: f for r, f in q["removed_fraction"].items() if f}
        print(f"  {p.name}: {100 * q['removed_total']:.2f}%  {reasons}")


def timing(runs: int) -> None:
    path = large_slide()
    cfg_t = TilingConfig(target_mpp=0.5, patch_size=256)

    def off():
        with open_slide(path) as slide:
            return len(tile(slide, segment_tissue(slide), cfg_t))

    def on():
        with open_slide(path) as slide:
            slide.thumbnail_at_mpp(QCConfig().detail_mpp)
            return len(tile(slide, apply_qc(slide, segment_tissue(slide), QCConfig(mode="remove")), cfg_t))

    off(), on()  # warm the page cache
    # interleaved, so a shared machine's load changes hit both alike; ratio = median of pairs
    pairs = [(median_time(off, 1), median_time(on, 1)) for _ in range(runs)]
    t_off, t_on = (float(np.median([p[i][0] for p in pairs])) for i in (0, 1))
    n_off, n_on = pairs[-1][0][1], pairs[-1][1][1]
    ratio = float(np.median([b[0] / a[0] for a, b in pairs]))
    print("\n40,000 x 30,000 px synthetic slide (open + segment + tile), median of", runs, "interleaved runs")
    print(f"| --qc off    | {t_off:.3f} s | {n_off} patches |")
    print(f"| --qc remove | {t_on:.3f} s | {n_on} patches | x{ratio:.2f} (median of per-run ratios) |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    cfg = QCConfig(mode="remove")
    if REAL.exists():
        table("CMU-1-Small-Region.svs, each kind painted on a copy of its own", [real_case(cfg)])
        table("CMU-1-Small-Region.svs, all kinds painted together", [real_case(cfg, together=True)])
    table("synthetic 3000 x 2000 um", [synthetic_case(i, cfg) for i in range(args.synthetic)])
    clean_loss(cfg, args.synthetic)
    if not args.no_timing:
        timing(args.runs)


if __name__ == "__main__":
    main()
