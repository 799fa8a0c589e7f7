"""Quality-control rules: each a pure function of RGB pixels (uint8, OpenCV HSV conventions:
hue 0-180, saturation and value 0-255) returning a boolean mask of the same leading shape.

The colour rules take an image [H, W, 3] or a pixel list [N, 3] alike, so `wsi/qc.py` runs
them on the tissue pixels only. Sources of the rules and thresholds:
- background (white, greyspace, scanner black): HistoQC `LightDarkModule.
  getIntensityThresholdPercent` (`tissue`: gray > 0.9 is bright, RGB std < 10 is greyspace;
  `darktissue`: gray < 0.15); hs2p drops the same black/white/grey tiles.
- pen ink: the hue boxes of deephistopath's `filter_blue_pen` / `filter_green_pen` /
  `filter_red_pen` (python-wsi-preprocessing, histolab), written in HSV: H&E hues lie between
  purple and pink (OpenCV hue >= 130 or <= 10), so blue (95-130) and green (35-95) are ink;
  red ink shares eosin's hue and is told apart by its saturation.
- fold: a double layer of tissue roughly doubles its optical density (Kothari et al. 2013 and
  Bautista & Yagi 2010 use saturation and intensity); Beer-Lambert keeps its stain mix, so the
  rule compares density with tissue of the same mix (`fold_mask`); thresholds chosen on the
  real slide painted with seeds 1-6 and 13-18, a fold on a copy of its own, and synthetic
  seeds 200-231.
- bubble: HistoQC `getIntensityThresholdPercent:bubble` (gray 0.82-0.94, RGB std < 11):
  washed-out, colourless patches inside the tissue.
- blur: HistoQC `BlurDetectionModule.identifyBlurryRegions` (smoothed |Laplacian| of the
  gray image), made relative: blurred where the energy is below `blur_ratio` x the median
  of the slide's own tissue of the same brightness (stains, scanners and tissue types differ
  in contrast), averaged over the tissue inside the window so tissue edges are not called
  blurred; thresholds chosen on synthetic seeds 200-205 and the real slide painted with
  seeds 1-6 and 13-24 (each kind on a copy of its own), not the ones bench/bench_qc.py reports.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..config import QCConfig


def _cvt(rgb: np.ndarray, code: int) -> np.ndarray:
    """cv2 colour conversion of an image [H, W, 3] or a pixel list [N, 3] (as one row)."""
    if rgb.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(rgb)[None], code)[0]
    return cv2.cvtColor(rgb, code)


def _planes(rgb: np.ndarray) -> np.ndarray:
    """The three channels as contiguous planes [3, ...] (reductions over a last axis of 3 are
    slow in numpy)."""
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = _planes(rgb)
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hsv = _cvt(rgb, cv2.COLOR_RGB2HSV)
    return hsv[..., 0], hsv[..., 1], hsv[..., 2]


def _gray(rgb: np.ndarray) -> np.ndarray:
    return _cvt(rgb, cv2.COLOR_RGB2GRAY)


def _std(rgb: np.ndarray) -> np.ndarray:
    """Standard deviation across the three channels."""
    r, g, b = _planes(rgb).astype(np.float32)
    m = (r + g + b) / 3
    return np.sqrt(((r - m) ** 2 + (g - m) ** 2 + (b - m) ** 2) / 3)


def smooth(rgb: np.ndarray, px_um: float, cfg: QCConfig) -> np.ndarray:
    """The image the colour rules see: Gaussian-smoothed by `smooth_um` (averages single dark
    nuclei away, so dense tissue is judged by its mean colour)."""
    sigma = cfg.smooth_um / px_um
    return cv2.GaussianBlur(rgb, (0, 0), sigma) if sigma >= 0.3 else rgb


def white_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Near-white glass: gray > `white_gray` (HistoQC `tissue` upper_threshold 0.9 -> 230)."""
    return _gray(rgb) > cfg.white_gray


def greyspace_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Colourless grey (debris, shadows): RGB std across channels < `grey_std` (HistoQC
    `tissue` lower_std 10), above the black rule's value (dark neutral is ink or border)."""
    return (_std(rgb) < cfg.grey_std) & (_max_min(rgb)[0] >= cfg.black_value)


def black_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Dark and neutral: HSV value < `black_value` and max-min of RGB < `black_chroma`; or
    dark with a hue H&E does not have (11-129: inks over each other or over a fold turn dark
    teal, navy, olive). HistoQC's `darktissue` is gray < 0.15 (38); H&E's darkest purple
    (epidermis, dense nuclei) keeps its chroma and hue, black ink and scanner borders do not.
    HSV saturation is not used: on noisy near-black pixels it is high (why black borders pass
    tissue segmentation)."""
    v, lo = _max_min(rgb)
    dark = v < cfg.black_value
    if not dark.any():
        return dark
    h = _hsv(rgb)[0]
    return dark & (((v - lo) < cfg.black_chroma) | ((h > 10) & (h < 130)))


def pen_masks(rgb: np.ndarray, cfg: QCConfig) -> dict[str, np.ndarray]:
    """Coloured ink by hue: blue 95-130 (190-260 deg) and green 35-95 (70-190 deg) with
    saturation > `pen_saturation`; red at hue <= 8 or >= 172 (+-16 deg) with saturation >
    `red_saturation` (eosin is pink, hue 150-175, and below ~160 saturation on the thumbnail);
    black ink is `black_mask` (split from scanner borders in `qc_masks`)."""
    h, s, v = _hsv(rgb)
    lit = v >= 40  # hue is noise on near-black pixels
    return {
        "pen_blue": lit & (h >= 95) & (h < 130) & (s > cfg.pen_saturation),
        "pen_green": lit & (h >= 35) & (h < 95) & (s > cfg.pen_saturation),
        "pen_red": lit & ((h <= 8) | (h >= 172)) & (s > cfg.red_saturation),
    }


_OD = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)  # per 8-bit level


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density -log(I / 255) over the three channels (Beer-Lambert)."""
    r, g, b = _OD[_planes(rgb)]
    return (r + g + b) / 3


def spaced_cells(where: np.ndarray, most: int) -> np.ndarray:
    """Flat indices of at most `most` evenly spaced cells of the mask `where`: the cells of
    `x[where][::step]`, found without gathering every masked value first."""
    idx = np.flatnonzero(where)
    return idx[:: max(1, len(idx) // most)]


def robust_median(values: np.ndarray, where: np.ndarray, most: int = 20_000) -> float:
    """Median of at most `most` evenly spaced values of `values[where]` (a slide's tissue
    median to 1%)."""
    return float(np.median(values.ravel()[spaced_cells(where, most)]))


def fold_mask(
    rgb: np.ndarray, tissue: np.ndarray, cfg: QCConfig, reference: np.ndarray | None = None
) -> np.ndarray:
    """Folded tissue on an image [H, W, 3]: a double layer multiplies the optical density of
    every channel (Beer-Lambert), so it keeps its stain mix and gains density. Each tissue
    cell's density is compared with the median density of the `reference` tissue (default
    `tissue`; `qc_masks` leaves ink and background out of it) of the same stain mix (red
    channel's share of the density, `fold_bins` quantile bins; the medians are taken
    `fold_passes` times, each without the fold found before). Cells above `fold_od_ratio` x
    that median, or above `fold_dark_ratio` x the slide's median density (a fold over tissue
    of a mix too rare to fill a bin; the densest tissue of the unpainted real slide is 2.45 x),
    in regions of at least 4 cells, are grown over the connected cells above
    `fold_extend_ratio`. Mixes above the `fold_mix_quantile` (the most hematoxylin-rich tissue:
    a tumour nest, a micro-metastasis among stroma) are judged by the darkness alone. Against
    the slide-wide median alone (the rule until 2026-12-04) a fold on pale tissue is no darker
    than the slide's dense tissue: 55% of a fold painted alone on the real slide was found."""
    idx = np.flatnonzero(tissue)  # the rules run on the tissue cells only
    if not len(idx):
        return np.zeros(tissue.shape, bool)
    ref_t = np.ones(len(idx), bool) if reference is None else reference.ravel()[idx]
    if not ref_t.any():
        ref_t = np.ones(len(idx), bool)
    r, g, b = _OD[_planes(np.take(rgb.reshape(-1, 3), idx, axis=0))]
    od = (r + g + b) / 3
    mix = r / np.maximum(r + g + b, 1e-3)
    # the most hematoxylin-rich tissue (tumour nests, a micro-metastasis) is denser than the
    # median of any bin it falls in: judged by the dark arm only
    judged = mix <= np.quantile(mix[spaced_cells(ref_t, 20_000)], cfg.fold_mix_quantile)
    dark = od > cfg.fold_dark_ratio * max(robust_median(od, ref_t), 0.05)
    found = np.zeros(tissue.shape, bool)
    for i in range(cfg.fold_passes):  # again without the fold found: a large fold raises its bins
        ref_now = ref_t & ~found.ravel()[idx]
        if i and (not found.any() or ref_now.sum() < 0.5 * ref_t.sum()):
            break
        ratio = np.where(judged, od / np.maximum(_expected(mix, od, ref_now, cfg.fold_bins), 0.05), 0)
        found = _hysteresis(tissue, idx, (ratio > cfg.fold_od_ratio) | dark, ratio > cfg.fold_extend_ratio)
    return found


def _hysteresis(tissue: np.ndarray, idx: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The connected regions of `strong | weak` cells (given for the tissue cells `idx`) that
    hold a region of at least 4 `strong` cells (hysteresis, as Canny's edges)."""
    if not strong.any():
        return np.zeros(tissue.shape, bool)

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(tissue.size, np.uint8)
        out[idx] = values
        return out.reshape(tissue.shape)

    _, labels, stats, _ = cv2.connectedComponentsWithStats(scatter(strong), connectivity=8)
    big = stats[:, cv2.CC_STAT_AREA] >= 4
    big[0] = False  # the background label
    seeds = big[labels]
    if not seeds.any():
        return np.zeros(tissue.shape, bool)
    n, labels = cv2.connectedComponents(scatter(strong | weak), connectivity=8)
    grown = np.zeros(n, bool)
    grown[labels[seeds]] = True
    grown[0] = False
    return grown[labels]


def bubble_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Air bubbles and coverslip-edge washes: gray within `bubble_gray` and RGB std <
    `bubble_std` (HistoQC `bubble`: 0.82-0.94, upper_variance 11)."""
    g = _gray(rgb)
    lo, hi = cfg.bubble_gray
    return (g >= lo) & (g <= hi) & (_std(rgb) < cfg.bubble_std)


def detail_energy(rgb: np.ndarray, shape: tuple[int, int], row_step: int = 4) -> np.ndarray:
    """Mean |d2/dx2| of the gray image in each cell of a coarser grid `shape` (H, W) spanning
    the same field of view, from every `row_step`-th row: the Laplacian energy of HistoQC's
    blur module in one direction (defocus is isotropic); 4 um rows 16 um apart separate a
    3 um defocus from clean tissue as well as every row does (bench/bench_qc.py)."""
    g = _gray(rgb[::row_step])
    d2 = cv2.filter2D(g, cv2.CV_16S, np.array([[1, -2, 1]], np.float32))
    return cv2.resize(cv2.convertScaleAbs(d2), shape[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)


def _expected(level: np.ndarray, values: np.ndarray, ref: np.ndarray, bins: int) -> np.ndarray:
    """For each `level`, the median of `values` over the `ref` cells of about the same level
    (quantile bins of the reference, interpolated between bin centres)."""
    idx = spaced_cells(ref, 10_000)
    lv, vv = level[idx], values[idx]
    if bins <= 1 or len(lv) < 10 * bins:
        return np.full(level.shape, float(np.median(vv)), np.float32)
    parts = np.array_split(np.argsort(lv), bins)
    centres = np.array([np.median(lv[p]) for p in parts])
    medians = np.array([np.median(vv[p]) for p in parts])
    return np.interp(level, centres, medians).astype(np.float32)


def blur_from_energy(
    energy: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    cfg: QCConfig,
    reference: np.ndarray | None = None,
    level: np.ndarray | None = None,
) -> np.ndarray:
    """Out of focus: the detail `energy` averaged over the tissue within a window
    (`blur_window_um`: a box of that standard deviation) below `blur_ratio` x the median of
    the `reference` tissue (default `tissue`) of about the same brightness `level` (the
    smoothed gray, `blur_bins` quantile bins): dense and pale tissue differ in texture, and
    defocus keeps the mean colour. Extended by hysteresis (as Canny's edges) to nearby cells
    below `blur_extend_ratio`: the window blurs a defocused region's border. Cells at the
    tissue edge, and cells outside the `reference` (ink, background), are left out of the
    averages; the medians are taken twice, the second time without the cells the first found
    below `blur_extend_ratio` (a large defocused region would lower its own reference)."""
    ref_px = tissue if reference is None or not reference.any() else reference
    idx = np.flatnonzero(tissue)
    if not len(idx):
        return np.zeros(tissue.shape, bool)
    inner = cv2.erode(tissue.astype(np.uint8), np.ones((3, 3), np.uint8))
    inner_t = inner.ravel()[idx] > 0
    if inner_t.sum() < 0.25 * len(idx):  # thin tissue: use it all
        inner, inner_t = tissue.astype(np.uint8), np.ones(len(idx), bool)
    if reference is not None and (reference & (inner > 0)).any():
        inner = inner * reference  # ink (little gray detail) would blur its fringe
    t = inner.astype(np.float32)
    sigma = max(cfg.blur_window_um / px_um, 1.0)
    k = max(3, int(round(sigma * 12**0.5)) | 1)  # a box of the Gaussian's sigma, 3x faster
    local = (cv2.blur(energy * t, (k, k)) / np.maximum(cv2.blur(t, (k, k)), 1e-3)).ravel()[idx]
    ref_t = ref_px.ravel()[idx]
    ref_t = ref_t & inner_t if (ref_t & inner_t).any() else ref_t
    lv = level.ravel()[idx] if level is not None else local  # already smoothed: no window
    bins = cfg.blur_bins if level is not None else 1
    ratio = local / np.maximum(_expected(lv, local, ref_t, bins), 1e-3)
    sharp = ref_t & (ratio >= cfg.blur_extend_ratio)
    if sharp.sum() > 0.5 * ref_t.sum():  # again without the blurred cells (a robust median)
        ratio = local / np.maximum(_expected(lv, local, sharp, bins), 1e-3)

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(tissue.size, bool)
        out[idx] = values
        return out.reshape(tissue.shape)

    strong = ratio < cfg.blur_ratio
    if not strong.any() or cfg.blur_extend_ratio <= cfg.blur_ratio:
        return scatter(strong)
    reach = 2 * int(np.ceil(2 * sigma)) + 1
    near = cv2.dilate(scatter(strong).astype(np.uint8), np.ones((reach, reach), np.uint8)).ravel()[idx] > 0
    return scatter(near & (ratio < cfg.blur_extend_ratio))


def blur_mask(
    rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: QCConfig, reference: np.ndarray | None = None
) -> np.ndarray:
    """Out of focus, on the grid of `rgb` itself (`qc_masks` computes the energy on a finer
    image): `blur_from_energy` of the per-pixel detail energy. `rgb` should be at about
    4 um/px (a 3 um-sigma defocus is found there; at 8 um/px it is not)."""
    return blur_from_energy(detail_energy(rgb, tissue.shape, 1), tissue, px_um, cfg, reference)
