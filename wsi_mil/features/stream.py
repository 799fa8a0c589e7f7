"""One extraction stream over a whole cohort: no per-slide reader start-up, no padded batches.

Three kinds of worker share the work of one process:
- the planner walks the cohort: for each slide it takes what the caller's `jobs` iterator
  yields (segmenting and tiling the slide there when needed, so that runs ahead of the
  encoder; on a GPU machine several planner threads hand that to planning processes,
  features/stream_workers.py) and cuts the slide's remaining rows into pieces of at
  most one batch;
- readers decode and resize pieces, each with its own slide handle: threads on the CPU (one by
  default; decoders and OpenCV release the GIL) and inside Dask's daemonic workers; on a GPU
  machine threads that hand each piece to a reader process (threads stop scaling at ~4
  there), one per spare core (features/stream_workers.py);
- the caller's thread takes pieces back in order, fills encoder batches of exactly
  `batch_size` patches across slide boundaries (only the cohort's last batch may be short),
  and writes each slide's rows to its own feature file, finished the moment its last row is
  written. Resume (`FeatureWriter`'s `n_done`) works as in the per-slide path. On CUDA the
  caller's thread queues batch n+1 (pinned copy on a side stream, `EncoderRunner.submit`)
  before it writes batch n's features, so copies, compute and writing overlap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ExtractConfig
from ..formats.features import FeatureWriter
from ..wsi.readers import open_slide
from ..wsi.tiling import PatchGrid
from .reading import read_patches, read_piece, region_limit
from .runner import EncoderRunner
from .stream_workers import reader_count, reader_pool

_END = object()


@dataclass
class StreamJob:
    """One slide in the stream: its grid and writer, or why it needs no encoding."""

    name: str
    slide_path: Path | None = None
    mpp: float | None = None
    grid: PatchGrid | None = None
    writer: FeatureWriter | None = None
    error: BaseException | None = None  # planning or reading failed
    skipped: bool = False  # done meanwhile by another process
    failed_patches: int = 0
    context: dict = field(default_factory=dict)  # the caller's (lock, timing, ...)

    @property
    def is_marker(self) -> bool:
        return self.writer is None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class _Ordered:
    """Results keyed by sequence number, taken back in order; bounded by a semaphore."""

    def __init__(self, capacity: int):
        self.items: dict[int, object] = {}
        self.cond = threading.Condition()
        self.slots = threading.Semaphore(capacity)
        self.total: int | None = None  # known once the planner is done
        self.stop = threading.Event()
        self.waited = 0.0  # seconds the consumer spent waiting for readers

    def put(self, seq: int, item) -> None:
        with self.cond:
            self.items[seq] = item
            self.cond.notify_all()

    def take(self, seq: int):
        with self.cond:
            if seq not in self.items:
                t0 = time.perf_counter()
                while seq not in self.items:
                    if self.total is not None and seq >= self.total:
                        return _END
                    self.cond.wait(0.1)
                self.waited += time.perf_counter() - t0
            item = self.items.pop(seq)
        return item

    def acquire(self) -> bool:
        while not self.stop.is_set():
            if self.slots.acquire(timeout=0.1):
                return True
        return False


def _reader(
    work: list, work_cond: threading.Condition, out: _Ordered, out_size: int, interpolation: str, pool=None
):
    """Take pieces from `work`, read them (here, or in a reader process of `pool`), put them
    in `out`."""
    handle, handle_path = None, None
    try:
        while not out.stop.is_set():
            with work_cond:
                while not work and not out.stop.is_set():
                    work_cond.wait(0.1)
                if out.stop.is_set():
                    return
                piece = work.pop(0)
            if piece is _END:
                with work_cond:
                    work.insert(0, _END)  # leave it for the other readers
                    work_cond.notify_all()
                return
            seq, job, start, end = piece
            g = job.grid
            try:
                if pool is not None:
                    args = (job.slide_path, job.mpp, g.coords[start:end], g.patch_size_level0, g.patch_size)
                    images, failed = pool.submit(read_piece, *args, out_size, interpolation).result()
                    out.put(seq, (job, start, images, failed, None))
                    continue
                if handle_path != job.slide_path:
                    if handle is not None:
                        handle.close()
                    handle, handle_path = None, None
                    handle = open_slide(job.slide_path, job.mpp)
                    handle_path = job.slide_path
                max_px = region_limit(handle, g.patch_size_level0, g.patch_size)
                images, failed = read_patches(
                    handle,
                    g.coords[start:end],
                    g.patch_size_level0,
                    g.patch_size,
                    out_size,
                    max_px,
                    interpolation,
                )
                out.put(seq, (job, start, images, failed, None))
            except Exception as exc:  # the slide cannot be read at all: the job fails
                out.put(seq, (job, start, None, 0, exc))
    finally:
        if handle is not None:
            handle.close()


@dataclass
class StreamStats:
    """What one stream did: patches encoded, its seconds, the seconds the encoder waited for
    patches (reading or planning was the bottleneck when that is a large share), readers, and
    the seconds until the first batch was full (start-up: worker processes, the first slides'
    planning)."""

    patches: int = 0
    seconds: float = 0.0
    waited_s: float = 0.0
    readers: int = 0
    first_batch_s: float = 0.0

    def __str__(self) -> str:
        if not self.patches:
            return f"no patches encoded in {self.seconds:.1f} s"
        rate = self.patches / self.seconds if self.seconds else 0.0
        share = self.waited_s / self.seconds if self.seconds else 0.0
        return (
            f"{self.patches} patches in {self.seconds:.1f} s ({rate:.1f}/s); the encoder waited "
            f"{share:.0%} of the time for patches; {self.readers} reader(s); first batch after "
            f"{self.first_batch_s:.1f} s"
        )


def run_stream(
    jobs: Iterable[StreamJob],
    runner: EncoderRunner,
    cfg: ExtractConfig,
    on_done: Callable[[StreamJob], None],
    on_patches: Callable[[int], None] | None = None,
    estimate_patches: Callable[[], int] | None = None,
) -> StreamStats:
    """Encode every job's remaining rows; call `on_done(job)` as each finishes (or fails).

    `on_done` runs on the caller's thread; an exception it raises stops the stream, and every
    unfinished writer keeps its `.partial` file for the next run to resume. `estimate_patches`
    (the cohort's size as known when the first batch is full) decides `--compile auto`."""
    t_start = time.perf_counter()
    batch = cfg.batch_size
    workers = reader_count(cfg, runner.device.type)
    out = _Ordered(capacity=2 * workers + 4)
    work: list = []
    work_cond = threading.Condition()
    planner_error: list[BaseException] = []

    def plan() -> None:
        seq = 0
        try:
            for job in jobs:
                if not out.acquire():
                    return
                first = job.writer.n_done if job.writer is not None else 0
                n = job.writer.n if job.writer is not None else 0
                if job.is_marker or first >= n:
                    out.put(seq, (job, first, None, 0, None))
                    seq += 1
                    continue
                out.slots.release()
                for start in range(first, n, batch):
                    if not out.acquire():
                        return
                    with work_cond:
                        work.append((seq, job, start, min(start + batch, n)))
                        work_cond.notify()
                    seq += 1
        except BaseException as exc:  # a bug in the caller's iterator: stop, report on the main thread
            planner_error.append(exc)
        finally:
            with work_cond:
                work.append(_END)
                work_cond.notify_all()
            with out.cond:
                out.total = seq
                out.cond.notify_all()

    threads = [threading.Thread(target=plan, daemon=True, name="wsi-mil-planner")]

    pool = reader_pool(workers, runner.device.type)
    reader_args = (work, work_cond, out, runner.info.input_size, runner.info.interpolation, pool)
    for _ in range(workers):
        threads.append(threading.Thread(target=_reader, args=reader_args, daemon=True, name="wsi-mil-reader"))
    for t in threads:
        t.start()
    pending: deque = deque()  # (job, first row, images) waiting for a full batch
    n_pending = 0
    open_jobs: dict[int, StreamJob] = {}
    encoded = 0
    first_batch_s = 0.0

    def finish(job: StreamJob) -> None:
        open_jobs.pop(id(job), None)
        if job.writer is not None and job.error is None:
            job.writer.finish(failed_patches=job.failed_patches)
        on_done(job)

    inflight: deque = deque()  # (pending features, segments) submitted, not yet written
    lag = 1 if runner.device.type == "cuda" else 0  # batch n+1 is queued while n computes

    def write(pending, segments) -> None:
        nonlocal encoded
        feats = pending.result().astype(cfg.dtype)
        for job, start, a, b in segments:
            if job.error is not None:
                continue
            job.writer.write(start, feats[a:b])
            if job.writer.n_done == job.writer.n:
                finish(job)
        encoded += len(feats)
        if on_patches:
            on_patches(encoded)

    def encode(n: int) -> None:
        nonlocal n_pending, first_batch_s
        if encoded == 0 and not inflight:
            first_batch_s = time.perf_counter() - t_start
            runner.maybe_compile(estimate_patches() if estimate_patches else n)
        parts, segments, taken = [], [], 0
        while taken < n:
            job, start, images = pending.popleft()
            k = min(len(images), n - taken)
            if k < len(images):
                pending.appendleft((job, start + k, images[k:]))
            parts.append(images[:k])
            segments.append((job, start, taken, taken + k))
            taken += k
        n_pending -= taken
        batch_images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        inflight.append((runner.submit(batch_images, pad_to=batch if runner.compiled else None), segments))
        while len(inflight) > lag:
            write(*inflight.popleft())

    try:
        seq = 0
        while True:
            item = out.take(seq)
            if item is _END:
                break
            out.slots.release()
            seq += 1
            job, start, images, failed, error = item
            if job.is_marker or images is None and error is None:  # nothing to encode
                if job.writer is not None and job.error is None:
                    open_jobs[id(job)] = job
                finish(job)
                continue
            if job.error is not None:
                continue  # an earlier piece already failed this slide
            open_jobs[id(job)] = job
            if error is not None:
                job.error = error
                job.abort()
                finish(job)
                continue
            job.failed_patches += failed
            pending.append((job, start, images))
            n_pending += len(images)
            while n_pending >= batch:
                encode(batch)
        if planner_error:
            raise planner_error[0]
        if n_pending:
            encode(n_pending)  # the cohort's last batch: the only short one
        while inflight:
            write(*inflight.popleft())
        seconds = time.perf_counter() - t_start
        return StreamStats(encoded, seconds, out.waited, len(threads) - 1, first_batch_s)
    finally:
        out.stop.set()
        with work_cond:
            work_cond.notify_all()
        for job in open_jobs.values():
            job.abort()
        for t in threads:
            t.join(timeout=10)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
