"""Synthetic whole-slide images with ground truth, for tests, benchmarks and the demo.

Slides are written as pyramidal, tiled, JPEG-compressed TIFFs (the generic-TIFF layout that
OpenSlide and tiffslide both read) with microns-per-pixel in the resolution tags. Tissue is an
H&E-like texture (pink stroma, purple nuclei) on a white background, in irregular pieces with
holes; tumor regions are denser, larger, darker nuclei on a more basophilic background.
Pixels are rendered tile by tile from physical-space masks, so slide size costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .synthetic_artefacts import (  # noqa: F401
    ARTEFACT_KINDS,
    BLUR_UM,
    ON_TISSUE_KINDS,
    artefact_masks,
    on_tissue,
    paint_artefacts,
)
from .synthetic_bags import grid_coords, make_feature_cohort  # noqa: F401

TEXTURE_MPP = 0.25  # um/px of the master textures
TEXTURE_SIZE = 1024  # px, so textures repeat every 256 um
MASK_MPP = 4.0  # um/px of the ground-truth masks


@dataclass
class SyntheticSlide:
    """A written synthetic slide and its ground truth (masks at `mask_mpp` um/px)."""

    path: Path
    mpp: float
    size: tuple[int, int]
    tissue_mask: np.ndarray
    tumor_mask: np.ndarray
    mask_mpp: float = MASK_MPP
    artefacts: dict[str, np.ndarray] = field(default_factory=dict)  # ground truth per kind

    @property
    def is_tumor(self) -> bool:
        return bool(self.tumor_mask.any())

    def mask_fraction(self, mask: np.ndarray, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Fraction of each level-0 patch (top-left coords, side size_level0) covered by mask."""
        from .wsi.tiling import box_fractions

        scale = self.mpp / self.mask_mpp
        x0, y0 = np.round(coords * scale).astype(int).T
        x1, y1 = np.round((coords + size_level0) * scale).astype(int).T
        return box_fractions(mask.astype(np.float32), x0, y0, x1, y1)

    def tumor_fraction(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        return self.mask_fraction(self.tumor_mask, coords, size_level0)

    def tumor_geojson(self) -> dict:
        """Ground-truth tumor regions as a GeoJSON FeatureCollection in level-0 pixels."""
        from .formats.tissue_geojson import polygons_to_geojson
        from .wsi.tissue import mask_to_polygons

        polys = mask_to_polygons(
            self.tumor_mask, self.mask_mpp / self.mpp, min_area_px=0, min_hole_px=0, max_holes=64
        )
        return polygons_to_geojson(polys, "Tumor", (200, 0, 0))

    def artefact_geojson(self) -> dict:
        """Ground-truth artefacts in level-0 pixels, one QuPath class per kind (wsi.qc.REASONS);
        blur, fold and bubble where they cover tissue (`ON_TISSUE_KINDS`), ink wherever painted."""
        from .formats.tissue_geojson import polygons_to_geojson
        from .wsi.qc import REASONS
        from .wsi.tissue import mask_to_polygons

        features = []
        for kind, m in on_tissue(self.artefacts, self.tissue_mask).items():
            if not m.any():
                continue
            polys = mask_to_polygons(m, self.mask_mpp / self.mpp, min_area_px=0, min_hole_px=0, max_holes=64)
            features += polygons_to_geojson(polys, *REASONS[kind])["features"]
        return {"type": "FeatureCollection", "features": features}


def _smooth_noise(shape, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    field = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigma_px)
    return field / (field.std() + 1e-6)


def make_masks(
    width_um: float,
    height_um: float,
    rng: np.random.Generator,
    n_pieces: int = 3,
    tumor_regions: int = 0,
    tumor_radius_um: tuple[float, float] = (250, 600),
    mask_mpp: float = MASK_MPP,
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular tissue pieces with holes, and tumor blobs inside the tissue."""
    h, w = int(round(height_um / mask_mpp)), int(round(width_um / mask_mpp))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tissue = np.zeros((h, w), bool)
    noise = _smooth_noise((h, w), 150 / mask_mpp, rng)
    cols = int(np.ceil(np.sqrt(n_pieces * w / h)))
    rows = int(np.ceil(n_pieces / cols))
    cells = rng.permutation(rows * cols)[:n_pieces]
    for cell in cells:
        r, c = divmod(int(cell), cols)
        cw, ch = w / cols, h / rows
        cx, cy = (c + rng.uniform(0.4, 0.6)) * cw, (r + rng.uniform(0.4, 0.6)) * ch
        ax, ay = cw * rng.uniform(0.28, 0.4), ch * rng.uniform(0.28, 0.4)
        ang = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / ax
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ay
        tissue |= (u**2 + v**2 + 0.25 * noise) < 1.0
    # Holes: lumina / fat, well above the default minimum hole area.
    ys, xs = np.nonzero(cv2.erode(tissue.astype(np.uint8), np.ones((41, 41), np.uint8)))
    for _ in range(min(len(xs), 2 * n_pieces)):
        i = rng.integers(len(xs))
        rad = rng.uniform(150, 250) / mask_mpp
        tissue &= (xx - xs[i]) ** 2 + (yy - ys[i]) ** 2 > rad**2
    tumor = np.zeros((h, w), bool)
    ys, xs = np.nonzero(cv2.erode(tissue.astype(np.uint8), np.ones((61, 61), np.uint8)))
    for _ in range(tumor_regions if len(xs) else 0):
        i = rng.integers(len(xs))
        rad = rng.uniform(*tumor_radius_um) / mask_mpp
        tumor |= ((xx - xs[i]) ** 2 + (yy - ys[i]) ** 2 + 0.3 * rad**2 * noise) < rad**2
    tumor &= tissue
    return tissue, tumor


def _texture(kind: str, seed: int) -> np.ndarray:
    """A periodic H&E-like texture at TEXTURE_MPP (float32 RGB in 0..255)."""
    rng = np.random.default_rng(seed)
    n = TEXTURE_SIZE
    if kind == "tumor":
        base, nuc, density, radius = (196, 128, 200), (70, 30, 120), 0.0040, (5.0, 9.0)
    else:
        base, nuc, density, radius = (236, 168, 196), (105, 60, 145), 0.0012, (3.0, 5.0)
    tex = np.empty((n, n, 3), np.float32)
    tex[:] = base
    fibres = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), 6)
    fibres = cv2.resize(cv2.resize(fibres, (n, n // 6)), (n, n))
    tex += 60 * fibres[..., None] * np.array([0.2, 0.5, 0.3], np.float32)
    canvas = np.zeros((3 * n, 3 * n), np.float32)
    count = int(density * n * n / (radius[1] ** 2) * 40)
    for _ in range(count):
        cx, cy = rng.uniform(n, 2 * n, size=2)
        ax, ay = rng.uniform(*radius), rng.uniform(*radius) * rng.uniform(0.6, 1.0)
        for ox in (-n, 0, n):  # draw wrapped copies so the texture tiles seamlessly
            for oy in (-n, 0, n):
                cv2.ellipse(
                    canvas,
                    (int(cx + ox), int(cy + oy)),
                    (int(ax), int(ay)),
                    rng.uniform(0, 180),
                    0,
                    360,
                    rng.uniform(0.7, 1.0),
                    -1,
                )
    nuclei = np.clip(cv2.GaussianBlur(canvas[n : 2 * n, n : 2 * n], (0, 0), 1.0), 0, 1)
    tex = tex * (1 - nuclei[..., None]) + np.array(nuc, np.float32) * nuclei[..., None]
    tex += rng.normal(0, 6, tex.shape).astype(np.float32)
    return np.clip(tex, 0, 255)


class _Renderer:
    """Renders RGB tiles of one pyramid level from the physical masks and textures."""

    def __init__(
        self, tissue: np.ndarray, tumor: np.ndarray, pixel_um: float, seed: int, artefacts: dict | None = None
    ):
        self.artefacts = artefacts or {}
        self.pixel_um = pixel_um
        self.tissue = tissue.astype(np.float32)
        self.tumor = tumor.astype(np.float32)
        n = max(8, int(round(TEXTURE_SIZE * TEXTURE_MPP / pixel_um)))
        interp = cv2.INTER_AREA if n < TEXTURE_SIZE else cv2.INTER_LINEAR
        self.normal = cv2.resize(_texture("normal", seed), (n, n), interpolation=interp)
        self.tumor_tex = cv2.resize(_texture("tumor", seed + 1), (n, n), interpolation=interp)
        self.n = n

    def tile(self, x: int, y: int, tw: int, th: int) -> np.ndarray:
        if not self.artefacts:
            return self._tile(x, y, tw, th)
        m = int(np.ceil(3 * BLUR_UM / self.pixel_um)) + 1  # the defocus reaches across tiles
        big = self._tile(x - m, y - m, tw + 2 * m, th + 2 * m)
        big = paint_artefacts(big, self.artefacts, self.pixel_um, MASK_MPP, (x - m, y - m))
        return big[m : m + th, m : m + tw]

    def _tile(self, x: int, y: int, tw: int, th: int) -> np.ndarray:
        scale = self.pixel_um / MASK_MPP
        mx = (np.arange(tw, dtype=np.float32) + x + 0.5) * scale - 0.5
        my = (np.arange(th, dtype=np.float32) + y + 0.5) * scale - 0.5
        y0, y1 = max(int(my[0]) - 1, 0), min(int(my[-1]) + 2, self.tissue.shape[0])
        x0, x1 = max(int(mx[0]) - 1, 0), min(int(mx[-1]) + 2, self.tissue.shape[1])
        out = np.full((th, tw, 3), 244, np.uint8)
        if x1 <= x0 or y1 <= y0 or not self.tissue[y0:y1, x0:x1].any():
            return out
        map_x = np.broadcast_to(mx[None, :], (th, tw)).astype(np.float32)
        map_y = np.broadcast_to(my[:, None], (th, tw)).astype(np.float32)
        t = cv2.remap(self.tissue, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
        t = np.clip((t - 0.5) * 8 + 0.5, 0, 1)[..., None]
        u = cv2.remap(self.tumor, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
        u = np.clip((u - 0.5) * 8 + 0.5, 0, 1)[..., None]
        rows = (np.arange(th) + y) % self.n
        cols = (np.arange(tw) + x) % self.n
        normal = self.normal[np.ix_(rows, cols)]
        tissue_rgb = normal * (1 - u) + self.tumor_tex[np.ix_(rows, cols)] * u if u.any() else normal
        rgb = 244 * (1 - t) + tissue_rgb * t
        return np.clip(rgb, 0, 255).astype(np.uint8)


def write_synthetic_slide(
    path: str | Path,
    width_um: float = 3000,
    height_um: float = 2000,
    mpp: float = 0.5,
    tumor_regions: int = 0,
    n_pieces: int = 3,
    seed: int = 0,
    tile: int = 256,
    quality: int = 85,
    tumor_radius_um: tuple[float, float] = (250, 600),
    masks: tuple[np.ndarray, np.ndarray] | None = None,
    artefacts: bool | dict[str, np.ndarray] = False,
) -> SyntheticSlide:
    """Write a pyramidal JPEG TIFF of `width_um` x `height_um` at `mpp` um/px level 0.

    Give the same `seed` (or the same `masks`) at two `mpp` values for the same tissue scanned
    at two resolutions. `artefacts=True` paints pen strokes, a defocused band, a fold and a
    bubble over the tissue (`artefact_masks`; or pass such masks), kept as ground truth.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if masks is None:
        masks = make_masks(width_um, height_um, rng, n_pieces, tumor_regions, tumor_radius_um)
    tissue, tumor = masks
    if artefacts is True:
        artefacts = artefact_masks(tissue, np.random.default_rng(seed + 7919))
    artefacts = artefacts or {}
    width, height = int(round(width_um / mpp)), int(round(height_um / mpp))
    res = 10_000.0 / mpp  # pixels per centimetre
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31) as tif:
        ds = 1
        while True:
            lw, lh = max(1, width // ds), max(1, height // ds)
            renderer = _Renderer(tissue, tumor, mpp * ds, seed, artefacts)

            def tiles(lw=lw, lh=lh, renderer=renderer):
                for ty in range(0, lh, tile):
                    for tx in range(0, lw, tile):
                        yield renderer.tile(tx, ty, tile, tile)

            tif.write(
                tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res / ds, res / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if ds == 1 else 1,
                metadata=None,
                description=f"wsi-mil synthetic slide mpp={mpp}" if ds == 1 else None,
            )
            if max(lw, lh) <= 2048:
                break
            ds *= 4
    tmp.replace(path)
    return SyntheticSlide(
        path=path, mpp=mpp, size=(width, height), tissue_mask=tissue, tumor_mask=tumor, artefacts=artefacts
    )


def write_blank_slide(path: str | Path, width: int = 2048, height: int = 2048, mpp: float = 0.5) -> Path:
    """A slide with no tissue at all (white glass), for the empty-mask path."""
    empty = np.zeros((int(height * mpp / MASK_MPP), int(width * mpp / MASK_MPP)), bool)
    return write_synthetic_slide(path, width * mpp, height * mpp, mpp, masks=(empty, empty)).path


ARTEFACT_CLEARANCE_UM = 150.0  # make_cohort keeps painted artefacts this far from tumour
MICRO_RADIUS_UM = (90.0, 130.0)  # a micro-metastasis: about 1-3 patches of 128 um (the demo's grid)


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 24,
    tumor_ratio: float = 0.5,
    width_um: float = 3000,
    height_um: float = 2000,
    mpp: float = 0.5,
    seed: int = 0,
    micro: int = 0,
    artefacts: float = 0.0,
) -> list[SyntheticSlide]:
    """Tumor and normal synthetic slides plus `labels.csv` (slide_id,label,case_id).

    The first `micro` tumour slides hold one micro-metastasis (a lesion of radius
    MICRO_RADIUS_UM, about 1-3 patches at 1 um/px and 128 px) instead of 1-2 larger ones.
    A fraction `artefacts` of the slides get three artefacts (`artefact_masks`: pen, blur,
    fold or bubble) painted on tissue at least ARTEFACT_CLEARANCE_UM from any tumour; the
    slides are otherwise the same as without them (same seeds, same tissue and tumours)."""
    import pandas as pd

    out_dir = Path(out_dir)
    slides_dir = out_dir / "slides"
    rng = np.random.default_rng(seed)
    art_rng = np.random.default_rng(seed + 7919)  # its own stream: the cohort is the same without
    n_tumor = int(round(n_slides * tumor_ratio))
    labels = np.array([1] * n_tumor + [0] * (n_slides - n_tumor))
    rng.shuffle(labels)
    micro_slides = set(np.flatnonzero(labels)[:micro].tolist())
    painted = set(art_rng.permutation(n_slides)[: int(round(artefacts * n_slides))].tolist())
    cohort, rows = [], []

    def write(name: str, i: int, slide_seed: int, regions: int, pieces: int, radius) -> SyntheticSlide:
        tissue, tumor = make_masks(
            width_um, height_um, np.random.default_rng(slide_seed), pieces, regions, radius
        )
        art = {}
        if i in painted:
            r = max(1, int(ARTEFACT_CLEARANCE_UM / MASK_MPP))
            near = cv2.dilate(
                tumor.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)
            )
            kinds = tuple(str(k) for k in art_rng.choice(ARTEFACT_KINDS, 3, replace=False))
            art = artefact_masks(tissue & (near == 0), art_rng, kinds)
        return write_synthetic_slide(
            slides_dir / f"{name}.tif",
            width_um,
            height_um,
            mpp,
            seed=slide_seed,
            masks=(tissue, tumor),
            artefacts=art,
        )

    for i, label in enumerate(labels):
        name = f"{'tumor' if label else 'normal'}_{i:03d}"
        small = i in micro_slides
        regions = (1 if small else int(rng.integers(1, 3))) if label else 0
        s = write(
            name,
            i,
            seed * 1000 + i,
            regions,
            int(rng.integers(2, 4)),
            MICRO_RADIUS_UM if small else (200, 450),
        )
        if label and not s.is_tumor:  # a tumor blob can miss eroded tissue: retry bigger
            radius = MICRO_RADIUS_UM if small else (250, 600)
            s = write(name, i, seed * 1000 + i + 500, 1 if small else 2, 2, radius)
        cohort.append(s)
        rows.append(
            {"slide_id": name, "label": "tumor" if label else "normal", "case_id": f"case_{i // 2:03d}"}
        )
    pd.DataFrame(rows).to_csv(out_dir / "labels.csv", index=False)
    return cohort
