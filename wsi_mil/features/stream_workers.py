"""How many workers the cohort stream (features/stream.py) runs, and of which kind.

On the CPU one reader thread and one planner thread: the encoder needs the cores. On a GPU
machine the readers and planners are spawned processes (threads stop scaling at ~4 there:
the GIL, and tiffslide reads of one process serialise on zarr's event loop), readers grown
while the encoder waits for patches (docs/benchmarks.md, "Cohort stream on a GPU"). Inside
Dask's daemonic workers, which cannot start children, everything stays in threads.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

from ..config import ExtractConfig


def reader_pool(most: int, device_type: str):
    """Reader processes on a GPU machine: there, threads stop scaling at ~4 readers (the GIL;
    tiffslide's zarr event loop), processes scale with the cores (docs/benchmarks.md). None on
    the CPU (one reader; the encoder needs the cores) and inside daemonic processes (Dask
    workers), which cannot start children."""
    if device_type != "cuda" or most < 2 or mp.current_process().daemon:
        return None
    return ProcessPoolExecutor(most, mp_context=mp.get_context("spawn"), initializer=start_reader_process)


def one_thread_each() -> None:
    """In a reader or planning process: OpenCV on one thread. Its default pool (a thread per
    core in every process) would put readers x planners x cores threads on the cores."""
    import cv2

    cv2.setNumThreads(1)


def start_reader_process() -> None:
    """A reader process: OpenCV on one thread, patches resized with PIL (no torch to load)."""
    from .reading import resize_with_pil

    one_thread_each()
    resize_with_pil()


def reader_limits(cfg: ExtractConfig, device_type: str) -> tuple[int, int]:
    """(readers to start with, most readers): `--workers N` fixes N; by default one reader on
    the CPU (the encoder needs the other cores) and, on a GPU, two to start with and more as
    the encoder waits for patches (`readers_wanted`), up to one per spare core."""
    if cfg.workers is not None:
        return max(1, cfg.workers), max(1, cfg.workers)
    if device_type != "cuda":
        return 1, 1
    most = max(1, (os.cpu_count() or 2) - 1)
    return min(2, most), most


STARVED = 0.05  # the encoder's share of a window spent waiting for patches that adds readers
WINDOW_S = 0.5  # how often the reader count is reconsidered


def readers_wanted(readers: int, waited: float, most: int) -> int:
    """Readers for the next window, from the last window's share of time the encoder waited
    for patches: at share w the readers supplied about (1 - w) of what the encoder could
    take, so their count grows by 1 / (1 - w) at once rather than one per window, which was
    too slow a ramp for a GPU (docs/benchmarks.md). Below STARVED: no change."""
    if waited <= STARVED:
        return readers
    return min(most, max(readers + 1, math.ceil(readers / max(1.0 - waited, 0.05))))


def planner_count(device_type: str) -> int:
    """Planners that segment and tile upcoming slides: one thread on the CPU (its cores
    encode); on a GPU machine half the cores, at most 8. A 49-patch biopsy costs about as much
    CPU to plan (~200 ms, most of it decoding its thumbnail) as to read; on the H100 8 planners
    with 15 readers fed 548 patches/s (docs/benchmarks.md)."""
    if device_type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def planning_pool(planners: int):
    """Processes that segment and tile upcoming slides when there are several planners (a GPU
    machine): in threads, thumbnail reads through tiffslide serialise on zarr's event loop."""
    if planners < 2 or mp.current_process().daemon:
        return None
    return ProcessPoolExecutor(planners, mp_context=mp.get_context("spawn"), initializer=one_thread_each)
