"""The cohort stream's CPU side alone: what readers and planners can feed a GPU.

The encoder is replaced by one that returns zeros at once, so the stream runs at the rate
its planning (segmentation + tiling) and reading deliver patches; on a GPU machine that is
the ceiling of `wsi-mil extract` for this cohort. Counts of planners and readers are set
explicitly, through the GPU machine's pools (`reader_pool`, `planning_pool`): 0 or 1
planners is the planner thread alone, 1 reader a reader thread.

A config with "cold" starts each process at its first task instead of warming the pools up at
once (`stream_workers.warm_up` off), with "spawn" spawns processes instead of forking them
from a fork server (`stream_workers.START_METHOD`); "8x15spawncold" is the stream as it was.

Usage: python bench/bench_stream_feed.py --copies 96 --configs 8x15,8x15spawncold,8x1 [--runs 1]
"""

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


class _Done:
    def __init__(self, n, dim):
        self.n, self.dim = n, dim

    def result(self):
        import numpy as np

        return np.zeros((self.n, self.dim), np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=96)
    ap.add_argument("--configs", default="8x15,0x15", help="planners x readers, comma separated")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="yappi CPU profile of this process's threads")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_extract import REAL

    import wsi_mil.features.stream as stream
    import wsi_mil.features.stream_workers as workers
    from wsi_mil.config import PipelineConfig, TilingConfig
    from wsi_mil.features.runner import runner_for
    from wsi_mil.pipeline.layout import Layout
    from wsi_mil.pipeline.runner import run_stage
    from wsi_mil.pipeline.stages import ExtractStage
    from wsi_mil.wsi.collect import SlideEntry

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "slides").mkdir()
    for i in range(args.copies):
        os.symlink(REAL, tmp / "slides" / f"cmu{i:03d}.svs")
    entries = [SlideEntry(p) for p in sorted((tmp / "slides").iterdir())]
    cfg = PipelineConfig(tiling=TilingConfig(target_mpp=0.5, patch_size=256))
    cfg.extract.encoder, cfg.extract.random_weights, cfg.extract.batch_size = "resnet18", True, 64
    runner = runner_for(cfg.extract)
    runner.submit = lambda images, pad_to=None: _Done(len(images), runner.info.dim)
    runner.maybe_compile = lambda n: None
    print(f"{os.cpu_count()} CPUs, {args.copies} copies of {REAL.name}")
    gpu_reader_pool, warm_up, start_method = stream.reader_pool, workers.warm_up, workers.START_METHOD
    for conf in args.configs.split(","):
        planners, readers, flags = re.fullmatch(r"(\d+)x(\d+)([a-z]*)", conf).groups()
        planners, readers, cold, spawn = int(planners), int(readers), "cold" in flags, "spawn" in flags
        workers.warm_up = (lambda pool, n: pool) if cold else warm_up
        workers.START_METHOD = "spawn" if spawn else start_method
        workers.planner_count = lambda device_type, k=planners: max(1, k)
        stream.reader_count = lambda cfg, device_type, r=readers: r
        stream.reader_pool = lambda most, device_type: gpu_reader_pool(most, "cuda")
        times = []
        if args.profile:
            import yappi

            yappi.set_clock_type("cpu")
            yappi.start()
        for run in range(args.runs):
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = run_stage(ExtractStage(Layout(tmp / f"w{conf}{run}"), cfg), entries)
            times.append(time.perf_counter() - t0)
            cpu = time.process_time() - cpu0  # this process's threads, not its children
            assert result.ok, result.summary()
        t = statistics.median(times)
        n = sum(o.patches or 0 for o in result.outcomes.values())
        print(
            f"{planners} planning processes, {readers} readers{' cold' * cold}{' spawned' * spawn}: "
            f"{n / t:7.1f} patches/s "
            f"({t / args.copies * 1000:.0f} ms per slide; this process's CPU "
            f"{cpu / args.copies * 1000:.0f} ms per slide)",
            flush=True,
        )
        if args.profile:  # all of this process's threads; children are not profiled
            import pstats

            yappi.stop()
            out = tmp / f"profile{conf}.pstat"
            yappi.get_func_stats().save(str(out), type="pstat")
            ps = pstats.Stats(str(out))
            ps.sort_stats("tottime").print_stats(25)
            ps.sort_stats("cumulative").print_stats("wsi_mil", 25)
            yappi.clear_stats()  # fmt: skip


if __name__ == "__main__":
    main()
