"""Forward+backward seconds and peak memory per bag, every model, N = 1k, 10k, 50k (D = 1024).

Each (model, N) runs in its own process so its peak RSS is its own.
Usage: python bench/bench_models.py [--sizes 1000 10000 50000] [--runs 3]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(name: str, n: int, runs: int) -> dict:
    import torch

    from wsi_mil.models import create_model

    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = create_model(name, 1024, 2).train()
    x = torch.randn(n, 1024)
    coords = (
        torch.stack(torch.meshgrid(torch.arange(250), torch.arange(250), indexing="ij"), -1).reshape(-1, 2)[
            :n
        ]
        * 256
    )
    y = torch.tensor(1)
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        out = model(x, coords)
        model.loss(out, y).backward()
        model.zero_grad()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": name,
        "n": n,
        "seconds": statistics.median(times[1:]),
        "peak_gib": peak / 2**20,
        "delta_gib": (peak - base) / 2**20,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", nargs=2)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.runs)))
        return
    from wsi_mil.models import list_models

    print(f"{'model':10s} {'N':>7s} {'fwd+bwd s':>10s} {'peak RSS GiB':>13s}")
    for name in list_models():
        for n in args.sizes:
            r = subprocess.run(
                [sys.executable, __file__, "--one", name, str(n), "--runs", str(args.runs)],
                capture_output=True,
                text=True,
            )
            if r.returncode:
                print(f"{name:10s} {n:7d} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            d = json.loads(r.stdout)
            print(f"{name:10s} {n:7d} {d['seconds']:10.3f} {d['peak_gib']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
