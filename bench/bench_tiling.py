"""Segmentation + tiling time on a 40,000 x 30,000 px slide vs a point-in-polygon baseline.

Usage: python bench/bench_tiling.py [--runs 3]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from shapely.geometry import Point
from shapely.prepared import prep

sys.path.insert(0, str(Path(__file__).parent))
from common import large_slide, median_time  # noqa: E402

from wsi_mil.config import TilingConfig  # noqa: E402
from wsi_mil.wsi.readers import open_slide  # noqa: E402
from wsi_mil.wsi.tiling import grid_geometry, tile  # noqa: E402
from wsi_mil.wsi.tissue import segment_tissue  # noqa: E402


def baseline_tile(slide, mask, cfg, samples: int = 4):
    """CLAM-style: every grid position of the slide, point-in-polygon tests in a Python loop
    (samples x samples points per patch estimate its tissue fraction)."""
    size0, stride0 = grid_geometry(slide, cfg)
    w, h = slide.dimensions
    prepared = prep(mask.polygons)
    offs = (np.arange(samples) + 0.5) * size0 / samples
    kept = []
    for y in range(0, h - size0 + 1, stride0):
        for x in range(0, w - size0 + 1, stride0):
            inside = sum(prepared.contains(Point(x + dx, y + dy)) for dx in offs for dy in offs)
            if inside / samples**2 >= cfg.min_tissue:
                kept.append((x, y))
    return np.array(kept)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    path = large_slide()
    cfg = TilingConfig(target_mpp=0.5, patch_size=256)
    with open_slide(path) as slide:
        print(f"slide {slide.dimensions[0]} x {slide.dimensions[1]} px, {slide.level_count} levels")
        t_seg, mask = median_time(lambda: segment_tissue(slide), args.runs)
        t_tile, grid = median_time(lambda: tile(slide, mask, cfg), args.runs)
        t_base, base = median_time(lambda: baseline_tile(slide, mask, cfg), args.runs)
    same = len({tuple(c) for c in grid.coords.tolist()} ^ {tuple(c) for c in base.tolist()})
    print(f"segment_tissue           {t_seg:7.3f} s")
    print(f"tile (vectorised)        {t_tile:7.3f} s  {len(grid)} patches")
    print(f"segment + tile           {t_seg + t_tile:7.3f} s")
    print(f"baseline per-patch loop  {t_base:7.3f} s  {len(base)} patches  ({t_base / t_tile:.0f}x slower)")
    print(f"patches kept by one method only: {same} (the baseline samples 16 points per patch)")


if __name__ == "__main__":
    main()
