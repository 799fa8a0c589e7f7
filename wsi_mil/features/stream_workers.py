"""How many workers the cohort stream (features/stream.py) runs, and of which kind.

On the CPU one reader thread and one planner thread: the encoder needs the cores. On a GPU
machine the readers and planners are processes (threads stop scaling at ~4 there: the GIL,
and tiffslide reads of one process serialise on zarr's event loop), one reader per spare
core, all forked from a fork server that has imported what they need and started together
(docs/benchmarks.md, "Cohort stream on a GPU"; docs/changelog.md, 2026-11-23). Inside Dask's
daemonic workers, which cannot start children, everything stays in threads.
"""

from __future__ import annotations

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
    pool = ProcessPoolExecutor(most, mp_context=process_context(), initializer=start_reader_process)
    return warm_up(pool, most)


START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
PRELOAD = ["wsi_mil.pipeline.stages", "wsi_mil.features.reading", "cv2", "openslide", "tiffslide"]


def process_context():
    """Where reader and planning processes come from. Never a plain fork of this process (its
    torch and CUDA threads). Spawn starts a fresh interpreter that imports numpy, OpenCV, the
    slide readers and wsi_mil again: ~0.8 s of CPU per process. A fork server does those
    imports once (`PRELOAD`, no torch) and forks each process from itself, ready at once."""
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def one_thread_each() -> None:
    """In a reader or planning process: OpenCV on one thread. Its default pool (a thread per
    core in every process) would put readers x planners x cores threads on the cores. The slide
    readers' libraries are imported here too, at the process's start, not at its first slide."""
    import cv2
    import openslide  # noqa: F401
    import tiffslide  # noqa: F401

    cv2.setNumThreads(1)


def start_reader_process() -> None:
    """A reader process: OpenCV on one thread, patches resized with PIL (no torch to load)."""
    from .reading import resize_with_pil

    one_thread_each()
    resize_with_pil()


def _ready() -> None:
    """A task that does nothing: submitted to start a process (`warm_up`)."""


def warm_up(pool: ProcessPoolExecutor, processes: int) -> ProcessPoolExecutor:
    """`pool` with its `processes` processes starting now, together, instead of one at a first task
    each: otherwise the cohort's first batch waits for a planning process and then a reader
    process to start, one after the other (spawned, each took ~1 s on 2 cores; on the H100 the
    first batch came 3.4-5.5 s into the stream, 0.5 s with the fork server and this;
    docs/changelog.md, 2026-11-23)."""
    for _ in range(processes):
        pool.submit(_ready)
    return pool


def reader_count(cfg: ExtractConfig, device_type: str) -> int:
    """Readers: `--workers N` fixes N; by default one on the CPU (the encoder needs the other
    cores) and, on a GPU machine, one per spare core from the start. Forked from the fork
    server, a reader process is ready at once; readers added only as the GPU waited for patches
    (an earlier design) fed a large slide at half the rate of all of them from the start on the
    H100 (docs/changelog.md, 2026-11-23)."""
    if cfg.workers is not None:
        return max(1, cfg.workers)
    if device_type != "cuda":
        return 1
    return max(1, (os.cpu_count() or 2) - 1)


def planner_count(device_type: str) -> int:
    """Planners that segment and tile upcoming slides: one thread on the CPU (its cores
    encode); on a GPU machine half the cores, at most 8. A 49-patch biopsy costs about as much
    CPU to plan (~200 ms, most of it decoding its thumbnail) as to read; on the H100 8 planners
    with 15 readers fed 1,411 patches/s (docs/benchmarks.md)."""
    if device_type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def planning_pool(planners: int):
    """Processes that segment and tile upcoming slides when there are several planners (a GPU
    machine): in threads, thumbnail reads through tiffslide serialise on zarr's event loop."""
    if planners < 2 or mp.current_process().daemon:
        return None
    pool = ProcessPoolExecutor(planners, mp_context=process_context(), initializer=one_thread_each)
    return warm_up(pool, planners)
