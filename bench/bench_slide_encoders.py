"""Slide encoders' cost per slide: seconds (median of `--runs`) and peak memory for bags of
`--patches` patches, random weights, float32, on this machine's threads. FEATHER (an ABMIL, the
cheapest pretrained slide encoder here) runs in the same process as the baseline. Each encoder
runs in a fresh process, so the peak RSS is its own.

Usage: python bench/bench_slide_encoders.py [--encoders titan,prism,feather] [--patches 1000,4000] [--runs 3]
"""

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from wsi_mil.features.slide_encoders import create_slide_encoder
name, sizes, runs = sys.argv[1], [int(n) for n in sys.argv[2].split(",")], int(sys.argv[3])
enc = create_slide_encoder(name, random_weights=True)
out = {}
for n in sizes:
    side = int(np.ceil(np.sqrt(n)))
    coords = torch.stack([torch.arange(n) % side, torch.arange(n) // side], 1) * 1024
    x = torch.randn(n, enc.info.in_dim)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        enc(x, coords, 1024)
        times.append(time.perf_counter() - t)
    out[n] = float(np.median(times))
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="titan,prism,feather")
    ap.add_argument("--patches", default="1000,4000")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sizes = args.patches.split(",")
    print(f"| encoder | {' | '.join(f'{n} patches (s)' for n in sizes)} | peak MiB |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for name in args.encoders.split(","):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", CHILD, name, args.patches, str(args.runs)], capture_output=True, text=True
        )
        if res.returncode:
            print(f"| {name} | failed: {res.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        cells = " | ".join(f"{r[n]:.2f}" for n in sizes)
        print(f"| {name} | {cells} | {r['peak_mib']:.0f} |  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
