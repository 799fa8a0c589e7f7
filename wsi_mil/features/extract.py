"""Streaming feature extraction: patch coordinates + a slide -> a feature file.

Speed comes from (1) reading whole rows of neighbouring patches as one region at the pyramid
level nearest the target mpp and slicing them, instead of one `read_region` per patch;
(2) DataLoader workers that each open their own slide handle, decode and resize while the
encoder runs (features/runner.py); (3) features streamed to a pre-sized, chunked HDF5
dataset so memory does not grow with the slide.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ExtractConfig
from ..formats.features import FeatureWriter
from ..formats.patches import grid_attrs
from ..io import provenance
from ..wsi.readers import open_slide
from ..wsi.tiling import PatchGrid
from .reading import read_patches, region_limit
from .runner import EncoderRunner

log = logging.getLogger("wsi_mil")


@dataclass
class _Batch:
    start: int
    end: int


class PatchBatches(IterableDataset):
    """Yields (start, uint8 [B, S, S, 3]) for contiguous batches; worker k takes batches k::W.

    Each worker opens its own slide handle; reading is `read_patches`.
    """

    def __init__(
        self,
        slide_path,
        mpp,
        coords,
        size0,
        patch_size,
        out_size,
        batch_size,
        first_row: int = 0,
        interpolation: str = "bilinear",
    ):
        self.slide_path, self.mpp, self.interpolation = slide_path, mpp, interpolation
        self.coords, self.size0, self.patch_size, self.out_size = coords, size0, patch_size, out_size
        starts = range(first_row, len(coords), batch_size)
        self.batches = [_Batch(s, min(s + batch_size, len(coords))) for s in starts]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, int]]:
        info = get_worker_info()
        return self.worker_batches(*((info.id, info.num_workers) if info else (0, 1)))

    def worker_batches(self, wid: int, nw: int) -> Iterator[tuple[int, np.ndarray, int]]:
        """The batches wid::nw, read with this worker's own slide handle."""
        slide = open_slide(self.slide_path, self.mpp)
        max_px = region_limit(slide, self.size0, self.patch_size)
        try:
            for b in self.batches[wid::nw]:
                images, failed = read_patches(
                    slide,
                    self.coords[b.start : b.end],
                    self.size0,
                    self.patch_size,
                    self.out_size,
                    max_px,
                    self.interpolation,
                )
                yield b.start, images, failed
        finally:
            slide.close()


def threaded_batches(dataset: PatchBatches, workers: int, depth: int = 4):
    """Batches in order from `workers` reader threads (decoders and resizing release the GIL)."""
    queues = [queue.Queue(maxsize=depth) for _ in range(workers)]
    done = object()
    stop = threading.Event()

    def read(wid: int) -> None:
        try:
            for item in dataset.worker_batches(wid, workers):
                while not stop.is_set():
                    try:
                        queues[wid].put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            queues[wid].put(exc)
            return
        queues[wid].put(done)

    threads = [threading.Thread(target=read, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        for i in range(len(dataset.batches)):
            item = queues[i % workers].get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def open_feature_writer(out_path, grid: PatchGrid, runner: EncoderRunner, cfg: ExtractConfig, slide_path):
    """The slide's feature file, opened for streaming (resuming its `.partial` when it matches)."""
    info = runner.info
    attrs = {
        **grid_attrs(grid),
        **provenance(slide_path=str(slide_path)),
        "encoder": info.name,
        "encoder_dim": info.dim,
        "encoder_weights": info.weights,
        "encoder_weights_sha256": info.weights_sha256,  # None (random weights): not written
        "encoder_input_size": info.input_size,
        "encoder_interpolation": info.interpolation,
        "precision": runner.precision_name,
    }
    return FeatureWriter(out_path, grid.coords, info.dim, cfg.dtype, attrs)


def extract_features(
    slide_path,
    grid: PatchGrid,
    runner: EncoderRunner,
    out_path,
    cfg: ExtractConfig | None = None,
    mpp: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode every patch of `grid` and write `out_path` atomically; resumes a partial file.

    Returns a summary: patches, failed_patches.
    """
    cfg = cfg or ExtractConfig()
    info = runner.info
    writer = open_feature_writer(out_path, grid, runner, cfg, slide_path)
    failed_total = 0
    try:
        runner.maybe_compile(len(grid) - writer.n_done)
        dataset = PatchBatches(
            slide_path,
            mpp,
            grid.coords,
            grid.patch_size_level0,
            grid.patch_size,
            info.input_size,
            cfg.batch_size,
            writer.n_done,
            info.interpolation,
        )
        workers = max(0, min(1 if cfg.workers is None else cfg.workers, len(dataset.batches)))
        if workers and mp.current_process().daemon:
            # a Dask worker (daemonic) cannot start reader processes: read in threads instead
            loader = threaded_batches(dataset, workers)
        else:
            loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=4 if workers else None,
                pin_memory=runner.device.type == "cuda",
                persistent_workers=False,
            )
        for start, images, failed in loader:
            images = images.numpy() if isinstance(images, torch.Tensor) else images
            feats = runner(images, pad_to=cfg.batch_size if runner.compiled else None)
            writer.write(int(start), feats.astype(cfg.dtype))
            failed_total += int(failed)
            if on_batch:
                on_batch(writer.n_done, writer.n)
        writer.finish(failed_patches=failed_total)
    except BaseException:
        writer.abort()
        raise
    return {"patches": len(grid), "failed_patches": failed_total}
