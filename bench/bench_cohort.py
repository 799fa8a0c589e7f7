"""Extraction over a cohort of small slides, and over one large slide: the cohort stream vs
the per-slide path vs a CLAM-style loop, against this CPU's bf16 compute roof (same run).

- roof: median bf16 matmul GFLOP/s (4096^3) / the encoder's GFLOP per patch (counted with
  torch's FlopCounterMode) = the patches/s no implementation can pass on this machine;
- CLAM-style: one `read_region` per patch, PIL resize, fp32, reading not overlapped;
- per-slide: `extract_features` slide after slide (a reader process per slide, the compiled
  graph's last batch padded), as wsi-mil did before the stream;
- stream: `wsi-mil extract`'s in-process path (`run_stage` with `ExtractStage`): segmentation,
  tiling and encoding of the whole cohort in one stream, fresh work folder each run;
- encoder alone: the runner on random uint8 batches (its own throughput ceiling), eager with
  and without the oneDNN conv+relu/add fusion (features/onednn.py), and compiled.

Usage: python bench/bench_cohort.py [--copies 24] [--runs 3] [--n-large 512]
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
if __name__ == "__main__":  # not in the spawned reader and planning processes, which re-import
    # this file as __mp_main__: there torch would cost seconds per process, which the CLI's
    # children (whose __main__ is the light wsi_mil.cli) do not pay
    import torch
    from bench_extract import REAL, clam_baseline, clam_loader_baseline, grid_for
    from common import large_slide

    from wsi_mil.config import ExtractConfig, PipelineConfig, TilingConfig
    from wsi_mil.features.encoders import create_encoder
    from wsi_mil.features.extract import extract_features, open_feature_writer
    from wsi_mil.features.runner import EncoderRunner, runner_for
    from wsi_mil.features.stream import StreamJob, run_stream
    from wsi_mil.formats.patches import read_patches
    from wsi_mil.pipeline.layout import Layout
    from wsi_mil.pipeline.runner import run_stage
    from wsi_mil.pipeline.stages import ExtractStage, TileStage
    from wsi_mil.wsi.collect import SlideEntry


def median(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bf16_matmul_gflops(runs=5, n=4096, device="cpu") -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        n, reps = 8192, 10
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn_like(a)
    else:
        reps = 1
    a @ b
    sync()

    def product():
        for _ in range(reps):
            a @ b
        sync()

    return reps * 2 * n**3 / median(product, runs) / 1e9


def encoder_alone(runner, batch, runs, batches=20) -> float:
    """patches/s of the runner on one uint8 batch, `batches` queued back to back."""

    def go():
        pending = [runner.submit(batch) for _ in range(batches)]
        for p in pending:
            p.result()

    go()
    return batches * len(batch) / median(go, runs)


def decode_rate(entries, grids, workers: int, processes: bool) -> float:
    """Patches/s of reading alone (the stream's reader), `workers` threads or processes."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    pieces = [(str(e.path), g.coords[s : s + 64], g.patch_size_level0, g.patch_size)
              for e, g in zip(entries, grids) for s in range(0, len(g), 64)]  # fmt: skip
    pool = (ProcessPoolExecutor if processes else ThreadPoolExecutor)(workers)
    list(pool.map(read_piece, pieces[:workers]))  # start-up outside the timing
    t = median(lambda: list(pool.map(read_piece, pieces, chunksize=1)), 3)
    pool.shutdown()
    return sum(len(p[1]) for p in pieces) / t


def read_piece(piece) -> int:
    """One piece through the stream's reader (`reading.read_piece`, a slide handle per reader)."""
    from wsi_mil.features.reading import read_piece as read

    path, coords, size0, patch_size = piece
    return len(read(path, None, coords, size0, patch_size, 224)[0])


def gflop_per_patch(encoder, size) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n-large", type=int, default=512)
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--large-only", action="store_true", help="only the large synthetic slide")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-scaling", default="", help="reader counts to time, e.g. 1,4,8,15")
    ap.add_argument("--clam-loader-runs", type=int, default=None, help="runs of CLAM's loader (GPU; slow)")
    ap.add_argument("--large-readers", default="default", help="e.g. default,8,15")
    args = ap.parse_args()
    dev = args.device
    tmp = Path(tempfile.mkdtemp())
    cfg = PipelineConfig(tiling=TilingConfig(target_mpp=0.5, patch_size=256))
    cfg.extract.encoder, cfg.extract.random_weights, cfg.extract.batch_size = args.encoder, True, 64
    cfg.extract.device = dev
    enc = create_encoder(args.encoder, random_weights=True)
    gflop = gflop_per_patch(enc, enc.info.input_size)
    gflops = bf16_matmul_gflops(device=dev)
    roof = gflops / gflop
    where = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {os.cpu_count()} CPUs, {args.encoder}: {gflop:.2f} GFLOP")
    print(f"bf16 matmul {gflops:.0f} GFLOP/s -> roof {roof:.1f} patches/s")

    runner = runner_for(cfg.extract)
    batch = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3), dtype=np.uint8)
    eager = encoder_alone(runner, batch, args.runs)
    print(f"encoder alone, {runner.precision_name} eager: {eager:.1f} patches/s ({eager / roof:.2f} of roof)")
    if runner.eager is not runner.encoder:  # the same encoder without the oneDNN fusion (onednn.py)
        plain = EncoderRunner(enc, dev, "auto", "off")
        plain.eager = plain.encoder
        unfused = encoder_alone(plain, batch, args.runs)
        print(f"encoder alone, eager without conv+relu/add fusion: {unfused:.1f} patches/s "
              f"({unfused / roof:.2f} of roof); fusion {eager / unfused:.2f}x")  # fmt: skip

    if not args.large_only:
        cohort(args, cfg, enc, batch, roof, eager, tmp)
    if not args.skip_large:
        large(args, enc, batch)


def cohort(args, cfg, enc, batch, roof, eager, tmp):
    """The 24-copy cohort: CLAM-style loop, per-slide path and stream, against the roof."""
    dev = args.device
    slides = tmp / "slides"
    slides.mkdir()
    for i in range(args.copies):
        os.symlink(REAL, slides / f"cmu{i:02d}.svs")
    entries = [SlideEntry(p) for p in sorted(slides.iterdir())]
    work = tmp / "tiles"
    t0 = time.perf_counter()
    run_stage(TileStage(Layout(work), cfg), entries)
    plan_s = time.perf_counter() - t0
    grids = [read_patches(Layout(work).patches(e.name)) for e in entries]
    n = sum(len(g) for g in grids)
    print(f"-- {args.copies} copies of CMU-1-Small-Region.svs: {n} patches ({len(grids[0])} per slide)")
    print(f"segmentation + tiling alone, one thread: {plan_s / args.copies * 1000:.0f} ms per slide")

    for w in [int(c) for c in args.decode_scaling.split(",") if c]:
        th, pr = decode_rate(entries, grids, w, False), decode_rate(entries, grids, w, True)
        print(f"reading alone, {w:2d} readers: threads {th:7.1f}, processes {pr:7.1f} patches/s", flush=True)

    k = max(1, args.copies // 6)
    n_clam = sum(len(g) for g in grids[:k])
    t = median(
        lambda: [clam_baseline(e.path, g, enc, device=dev) for e, g in zip(entries[:k], grids[:k])], args.runs
    )
    clam = n_clam / t
    print(f"CLAM-style loop ({k} slides, fp32)             {clam:6.1f} patches/s", flush=True)
    if dev == "cuda" and args.clam_loader_runs != 0:
        t = median(
            lambda: [clam_loader_baseline(e.path, g, enc, dev) for e, g in zip(entries, grids)],
            args.clam_loader_runs or args.runs,
        )
        print(
            f"CLAM extract_features_fp.py (8 loader workers, pinned, fp32) {n / t:6.1f} patches/s", flush=True
        )

    ecfg = ExtractConfig(**{**cfg.extract.model_dump(), "workers": 1})
    per_runner = EncoderRunner(enc, dev, "auto", "off")

    def per_slide():
        out = tmp / "per"
        for e, g in zip(entries, grids):
            (out / f"{e.name}.h5").unlink(missing_ok=True)
            extract_features(e.path, g, per_runner, out / f"{e.name}.h5", ecfg)

    if dev == "cuda":  # one reader process per slide starves a GPU; CLAM's loader stands for it
        per = float("nan")
    else:
        per = n / median(per_slide, args.runs)
        print(f"per-slide path (reader process per slide)     {per:6.1f} patches/s", flush=True)

    fresh = iter(range(10**6))
    said = StreamLog()
    readers = [None] + (["spawned", 1, 8] if dev == "cuda" else [])
    for w in readers:
        scfg = cfg.model_copy(deep=True)
        scfg.extract.workers = w if isinstance(w, int) else None
        start_as_before(w == "spawned")

        def stream():
            result = run_stage(ExtractStage(Layout(tmp / f"stream{next(fresh)}"), scfg), entries)
            assert result.ok, result.summary()

        st = n / median(stream, args.runs)
        label = {None: "default readers", "spawned": "spawned, cold"}.get(w, f"{w} readers")
        print(f"stream (segment + tile + encode, {label:15s}) {st:6.1f} patches/s", flush=True)
        print(f"  stream / CLAM {st / clam:.2f}x, / per-slide {st / per:.2f}x, / roof {st / roof:.3f}, "
              f"/ encoder alone {st / eager:.2f}", flush=True)  # fmt: skip
        print(f"  last run: {said.last}", flush=True)


def start_as_before(on: bool) -> None:
    """Reader and planning processes started as before the third GPU session: spawned (each
    imports numpy, OpenCV, the readers and wsi_mil itself), each at its first task. (The reader
    count is today's, all from the start: the old growth is gone.)"""
    import wsi_mil.features.stream as stream
    import wsi_mil.features.stream_workers as workers

    if not hasattr(stream, "_current"):
        stream._current = (workers.START_METHOD, workers.warm_up)
    if on:
        workers.START_METHOD = "spawn"
        workers.warm_up = lambda pool, n: pool
    else:
        workers.START_METHOD, workers.warm_up = stream._current


class StreamLog(logging.Handler):
    """Keeps the stream's closing log line (features/stream.py `StreamStats`)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last = ""
        log = logging.getLogger("wsi_mil")
        log.setLevel(logging.INFO)
        log.addHandler(self)

    def emit(self, record):
        if "stream:" in record.getMessage():
            self.last = record.getMessage()


def large(args, enc, batch):
    """One large synthetic slide end to end against the compiled encoder alone."""
    dev, tmp = args.device, Path(tempfile.mkdtemp())
    path = large_slide()
    g = grid_for(path, args.n_large)
    compiled = EncoderRunner(enc, dev, "auto", "on")
    compiled.maybe_compile(10**6)
    compiled(batch)
    enc_c = encoder_alone(compiled, batch, args.runs)
    print(f"-- synthetic 40k x 30k, {len(g)} patches; compiled {compiled.precision_name} alone {enc_c:.1f}/s")
    for readers in args.large_readers.split(","):
        workers = (None if dev == "cuda" else 1) if readers == "default" else int(readers)
        lcfg = ExtractConfig(batch_size=64, workers=workers)
        said = []

        def large():  # the stream's path with one slide
            out = tmp / "large.h5"
            out.unlink(missing_ok=True)
            job = StreamJob("large", path, None, g, open_feature_writer(out, g, compiled, lcfg, path))
            said.append(run_stream(iter([job]), compiled, lcfg, lambda j: None))

        e2e = len(g) / median(large, args.runs)
        print(f"{readers} readers: end to end {e2e:.1f} patches/s ({e2e / enc_c:.2f} of the encoder); "
              f"last run: {said[-1]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
