"""Artefacts painted into synthetic and real slides, with ground-truth masks.

Pen strokes of four inks, a defocused band, a fold and a bubble, placed over the tissue, as
boolean masks at MASK_MPP um/px; `paint_artefacts` paints them into any RGB image whose pixel
size is known (a synthetic slide's tiles, a real slide's level 0). Quality control
(`wsi/qc.py`) is scored against these masks (bench/bench_qc.py).
"""

from __future__ import annotations

import cv2
import numpy as np

MASK_MPP = 4.0  # um/px of the ground-truth masks (as synthetic.MASK_MPP)

ARTEFACT_KINDS = ("pen_blue", "pen_green", "pen_red", "pen_black", "blur", "fold", "bubble")
INK = {  # transmission of each ink (multiplied into the tissue or glass under it)
    "pen_blue": (0.22, 0.32, 0.85),
    "pen_green": (0.28, 0.72, 0.40),
    "pen_red": (0.92, 0.14, 0.18),
    "pen_black": (0.12, 0.12, 0.13),
}
BLUR_UM = 3.0  # sigma of the painted defocus (found at 4 um/px; 1.5 um is not)
FOLD_POWER = 2.5  # a fold's transmission is the tissue's to this power (a double layer, stained more)
# Kinds whose ground truth is the part over tissue: over glass a defocus or a fold changes no
# pixel and a bubble only dims glass, which is not analysed; ink is seen over glass too.
ON_TISSUE_KINDS = ("blur", "fold", "bubble")


def on_tissue(masks: dict[str, np.ndarray], tissue: np.ndarray) -> dict[str, np.ndarray]:
    """The ground truth of painted `masks`: `ON_TISSUE_KINDS` within `tissue`, ink as painted."""
    return {k: m & tissue if k in ON_TISSUE_KINDS else m for k, m in masks.items()}


def artefact_masks(
    tissue: np.ndarray,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = ARTEFACT_KINDS,
    mask_mpp: float = MASK_MPP,
    scale_um: float | None = None,
) -> dict[str, np.ndarray]:
    """Ground-truth masks (on `tissue`'s grid, `mask_mpp` um/px) of artefacts placed over the
    tissue: pen strokes (a wandering line 120-220 um wide), a defocused band, a fold (a curved
    band 200-300 um wide) and a bubble (a disc, its outline drawn by `paint_artefacts`).
    Shapes scale with `scale_um` (default: a fifth of the tissue's shorter side)."""
    h, w = tissue.shape
    scale = (scale_um or min(h, w) * mask_mpp / 5) / mask_mpp  # px
    ys, xs = np.nonzero(cv2.erode(tissue.astype(np.uint8), np.ones((5, 5), np.uint8)))
    if not len(xs):
        ys, xs = np.nonzero(tissue)
    out = {}
    for kind in kinds:
        m = np.zeros((h, w), np.uint8)
        i = rng.integers(len(xs))
        c = np.array([xs[i], ys[i]], float)
        ang = rng.uniform(0, np.pi)
        d = np.array([np.cos(ang), np.sin(ang)])
        if kind.startswith("pen") or kind == "fold":
            n = 6
            bend = rng.normal(0, 0.25, n).cumsum()
            t = np.linspace(-1, 1, n)[:, None] * scale
            pts = c + t * d + (bend[:, None] * scale * 0.5) * np.array([-d[1], d[0]])
            width = rng.uniform(120, 220) if kind.startswith("pen") else rng.uniform(200, 300)
            cv2.polylines(m, [pts.round().astype(np.int32)], False, 1, max(1, int(width / mask_mpp)))
        elif kind == "blur":
            half = np.array([scale, 0.35 * scale])
            box = cv2.boxPoints(((c[0], c[1]), tuple(2 * half), np.degrees(ang)))
            cv2.fillPoly(m, [box.round().astype(np.int32)], 1)
        elif kind == "bubble":
            cv2.circle(m, tuple(c.round().astype(int)), max(2, int(0.45 * scale)), 1, -1)
        else:
            raise ValueError(f"unknown artefact kind {kind!r} (one of {', '.join(ARTEFACT_KINDS)})")
        out[kind] = m > 0
    return out


def paint_artefacts(
    rgb: np.ndarray,
    masks: dict[str, np.ndarray],
    px_um: float,
    mask_mpp: float = MASK_MPP,
    origin: tuple[float, float] = (0, 0),
) -> np.ndarray:
    """`rgb` (pixels of `px_um` um, top-left pixel at `origin` px of its level) with the
    artefacts of `masks` painted in: defocus (Gaussian, sigma BLUR_UM), fold (transmission to
    FOLD_POWER), bubble (washed interior, dark outline), then ink (transmission of INK)."""
    th, tw = rgb.shape[:2]
    scale = px_um / mask_mpp
    mx = (np.arange(tw, dtype=np.float32) + origin[0] + 0.5) * scale - 0.5
    my = (np.arange(th, dtype=np.float32) + origin[1] + 0.5) * scale - 0.5
    map_x = np.broadcast_to(mx[None, :], (th, tw)).astype(np.float32)
    map_y = np.broadcast_to(my[:, None], (th, tw)).astype(np.float32)

    def alpha(m):
        a = cv2.remap(m.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
        return np.clip((a - 0.5) * 4 + 0.5, 0, 1)[..., None]

    out = rgb.astype(np.float32)
    if "blur" in masks:
        a = alpha(masks["blur"])
        if a.any():
            out = a * cv2.GaussianBlur(out, (0, 0), BLUR_UM / px_um) + (1 - a) * out
    if "fold" in masks:
        a = alpha(masks["fold"])
        if a.any():
            t = np.maximum(out, 1) / 255
            out = 255 * t ** (1 + (FOLD_POWER - 1) * a)
    if "bubble" in masks:
        a = alpha(masks["bubble"])
        if a.any():
            out = (1 - 0.75 * a) * out + 0.75 * a * np.array([226, 226, 230], np.float32)
            rim_px = max(1, int(round(12 / px_um)))
            edge = (a[..., 0] > 0.5).astype(np.uint8)
            rim = (edge - cv2.erode(edge, np.ones((2 * rim_px + 1,) * 2, np.uint8)))[..., None] > 0
            out = np.where(rim, 0.3 * out + 0.7 * np.array([90, 90, 96], np.float32), out)
    for kind, ink in INK.items():
        if kind in masks:
            a = alpha(masks[kind])
            if a.any():
                out = out * (1 - a + a * np.array(ink, np.float32))
    return np.clip(out, 0, 255).astype(np.uint8)
