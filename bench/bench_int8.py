"""int8 inference for resnet50_trunc on a CPU with VNNI: feature fidelity and speed (issue #17).

Post-training static quantisation (torch.ao FX graph mode, the "x86" backend: per-channel
int8 weights, per-tensor uint8 activations, calibrated on real patches) vs the fp32 model
(fidelity) and vs bf16 autocast, the default precision (speed). Real patches come from the
shared slide (`WSI_MIL_REAL_SLIDE` or ../shared/data): half calibrate, the other half are
scored. The issue keeps int8 only if every feature stays within cosine 0.999 of fp32.

Usage: python bench/bench_int8.py [--patches 128] [--runs 3] [--weights resnet50.pth]
"""

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from wsi_mil.config import TilingConfig
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.reading import read_patches, region_limit
from wsi_mil.features.runner import EncoderRunner
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import segment_tissue

REAL = Path(
    os.environ.get("WSI_MIL_REAL_SLIDE")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
)


def real_patches(n: int) -> np.ndarray:
    with open_slide(REAL) as s:
        # 50% overlap: about 4x the patches of the default grid, all real tissue
        grid = tile(s, segment_tissue(s), TilingConfig(target_mpp=0.5, patch_size=256, overlap=0.5))
        coords = grid.coords[np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)]
        limit = region_limit(s, grid.patch_size_level0, grid.patch_size)
        images, _ = read_patches(s, coords, grid.patch_size_level0, grid.patch_size, 224, limit)
    return images


def rate(fn, x: np.ndarray, runs: int) -> float:
    fn(x[:8])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", default=None, help="real resnet50 weights (default: random)")
    args = ap.parse_args()
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    enc = create_encoder("resnet50_trunc", weights=args.weights, random_weights=args.weights is None)
    images = real_patches(args.patches)
    half = len(images) // 2
    mean = torch.tensor(enc.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.info.std).view(1, 3, 1, 1)

    def normalise(batch: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std

    fp32, bf16 = EncoderRunner(enc, "cpu", "fp32"), EncoderRunner(enc, "cpu", "bf16")
    net = copy.deepcopy(enc.net).eval()
    with torch.no_grad():
        prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (normalise(images[:2]),))
        for i in range(0, half, 16):  # calibration on the first half
            prepared(normalise(images[i : min(i + 16, half)]))
        qnet = convert_fx(prepared)
    held_out = images[half:]
    ref = torch.from_numpy(fp32(held_out))
    with torch.no_grad():
        q = qnet(normalise(held_out))
    b = torch.from_numpy(bf16(held_out))
    cos = torch.nn.functional.cosine_similarity(q, ref, dim=1)
    cos_bf16 = torch.nn.functional.cosine_similarity(b, ref, dim=1)
    print(
        f"{len(held_out)} held-out real patches (of {len(images)}), cosine to fp32: "
        f"int8 min {cos.min():.5f} median {cos.median():.5f}; "
        f"bf16 (default) min {cos_bf16.min():.5f} median {cos_bf16.median():.5f}"
    )
    with torch.no_grad():
        r_fp32 = rate(fp32, images, args.runs)
        r_bf16 = rate(bf16, images, args.runs)
        r_int8 = rate(lambda batch: qnet(normalise(batch)), images, args.runs)
    print(
        f"patches/s, batch {len(images)}, median of {args.runs}: fp32 {r_fp32:.1f}, bf16 (default) "
        f"{r_bf16:.1f}, int8 {r_int8:.1f} = {r_int8 / r_bf16:.2f}x bf16"
    )


if __name__ == "__main__":
    main()
