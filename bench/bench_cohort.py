"""Extraction over a cohort of small slides, and over one large slide: the cohort stream vs
the per-slide path vs a CLAM-style loop, against this CPU's bf16 compute roof (same run).

- roof: median bf16 matmul GFLOP/s (4096^3) / the encoder's GFLOP per patch (counted with
  torch's FlopCounterMode) = the patches/s no implementation can pass on this machine;
- CLAM-style: one `read_region` per patch, PIL resize, fp32, reading not overlapped;
- per-slide: `extract_features` slide after slide (a reader process per slide, the compiled
  graph's last batch padded), as wsi-mil did before the stream;
- stream: `wsi-mil extract`'s in-process path (`run_stage` with `ExtractStage`): segmentation,
  tiling and encoding of the whole cohort in one stream, fresh work folder each run;
- encoder alone: the runner on random uint8 batches (its own throughput ceiling).

Usage: python bench/bench_cohort.py [--copies 24] [--runs 3] [--n-large 512]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import REAL, clam_baseline, grid_for  # noqa: E402
from common import large_slide  # noqa: E402

from wsi_mil.config import ExtractConfig, PipelineConfig, TilingConfig  # noqa: E402
from wsi_mil.features.encoders import create_encoder  # noqa: E402
from wsi_mil.features.extract import extract_features  # noqa: E402
from wsi_mil.features.runner import EncoderRunner, runner_for  # noqa: E402
from wsi_mil.formats.patches import read_patches  # noqa: E402
from wsi_mil.pipeline.layout import Layout  # noqa: E402
from wsi_mil.pipeline.runner import run_stage  # noqa: E402
from wsi_mil.pipeline.stages import ExtractStage, TileStage  # noqa: E402
from wsi_mil.wsi.collect import SlideEntry  # noqa: E402


def median(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bf16_matmul_gflops(runs=5, n=4096) -> float:
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    return 2 * n**3 / median(lambda: a @ b, runs) / 1e9


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
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cfg = PipelineConfig(tiling=TilingConfig(target_mpp=0.5, patch_size=256))
    cfg.extract.encoder, cfg.extract.random_weights, cfg.extract.batch_size = args.encoder, True, 64
    enc = create_encoder(args.encoder, random_weights=True)
    gflop = gflop_per_patch(enc, enc.info.input_size)
    gflops = bf16_matmul_gflops()
    roof = gflops / gflop
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.encoder}: {gflop:.2f} GFLOP")
    print(f"bf16 matmul {gflops:.0f} GFLOP/s -> roof {roof:.1f} patches/s")

    runner = runner_for(cfg.extract)
    batch = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3), dtype=np.uint8)
    runner(batch)
    eager = 64 / median(lambda: runner(batch), args.runs)
    print(f"encoder alone, {runner.precision_name} eager: {eager:.1f} patches/s ({eager / roof:.2f} of roof)")

    # -- cohort of small real slides ----------------------------------------------------------
    slides = tmp / "slides"
    slides.mkdir()
    for i in range(args.copies):
        os.symlink(REAL, slides / f"cmu{i:02d}.svs")
    entries = [SlideEntry(p) for p in sorted(slides.iterdir())]
    work = tmp / "tiles"
    run_stage(TileStage(Layout(work), cfg), entries)
    grids = [read_patches(Layout(work).patches(e.name)) for e in entries]
    n = sum(len(g) for g in grids)
    print(f"-- {args.copies} copies of CMU-1-Small-Region.svs: {n} patches ({len(grids[0])} per slide)")

    k = max(1, args.copies // 6)
    n_clam = sum(len(g) for g in grids[:k])
    t = median(lambda: [clam_baseline(e.path, g, enc) for e, g in zip(entries[:k], grids[:k])], args.runs)
    clam = n_clam / t
    print(f"CLAM-style loop ({k} slides, fp32)             {clam:6.1f} patches/s")

    ecfg = ExtractConfig(**{**cfg.extract.model_dump(), "workers": 1})
    per_runner = EncoderRunner(enc, "cpu", "auto", "off")

    def per_slide():
        out = tmp / "per"
        for e, g in zip(entries, grids):
            (out / f"{e.name}.h5").unlink(missing_ok=True)
            extract_features(e.path, g, per_runner, out / f"{e.name}.h5", ecfg)

    per = n / median(per_slide, args.runs)
    print(f"per-slide path (reader process per slide)     {per:6.1f} patches/s")

    fresh = iter(range(10**6))

    def stream():
        result = run_stage(ExtractStage(Layout(tmp / f"stream{next(fresh)}"), cfg), entries)
        assert result.ok, result.summary()

    st = n / median(stream, args.runs)
    print(f"stream (segment + tile + encode, 1 reader)    {st:6.1f} patches/s")
    print(
        f"stream / CLAM {st / clam:.2f}x, stream / per-slide {st / per:.2f}x, stream / roof {st / roof:.2f}"
    )

    # -- one large slide ----------------------------------------------------------------------
    if args.skip_large:
        return
    path = large_slide()
    g = grid_for(path, args.n_large)
    compiled = EncoderRunner(enc, "cpu", "auto", "on")
    compiled.maybe_compile(10**6)
    compiled(batch)
    enc_c = 64 / median(lambda: compiled(batch), args.runs)
    lcfg = ExtractConfig(batch_size=64, workers=1)

    def large():
        out = tmp / "large.h5"
        out.unlink(missing_ok=True)
        extract_features(path, g, compiled, out, lcfg)

    e2e = len(g) / median(large, args.runs)
    print(f"-- synthetic 40k x 30k, {len(g)} patches, compiled {compiled.precision_name}")
    print(f"encoder alone {enc_c:.1f}, end to end {e2e:.1f} patches/s ({e2e / enc_c:.2f} of the encoder)")


if __name__ == "__main__":
    main()
