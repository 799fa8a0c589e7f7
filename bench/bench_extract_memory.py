"""Peak RSS of extraction vs number of patches (memory must not grow with slide size).

Usage: python bench/bench_extract_memory.py [--sizes 256 2048]
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def one(n: int) -> dict:
    import tempfile

    from bench_extract import grid_for
    from common import large_slide

    from wsi_mil.config import ExtractConfig
    from wsi_mil.features.encoders import create_encoder
    from wsi_mil.features.extract import extract_features
    from wsi_mil.features.runner import EncoderRunner

    g = grid_for(large_slide(), n)
    runner = EncoderRunner(create_encoder("resnet50_trunc", random_weights=True), "cpu", "auto")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extract_features(large_slide(), g, runner, Path(tempfile.mkdtemp()) / "f.h5", ExtractConfig(workers=1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "patches": len(g),
        "main_peak_mib": peak / 1024,
        "main_growth_mib": (peak - before) / 1024,
        "reader_peak_mib": child / 1024,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--one", type=int)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
    else:
        for n in args.sizes:
            r = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
            print(r.stdout.strip() or r.stderr[-500:], flush=True)
