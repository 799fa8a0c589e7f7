"""Per encoder, full size, random weights: patches/s (bf16 vs fp32, same run) and peak
memory, end to end on the shared real slide (tissue, tiling, reading, encoding).

Each encoder and precision runs in a fresh process (`resource` peak RSS is per process);
`--patches` caps the patches encoded so the large ViTs finish in minutes. With `--device cuda`
the encoder alone is also timed on 64-patch batches queued back to back (`--batches` of them),
with the peak GPU memory.
Usage: python bench/bench_encoders.py [--patches 32] [--encoders uni_v1,virchow2,...] [--device cuda]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REAL = Path(
    os.environ.get("WSI_MIL_REAL_SLIDE")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
)

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import torch
from wsi_mil.config import ExtractConfig
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.extract import extract_features
from wsi_mil.features.runner import EncoderRunner
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import segment_tissue
from wsi_mil.config import TilingConfig
name, precision, n, slide, device, batches = sys.argv[1:7]
n, batches = int(n), int(batches)
enc = create_encoder(name, random_weights=True)
runner = EncoderRunner(enc, device, precision, "off")
with open_slide(slide) as s:
    cfg = TilingConfig(target_mpp=enc.info.mpp, patch_size=enc.info.patch_px, min_tissue=0.25)
    grid = tile(s, segment_tissue(s), cfg)
grid.coords = grid.coords[:n]
out = Path(tempfile.mkdtemp()) / "f.h5"
runner(torch.zeros(2, enc.info.input_size, enc.info.input_size, 3, dtype=torch.uint8).numpy())  # warm-up
t0 = time.perf_counter()
extract_features(slide, grid, runner, out, ExtractConfig(batch_size=16, workers=1))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
alone = gpu_mib = None
if device == "cuda":
    size = enc.info.input_size
    batch = torch.randint(0, 255, (64, size, size, 3), dtype=torch.uint8).numpy()
    [p.result() for p in [runner.submit(batch) for _ in range(3)]]
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        [p.result() for p in [runner.submit(batch) for _ in range(batches)]]
        rates.append(64 * batches / (time.perf_counter() - t0))
    alone, gpu_mib = sorted(rates)[1], torch.cuda.max_memory_allocated() / 2**20
res = {"patches_per_s": len(grid) / dt, "peak_mib": peak, "n": len(grid)}
print(json.dumps({**res, "alone": alone, "gpu_mib": gpu_mib}))
"""


def main():
    from wsi_mil.features.encoders import encoder_table

    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=32)
    ap.add_argument("--encoders", default=",".join(r["name"] for r in encoder_table() if not r["extra"]))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=10)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    extra = " fp32 alone | bf16 alone | GPU MiB (bf16) |" if gpu else ""
    print(f"| encoder | dim | fp32 patches/s | bf16 patches/s | bf16/fp32 | peak MiB (bf16) |{extra}")
    print("|---|---|---|---|---|---|" + ("---|---|---|" if gpu else ""))
    for name in args.encoders.split(","):
        res = {}
        for precision in ("fp32", "bf16"):
            r = subprocess.run(
                [sys.executable, "-c", CHILD, name, precision, str(args.patches), str(REAL), args.device,
                 str(args.batches)],
                capture_output=True, text=True,
            )  # fmt: skip
            if r.returncode:
                print(f"| {name} | failed: {r.stderr.strip().splitlines()[-1]} |")
                break
            res[precision] = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            dim = next(row["dim"] for row in encoder_table() if row["name"] == name)
            a, b = res["fp32"]["patches_per_s"], res["bf16"]["patches_per_s"]
            peak = res["bf16"]["peak_mib"]
            row = f"| {name} | {dim} | {a:.2f} | {b:.2f} | {b / a:.2f} | {peak:.0f} |"
            if gpu:
                fp32, bf16 = res["fp32"], res["bf16"]
                row += f" {fp32['alone']:.0f} | {bf16['alone']:.0f} | {bf16['gpu_mib']:.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
