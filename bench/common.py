"""Helpers shared by the benchmark scripts (never run by CI)."""

import statistics
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"


def median_time(fn, runs: int = 3):
    """Median wall seconds of `runs` calls and the last result."""
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def large_slide(width_um=10_000, height_um=7_500, mpp=0.25, name="large"):
    """A 40,000 x 30,000 px pyramidal synthetic slide, built once and cached."""
    from wsi_mil.synthetic import write_synthetic_slide

    path = CACHE / f"{name}_{int(width_um)}x{int(height_um)}_{mpp}.tif"
    if not path.exists():
        write_synthetic_slide(path, width_um, height_um, mpp, tumor_regions=3, n_pieces=4, seed=3)
    return path
