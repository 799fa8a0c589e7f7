"""Slides per minute for extraction of 8 synthetic slides with 1 vs 2 local Dask workers.

Usage: python bench/bench_cluster.py [--encoder resnet18] [--runs 1]
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE  # noqa: E402

from wsi_mil.synthetic import write_synthetic_slide  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    slides = CACHE / "cluster8"
    for i in range(8):
        if not (slides / f"s{i}.tif").exists():
            write_synthetic_slide(slides / f"s{i}.tif", 4000, 3000, 0.5, tumor_regions=i % 2, seed=40 + i)
    for spec in ("in-process", "local:1", "local:2"):
        times = []
        for _ in range(args.runs):
            out = CACHE / "cluster_out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "wsi_mil",
                "extract",
                str(slides),
                "--out",
                str(out),
                "--encoder",
                args.encoder,
                "--random-weights",
                "--workers",
                "0",
            ]
            if spec != "in-process":
                cmd += ["--cluster", spec]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{spec:11s} {t:7.1f} s  {8 / t * 60:6.2f} slides/min", flush=True)


if __name__ == "__main__":
    main()
