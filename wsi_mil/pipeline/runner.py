"""One loop over slides for every stage: skip what is done, lock, run, record, report.

`run_stage(stage, entries, map_fn=...)` asks the stage which slides are done, runs the rest
through `process_slide` (in this process, or on Dask workers through a map function from
cluster.py) and returns a `StageResult`. `process_slide` is the unit of work: it takes the
slide's lock (an `flock` on `.locks/<stage>-<slide>.lock`, released by the kernel if the
process dies, so a crash never leaves a stale lock), re-checks that the slide is still to do
(another process may have finished it), runs the stage and merges one row into the manifest.
Several processes or cluster workers can therefore share one work folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import StoppedAtFailure, WsiMilError
from ..formats.manifest import Manifest
from ..wsi.collect import SlideEntry
from .stages import Stage

log = logging.getLogger("wsi_mil")

# map_fn(fn, items) -> iterator of (item, result or Exception), in completion order
MapFn = Callable[[Callable, list], Iterator[tuple[object, object]]]


@dataclass
class Outcome:
    slide: str
    status: str  # ok, skipped, failed, busy (another process holds it)
    patches: int | None = None
    seconds: float | None = None
    error: str = ""
    attempts: int = 1
    failed_patches: int = 0
    extra: dict = field(default_factory=dict)  # manifest columns: quality control's qc_* fractions


def qc_extra(summary: dict) -> dict:
    """The `qc_*` entries of a stage's summary or a grid's attrs (manifest columns)."""
    return {k: v for k, v in summary.items() if k.startswith("qc_")}


@dataclass
class StageResult:
    stage: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def names(self, status: str) -> list[str]:
        return [n for n, o in self.outcomes.items() if o.status == status]

    @property
    def failed(self) -> list[str]:
        return self.names("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        done = len(self.names("ok")) + len(self.names("skipped"))
        text = f"{self.stage}: {done} slide(s) done, {len(self.failed)} failed"
        if self.failed:
            text += f" ({', '.join(self.failed[:8])}{', ...' if len(self.failed) > 8 else ''})"
        return text


@contextlib.contextmanager
def slide_lock(path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive lock on `path` for the block; yields False if another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _bump_attempts(lock_path) -> int:
    """Attempts at this slide so far, this one included (kept in the lock file until success)."""
    text = lock_path.read_text().strip() if lock_path.exists() else ""
    attempt = (int(text) if text.isdigit() else 0) + 1
    lock_path.write_text(str(attempt))
    return attempt


def _failure(entry: SlideEntry, exc: BaseException, attempt: int) -> Outcome:
    """A failed slide as one line: a WsiMilError's own message, else the file and the exception."""
    msg = str(exc) if isinstance(exc, WsiMilError) else f"{entry.path}: {type(exc).__name__}: {exc}"
    return Outcome(entry.name, "failed", error=msg.splitlines()[0] if msg else "", attempts=attempt)


def _conclude(stage: Stage, entry: SlideEntry, outcome: Outcome) -> Outcome:
    """Record the outcome in the manifest; a success also clears the slide's attempt count."""
    if outcome.status == "ok":
        stage.layout.lock(stage.name, entry.name).unlink(missing_ok=True)
    Manifest(stage.layout.manifest(stage.name)).record(
        entry.name, outcome.status, outcome.patches, outcome.seconds, outcome.error, outcome.attempts,
        outcome.extra,
    )  # fmt: skip
    return outcome


def process_slide(stage: Stage, entry: SlideEntry, blocking: bool = False, on_batch=None) -> Outcome:
    """Run one slide of `stage` under its lock and record the outcome in the manifest.

    Errors are caught and returned as a failed Outcome (one line, no traceback); with
    `blocking=False` a slide another process is working on comes back as `busy`.
    """
    lock_path = stage.layout.lock(stage.name, entry.name)
    with slide_lock(lock_path, blocking) as held:
        if not held:
            return Outcome(entry.name, "busy")
        if not stage.overwrite and stage.output(entry).exists():  # finished meanwhile elsewhere
            return Outcome(entry.name, "skipped")
        attempt = _bump_attempts(lock_path)
        t0 = time.perf_counter()
        try:
            summary = stage.run(entry, on_batch)
        except Exception as exc:  # any failure is reported for this slide; the others go on
            return _conclude(stage, entry, _failure(entry, exc, attempt))
        patches, failed = summary.get("patches"), int(summary.get("failed_patches") or 0)
        ok = Outcome(
            entry.name, "ok", patches, time.perf_counter() - t0, "", attempt, failed, qc_extra(summary)
        )
        return _conclude(stage, entry, ok)


def ordered_map(fn: Callable, items: list, threads: int, release: Callable | None = None) -> Iterator:
    """`fn(item)` for each item, computed up to `2 * threads` ahead on `threads` threads and
    yielded in order. Results computed but never taken (the consumer stopped) are passed to
    `release`."""
    if threads <= 1:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="wsi-mil-planner")
    ahead: deque = deque()
    todo = iter(items)
    try:
        for item in todo:
            ahead.append(pool.submit(fn, item))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        for future in ahead:
            if not future.cancel() and release is not None and future.exception() is None:
                release(future.result())
        pool.shutdown(wait=True)


def _release(job) -> None:
    if job is not None:
        job.abort()
        job.context["lock"].__exit__(None, None, None)


def _run_streamed(stage: Stage, todo: list[SlideEntry], finish, on_batch) -> list[SlideEntry]:
    """Extract `todo` as one stream (features/stream.py), each slide under its lock; returns
    the slides another process holds, for the caller to wait for."""
    from ..device import resolve_device
    from ..features.runner import runner_for
    from ..features.stream import StreamJob, run_stream
    from ..features.stream_workers import planner_count, planning_pool
    from .stages import prepare_grid

    if not todo:  # a finished cohort needs no encoder (and no weights)
        return []
    busy: list[SlideEntry] = []
    held: list[dict] = []
    planned = {"slides": 0, "patches": 0, "resumed": 0}  # resumed: rows a partial file already has

    def prepare(entry: SlideEntry):
        """Lock and plan one slide (segment, tile, open its writer); runs on a planning thread."""
        lock_path = stage.layout.lock(stage.name, entry.name)
        lock = slide_lock(lock_path, blocking=False)
        if not lock.__enter__():
            lock.__exit__(None, None, None)
            return entry, None
        ctx = {"entry": entry, "lock": lock, "attempt": 0, "t0": time.perf_counter()}
        if not stage.overwrite and stage.output(entry).exists():  # finished meanwhile elsewhere
            return entry, StreamJob(entry.name, skipped=True, context=ctx)
        ctx["attempt"] = _bump_attempts(lock_path)
        try:
            grid = None  # segment + tile in a planning process when there are several planners
            if plan_pool is not None:
                grid = plan_pool.submit(prepare_grid, stage, entry).result()
            job = stage.plan(entry, grid)
        except Exception as exc:
            job = StreamJob(entry.name, error=exc)
        job.context = ctx
        return entry, job

    planners = planner_count(resolve_device(stage.cfg.extract.device).type)
    plan_pool = planning_pool(planners) if not stage.overwrite and stage.patches_dir is None else None
    stage.tiling()  # resolved here, where torch is loaded anyway, not in each planning process

    def jobs():
        for entry, job in ordered_map(prepare, todo, planners, release=lambda r: _release(r[1])):
            if job is None:
                busy.append(entry)
                continue
            held.append(job.context)
            if not job.skipped:
                planned["slides"] += 1
                planned["patches"] += len(job.grid) if job.grid is not None else 0
            if job.writer is not None and job.writer.n_done:
                planned["resumed"] += job.writer.n_done
                log.info(
                    "%s: resuming, %d of %d patches already done", entry.name, job.writer.n_done, job.writer.n
                )
            yield job

    def on_done(job: StreamJob) -> None:
        ctx = job.context
        entry = ctx["entry"]
        try:
            if job.skipped:
                outcome = Outcome(entry.name, "skipped")
            elif job.error is not None:
                outcome = _conclude(stage, entry, _failure(entry, job.error, ctx["attempt"]))
            else:
                seconds = time.perf_counter() - ctx["t0"]
                ok = Outcome(
                    entry.name, "ok", len(job.grid), seconds, "", ctx["attempt"], job.failed_patches,
                    qc_extra(job.grid.attrs),
                )  # fmt: skip
                outcome = _conclude(stage, entry, ok)
        finally:
            ctx["lock"].__exit__(None, None, None)
            held.remove(ctx)
        finish(entry, outcome)

    def estimate() -> int:  # cohort patches, extrapolated from the slides planned so far
        return int(planned["patches"] * len(todo) / max(1, planned["slides"]))

    def progress(encoded: int) -> None:
        if on_batch:
            on_batch(planned["resumed"] + encoded, estimate())

    try:
        runner = runner_for(stage.cfg.extract)
        stats = run_stream(jobs(), runner, stage.cfg.extract, on_done, progress, estimate)
        log.info("%s stream: %s; %d planner(s)", stage.name, stats, planners)
    finally:
        if plan_pool is not None:
            plan_pool.shutdown(wait=False, cancel_futures=True)
        for ctx in list(held):  # interrupted: unfinished slides keep their partial files
            ctx["lock"].__exit__(None, None, None)
    return busy


def run_stage(
    stage: Stage,
    entries: Iterable[SlideEntry],
    *,
    map_fn: MapFn | None = None,
    fail_fast: bool = False,
    on_start: Callable[[SlideEntry, int, int], None] | None = None,
    on_done: Callable[[SlideEntry, Outcome], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Run `stage` over every slide not yet done; slides busy in another process are waited for.

    Without `map_fn` slides run here one after another (`on_start` and `on_batch` report
    progress); `on_done` is called for every slide, those already done first; `fail_fast`
    stops at the first failed slide by raising its error.
    """
    entries = list(entries)
    result = StageResult(stage.name)
    manifest = Manifest(stage.layout.manifest(stage.name))
    todo, done = [], []
    for e in entries:
        if stage.done(e):
            done.append(e)
            result.outcomes[e.name] = Outcome(e.name, "skipped")
            if e.name not in manifest.rows:
                manifest.record(e.name, "skipped")
        else:
            todo.append(e)
    if done:
        log.info("%s: %d of %d slide(s) already done", stage.name, len(done), len(entries))
    for e in done:
        if on_done:
            on_done(e, result.outcomes[e.name])

    def finish(entry: SlideEntry, outcome) -> None:
        if isinstance(outcome, Exception):  # a task lost on every attempt (e.g. a dead worker)
            outcome = Outcome(
                entry.name, "failed", error=f"{entry.path}: {type(outcome).__name__}: {outcome}"
            )
            manifest.record(entry.name, "failed", error=outcome.error)
        result.outcomes[entry.name] = outcome
        if outcome.status == "failed":
            log.error("%s", outcome.error)
        elif outcome.failed_patches:
            log.warning("%s: %d unreadable patches encoded as white", entry.path, outcome.failed_patches)
        if on_done:
            on_done(entry, outcome)
        if fail_fast and outcome.status == "failed":
            raise StoppedAtFailure(f"stopped at the first failure (--fail-fast): {outcome.error}")

    if map_fn is None:
        if getattr(stage, "streams", False):
            busy = _run_streamed(stage, todo, finish, on_batch)
        else:
            busy = []
            for i, entry in enumerate(todo):
                if on_start:
                    on_start(entry, i, len(todo))
                outcome = process_slide(stage, entry, blocking=False, on_batch=on_batch)
                if outcome.status == "busy":
                    busy.append(entry)
                else:
                    finish(entry, outcome)
        for entry in busy:  # another process is on it: wait for its lock, then finish it if needed
            log.info("%s: waiting for another process working on it", entry.name)
            finish(entry, process_slide(stage, entry, blocking=True, on_batch=on_batch))
    else:
        for entry, outcome in map_fn(lambda e: process_slide(stage, e, blocking=True), todo):
            finish(entry, outcome)
    return result
