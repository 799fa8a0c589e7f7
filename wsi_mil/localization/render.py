"""Raster heatmaps from per-patch scores: overlapping patches averaged, tissue-only colour.

Scores are splatted onto a grid of `px_level0` level-0 pixels per cell with 2-D difference
arrays (vectorised box sums), so a patch contributes to every cell it covers and overlapping
patches average.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..wsi.tissue import TissueMask


def splat(
    coords: np.ndarray, values: np.ndarray, size0: float, shape: tuple[int, int], px_level0: float
) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) rasters [h, w] of `values` over their level-0 patch boxes."""
    h, w = shape
    acc = np.zeros((h + 1, w + 1), np.float64)
    cnt = np.zeros((h + 1, w + 1), np.float64)
    x0 = np.clip(np.round(coords[:, 0] / px_level0).astype(int), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / px_level0).astype(int), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + size0) / px_level0).astype(int), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + size0) / px_level0).astype(int), 0, h)
    for arr, v in ((acc, values.astype(np.float64)), (cnt, np.ones(len(values)))):
        np.add.at(arr, (y0, x0), v)
        np.add.at(arr, (y0, x1), -v)
        np.add.at(arr, (y1, x0), -v)
        np.add.at(arr, (y1, x1), v)
    return acc.cumsum(0).cumsum(1)[:h, :w], cnt.cumsum(0).cumsum(1)[:h, :w]


def score_raster(
    coords: np.ndarray,
    values: np.ndarray,
    size0: float,
    shape: tuple[int, int],
    px_level0: float,
    blur_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per cell and a coverage mask; optional normalised Gaussian blur."""
    acc, cnt = splat(coords, np.asarray(values, np.float64), size0, shape, px_level0)
    covered = cnt > 0.5
    if blur_px > 0:
        acc = cv2.GaussianBlur(acc, (0, 0), blur_px)
        cnt = cv2.GaussianBlur(cnt, (0, 0), blur_px)
    mean = np.where(cnt > 1e-6, acc / np.maximum(cnt, 1e-6), 0.0)
    return mean.astype(np.float32), covered


def colourise(values: np.ndarray, alpha_mask: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """RGBA uint8 of values in [0, 1]; transparent where alpha_mask is False."""
    import matplotlib

    rgba = (matplotlib.colormaps[cmap](np.clip(values, 0, 1)) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(alpha_mask, 255, 0).astype(np.uint8)
    return rgba


def heatmap_overlay(
    thumb: np.ndarray,
    thumb_px_level0: float,
    coords: np.ndarray,
    values: np.ndarray,
    size0: float,
    tissue: TissueMask | None = None,
    blur: bool = True,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """The thumbnail with the heatmap blended in, coloured only over scored tissue (never over
    an artefact quality control found). Unscored areas are shown in grey, so no colour of the
    slide itself (red ink, say) can be read as a score."""
    h, w = thumb.shape[:2]
    blur_px = 0.5 * size0 / thumb_px_level0 if blur else 0.0
    mean, covered = score_raster(coords, values, size0, (h, w), thumb_px_level0, blur_px)
    show = covered
    if tissue is not None and not tissue.is_empty:
        show &= tissue.rasterize_clean(w, h, thumb_px_level0).astype(bool)
    rgba = colourise(mean, show, cmap)
    a = (rgba[..., 3:4].astype(np.float32) / 255) * alpha
    base = thumb[..., :3].astype(np.float32)
    grey = base @ np.float32([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    base = np.where(show[..., None], base, grey[..., None])
    return (base * (1 - a) + rgba[..., :3].astype(np.float32) * a).astype(np.uint8)


def overlay_figure(overlay: np.ndarray, title: str, out_png, legend: str = "score") -> None:
    """Save the overlay with a colour bar (`legend` says what the number means) and a title."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from ..io import save_figure

    h, w = overlay.shape[:2]
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * h / w + 1.6))
    ax.imshow(overlay)
    ax.set_axis_off()
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), "jet"), ax=ax, orientation="horizontal", fraction=0.05, pad=0.03
    )
    bar.set_label(textwrap.fill(legend, 90), fontsize=10)
    bar.ax.tick_params(labelsize=9)
    fig.tight_layout()
    save_figure(out_png, fig, dpi=110)


def plot_reliability(result: dict, path, title: str) -> None:
    """Reliability diagram(s) of `{class: {layer: reliability()}}`: each bin's mean predicted
    probability against the share of its patches that are of the class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    fig, axes = plt.subplots(1, len(result), figsize=(5.2 * len(result), 5.4), squeeze=False)
    for ax, (name, layers) in zip(axes[0], result.items()):
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        for i, (layer, rel) in enumerate(layers.items()):
            xs = [b["mean_p"] for b in rel["bins"]]
            ys = [b["positive"] for b in rel["bins"]]
            (line,) = ax.plot(
                xs, ys, "-", alpha=0.6, label=f"{layer}: ECE {rel['ece']:.3f} ({rel['patches']} patches)"
            )
            sizes = [12 + 60 * np.log10(b["n"]) for b in rel["bins"]]  # marker area: patches in the bin
            ax.scatter(xs, ys, s=sizes, color=line.get_color(), zorder=3)
            for x, y, b in zip(xs, ys, rel["bins"]):  # each layer's counts on a row of their own
                ax.annotate(
                    str(b["n"]), (x, y), textcoords="offset points",
                    xytext=(5, -11 - 9 * i) if y > 0.5 else (5, 4 + 9 * i),
                    fontsize=7, color=line.get_color(), clip_on=False,
                )  # fmt: skip
        ax.set_xlabel(f"predicted P(patch is {name}); numbers: patches in the bin", fontsize=10)
        ax.set_ylabel(f"share of the bin's patches that are {name}", fontsize=10)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.04))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
