"""End-to-end extraction patches/s: wsi-mil vs a CLAM-style baseline, median of N runs.

Baseline (CLAM `extract_features_fp.py`): one `read_region` per patch, PIL resize, fp32
contiguous model, reading not overlapped with compute. wsi-mil: row regions read once and
sliced, a reader worker overlapped with the encoder, channels-last + bf16 autocast, and
torch.compile (freezing) when asked.

Usage: python bench/bench_extract.py [--runs 3] [--encoder resnet50_trunc] [--n-large 2048]
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import large_slide  # noqa: E402

from wsi_mil.config import ExtractConfig, TilingConfig  # noqa: E402
from wsi_mil.features.encoders import create_encoder  # noqa: E402
from wsi_mil.features.extract import extract_features  # noqa: E402
from wsi_mil.features.reading import MAX_REGION_PX, read_patch_row, row_runs  # noqa: E402
from wsi_mil.features.runner import EncoderRunner  # noqa: E402
from wsi_mil.wsi.readers import open_slide  # noqa: E402
from wsi_mil.wsi.tiling import PatchGrid, tile  # noqa: E402
from wsi_mil.wsi.tissue import segment_tissue  # noqa: E402

REAL = Path(
    os.environ.get("WSI_MIL_REAL_SLIDE")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
)


def clam_baseline(path, grid: PatchGrid, encoder, batch_size=64, device="cpu") -> np.ndarray:
    model = encoder.float().eval().to(device)
    mean = torch.tensor(encoder.info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.info.std, device=device).view(1, 3, 1, 1)
    out = []
    with open_slide(path, backend="openslide") as slide, torch.inference_mode():
        level = slide.best_level_for_downsample(grid.patch_size_level0 / grid.patch_size)
        side = int(round(grid.patch_size_level0 / slide.level_downsamples[level]))
        batch = []
        for i, (x, y) in enumerate(grid.coords):
            img = Image.fromarray(slide.read_region((x, y), level, (side, side)))
            img = img.resize((224, 224), Image.BILINEAR)
            batch.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255)
            if len(batch) == batch_size or i == len(grid) - 1:
                xb = (torch.stack(batch).to(device) - mean) / std
                out.append(model(xb).cpu().numpy())
                batch = []
    return np.concatenate(out)


class ClamPatches(torch.utils.data.Dataset):
    """CLAM's `Whole_Slide_Bag_FP`: one `read_region` per patch, PIL resize, to a float tensor."""

    def __init__(self, path, grid: PatchGrid, mean, std):
        self.path, self.grid, self.slide = path, grid, None
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.grid)

    def __getitem__(self, i):
        if self.slide is None:
            self.slide = open_slide(self.path, backend="openslide")
        g = self.grid
        level = self.slide.best_level_for_downsample(g.patch_size_level0 / g.patch_size)
        side = int(round(g.patch_size_level0 / self.slide.level_downsamples[level]))
        img = Image.fromarray(self.slide.read_region(tuple(g.coords[i]), level, (side, side)))
        img = img.resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std


def clam_loader_baseline(path, grid: PatchGrid, encoder, device, batch_size=64, workers=8) -> int:
    """CLAM's `extract_features_fp.py` on a GPU: a DataLoader per slide, 8 workers, pinned,
    fp32 model."""
    model = encoder.float().eval().to(device)
    ds = ClamPatches(path, grid, encoder.info.mean, encoder.info.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=True)
    n = 0
    with torch.inference_mode():
        for xb in loader:
            n += len(model(xb.to(device, non_blocking=True)).cpu())
    return n


def read_rows(path, grid: PatchGrid, backend: str) -> int:
    """Reading alone, as the extraction reader does it (row regions, sliced, resized to 224)."""
    n = 0
    with open_slide(path, backend=backend) as slide:
        level = slide.best_level_for_downsample(grid.patch_size_level0 / grid.patch_size)
        max_px = int(MAX_REGION_PX * slide.level_downsamples[level])
        for s, e in row_runs(grid.coords, grid.patch_size_level0, max_px):
            xs, y = grid.coords[s:e, 0], grid.coords[s, 1]
            n += len(read_patch_row(slide, xs, y, grid.patch_size_level0, grid.patch_size, 224))
    return n


def run(label, fn, n, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(f"{label:48s} {n:6d} patches  {t:7.2f} s  {n / t:7.1f} patches/s", flush=True)
    return n / t


def grid_for(path, n_max, patch_size=256):
    with open_slide(path) as slide:
        mask = segment_tissue(slide)
        g = tile(slide, mask, TilingConfig(target_mpp=0.5, patch_size=patch_size, min_tissue=0.25))
    if len(g) > n_max:
        g.coords = g.coords[:n_max]
        g.tissue_fraction = None
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--encoder", default="resnet50_trunc")
    ap.add_argument("--n-large", type=int, default=2048)
    ap.add_argument("--n-baseline", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    enc = create_encoder(args.encoder, random_weights=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, encoder {args.encoder}")
    slides = [("real CMU-1-Small-Region.svs", REAL)] if REAL.exists() else []
    slides.append(("synthetic 40k x 30k", large_slide()))
    tmp = Path(tempfile.mkdtemp())
    for name, path in slides:
        g = grid_for(path, args.n_large)
        gb = grid_for(path, args.n_baseline)
        print(f"-- {name}")
        for backend in ("openslide", "tiffslide"):
            run(f"reader only, {backend} (1 thread)", lambda: read_rows(path, g, backend), len(g), args.runs)
        run(
            "CLAM-style baseline (fp32, 1 read/patch)",
            lambda: clam_baseline(path, gb, enc),
            len(gb),
            args.runs,
        )
        for compile_mode, precision in (("off", "fp32"), ("off", "auto"), ("on", "auto")):
            runner = EncoderRunner(enc, args.device, precision, compile_mode)
            runner.maybe_compile(len(g))
            if compile_mode == "on":  # compile once, outside the timing (cost reported)
                t0 = time.perf_counter()
                runner(np.zeros((64, 224, 224, 3), np.uint8), pad_to=64)
                print(f"{'  torch.compile warm-up':48s} {time.perf_counter() - t0:7.2f} s")
            cfg = ExtractConfig(batch_size=64, workers=args.workers)
            out = tmp / f"{name[:4]}_{compile_mode}_{precision}.h5"

            def go():
                out.unlink(missing_ok=True)
                extract_features(path, g, runner, out, cfg)

            run(
                f"wsi-mil {runner.precision_name} compile={compile_mode} workers={args.workers}",
                go,
                len(g),
                args.runs,
            )
        # fidelity of the fast path vs fp32
        from wsi_mil.formats.features import read_features

        a = read_features(tmp / f"{name[:4]}_off_fp32.h5").features
        b = read_features(tmp / f"{name[:4]}_on_auto.h5").features
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"  cosine(fast, fp32): min {cos.min():.5f}  mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()
