"""CPU cost of reading patches: tiffslide's region reads vs tiles decoded straight from the file
(wsi/tiff_tiles.py), and PIL's resize vs torch's (features/reading.py), on one core.

Usage: python bench/bench_read.py [--runs 5] [--n 512]
Prints CPU milliseconds per patch (median of --runs), for the large synthetic slide (512 px
level-0 patches resized to 224) and the real CMU-1-Small-Region.svs (256 -> 224).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import large_slide  # noqa: E402

from wsi_mil.features import reading  # noqa: E402
from wsi_mil.wsi.readers import open_slide  # noqa: E402

REAL = Path(
    os.environ.get(
        "WSI_MIL_REAL_SLIDE", Path(__file__).resolve().parents[2] / "shared/data/CMU-1-Small-Region.svs"
    )
)


def cpu_ms_per_patch(fn, n: int, runs: int) -> float:
    fn()  # warm: file cache, decoder tables
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from bench_extract import grid_for

    for name, path in (
        ("synthetic 40k x 30k, 512 -> 224", large_slide()),
        ("CMU-1-Small-Region.svs, 256 -> 224", REAL),
    ):
        if not Path(path).exists():
            continue
        g = grid_for(path, args.n)
        s0 = g.patch_size_level0
        slide = open_slide(path)
        limit = reading.region_limit(slide, s0, g.patch_size)
        direct = slide._tiles
        print(f"-- {name}: {len(g)} patches, CPU ms per patch (median of {args.runs})")
        for label, tiles, resize in (
            ("tiffslide region reads + PIL resize (before)", None, reading.resize_patch_pil),
            ("direct tiles + PIL resize", direct, reading.resize_patch_pil),
            ("direct tiles + torch resize (now)", direct, reading.resize_patch_torch),
        ):
            slide._tiles = tiles
            reading._RESIZE[0] = resize
            ms = cpu_ms_per_patch(
                lambda: reading.read_patches(slide, g.coords, s0, g.patch_size, 224, limit), len(g), args.runs
            )
            print(f"{label:48s} {ms:6.2f}")
        for label, tiles in (
            ("region reads only, tiffslide", None),
            ("region reads only, direct tiles", direct),
        ):
            slide._tiles = tiles
            runs = reading.row_runs(g.coords, s0, limit)

            def regions():
                for a, b in runs:
                    xs = g.coords[a:b, 0]
                    slide.read_region((int(xs[0]), int(g.coords[a, 1])), 0, (int(xs[-1] - xs[0]) + s0, s0))

            print(f"{label:48s} {cpu_ms_per_patch(regions, len(g), args.runs):6.2f}")
        slide._tiles = direct
        slide.close()


if __name__ == "__main__":
    main()
