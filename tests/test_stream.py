"""The cohort-wide extraction stream: full batches across slide boundaries, the same features
as the per-slide path, and an exact resume after kill -9."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from wsi_mil.config import ExtractConfig
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.extract import extract_features, open_feature_writer
from wsi_mil.features.runner import EncoderRunner
from wsi_mil.features.stream import StreamJob, run_stream
from wsi_mil.features.stream_workers import reader_count, reader_pool
from wsi_mil.formats.patches import read_patches

EXTRACT = ["--encoder", "resnet18", "--random-weights", "--target-mpp", "1.0", "--patch-size", "128"]


@pytest.fixture(scope="module")
def slides(four_slides):
    return four_slides


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, slides):
    """The cohort extracted by the CLI (one stream), batch 16."""
    out = tmp_path_factory.mktemp("streamed")
    cmd = [
        sys.executable,
        "-m",
        "wsi_mil",
        "extract",
        str(slides),
        "--out",
        str(out),
        *EXTRACT,
        "--batch-size",
        "16",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class CountingRunner:
    """Wraps an EncoderRunner and records every batch's size."""

    def __init__(self, runner):
        self.runner, self.sizes = runner, []
        self.info, self.compiled, self.device = runner.info, False, runner.device

    def maybe_compile(self, n):
        pass

    def submit(self, images, pad_to=None):
        self.sizes.append(len(images))
        return self.runner.submit(images)


def test_batches_are_full_across_slides_and_only_the_last_is_short(tmp_path, slides, streamed):
    runner = CountingRunner(EncoderRunner(create_encoder("resnet18", random_weights=True), "cpu", "fp32"))
    cfg = ExtractConfig(batch_size=16, workers=2)
    jobs, done = [], []
    for i in range(4):
        grid = read_patches(streamed / "patches" / f"s{i}.h5")
        writer = open_feature_writer(tmp_path / f"s{i}.h5", grid, runner.runner, cfg, slides / f"s{i}.tif")
        jobs.append(StreamJob(f"s{i}", slides / f"s{i}.tif", None, grid, writer))
    run_stream(iter(jobs), runner, cfg, done.append)
    total = sum(len(j.grid) for j in jobs)
    assert [j.name for j in done] == [f"s{i}" for i in range(4)] and all(j.error is None for j in done)
    assert sum(runner.sizes) == total and len(runner.sizes) == -(-total // 16)
    assert set(runner.sizes[:-1]) == {16}  # no slide pads or shortens a batch; only the last
    assert any(len(j.grid) % 16 for j in jobs)  # the slides do not divide into batches themselves


def test_stream_features_equal_the_per_slide_path(tmp_path, slides, streamed):
    runner = EncoderRunner(create_encoder("resnet18", random_weights=True), "cpu", "auto")
    for i in range(4):
        grid = read_patches(streamed / "patches" / f"s{i}.h5")
        extract_features(slides / f"s{i}.tif", grid, runner, tmp_path / f"s{i}.h5", ExtractConfig(workers=0))
        a = h5py.File(tmp_path / f"s{i}.h5")["features"][:]
        b = h5py.File(streamed / "features" / "resnet18" / f"s{i}.h5")["features"][:]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape and cos.min() >= 0.9999, (i, cos.min())


def test_stream_killed_mid_cohort_resumes_to_identical_files(tmp_path, slides, streamed):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "wsi_mil",
        "extract",
        str(slides),
        "--out",
        str(out),
        *EXTRACT,
        "--batch-size",
        "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    feats = out / "features" / "resnet18"
    deadline = time.time() + 300
    while time.time() < deadline and not (list(feats.glob("*.h5")) and list(feats.glob("*.partial"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(out.rglob("*.partial"))
    for i in range(4):
        a = h5py.File(feats / f"s{i}.h5")["features"][:]
        b = h5py.File(streamed / "features" / "resnet18" / f"s{i}.h5")["features"][:]
        if torch.cuda.is_available():  # cuDNN may pick other kernels for the shifted batches
            np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
        else:
            np.testing.assert_array_equal(a, b)


def test_reader_processes_give_the_thread_readers_features(tmp_path, slides, streamed, monkeypatch):
    """The GPU machine's reader processes (forked from the fork server, one slide handle each,
    PIL's resize, no torch loaded) read what threads read."""
    import wsi_mil.features.stream as stream

    used = []

    def pool(most, device_type):
        used.append(reader_pool(most, "cuda"))
        return used[-1]

    monkeypatch.setattr(stream, "reader_pool", pool)
    runner = EncoderRunner(create_encoder("resnet18", random_weights=True), "cpu", "auto")
    cfg = ExtractConfig(batch_size=16, workers=2)
    jobs, done = [], []
    for i in range(4):
        grid = read_patches(streamed / "patches" / f"s{i}.h5")
        writer = open_feature_writer(tmp_path / f"s{i}.h5", grid, runner, cfg, slides / f"s{i}.tif")
        jobs.append(StreamJob(f"s{i}", slides / f"s{i}.tif", None, grid, writer))
    run_stream(iter(jobs), runner, cfg, done.append)
    assert used and all(j.error is None for j in done) and len(done) == 4
    with reader_pool(2, "cuda") as p:
        from wsi_mil.features.reading import read_piece

        grid = read_patches(streamed / "patches" / "s0.h5")
        p.submit(
            read_piece, slides / "s0.tif", None, grid.coords[:2], grid.patch_size_level0, 128, 224
        ).result()
        assert not p.submit(eval, "'torch' in __import__('sys').modules").result()
    for i in range(4):
        a = h5py.File(tmp_path / f"s{i}.h5")["features"][:]
        b = h5py.File(streamed / "features" / "resnet18" / f"s{i}.h5")["features"][:]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape and cos.min() >= 0.9999, (i, cos.min())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_cuda_pipelined_submit_equals_one_batch_at_a_time():
    """Pinned double buffers: batches queued ahead, a short last batch, results taken late."""
    runner = EncoderRunner(create_encoder("resnet18", random_weights=True), "cuda", "fp32")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 255, (n, 224, 224, 3), dtype=np.uint8) for n in (16, 16, 16, 16, 5)]
    one_by_one = [runner(b) for b in batches]
    pending = [runner.submit(b) for b in batches]  # all queued before any result is taken
    for want, p in zip(one_by_one, pending):
        np.testing.assert_allclose(p.result(), want, rtol=1e-4, atol=1e-4)


def test_planning_processes_tile_what_the_planner_thread_tiles(tmp_path, slides, streamed, monkeypatch):
    """GPU machines segment and tile upcoming slides in spawned processes; same patches and
    features as the single planner thread of the CLI run."""
    import wsi_mil.features.stream_workers as workers
    from wsi_mil.config import PipelineConfig, TilingConfig
    from wsi_mil.pipeline.layout import Layout
    from wsi_mil.pipeline.runner import run_stage
    from wsi_mil.pipeline.stages import ExtractStage
    from wsi_mil.wsi.collect import SlideEntry

    monkeypatch.setattr(workers, "planner_count", lambda device_type: 2)
    cfg = PipelineConfig(tiling=TilingConfig(target_mpp=1.0, patch_size=128))
    cfg.extract.encoder, cfg.extract.random_weights, cfg.extract.batch_size = "resnet18", True, 16
    entries = [SlideEntry(slides / f"s{i}.tif") for i in range(4)]
    result = run_stage(ExtractStage(Layout(tmp_path), cfg), entries)
    assert result.ok, result.summary()
    for i in range(4):
        ours = read_patches(tmp_path / "patches" / f"s{i}.h5")
        theirs = read_patches(streamed / "patches" / f"s{i}.h5")
        np.testing.assert_array_equal(ours.coords, theirs.coords)
        a = h5py.File(tmp_path / "features" / "resnet18" / f"s{i}.h5")["features"][:]
        b = h5py.File(streamed / "features" / "resnet18" / f"s{i}.h5")["features"][:]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.9999, (i, cos.min())


def test_readers_are_one_per_spare_core_on_a_gpu_one_on_the_cpu(monkeypatch):
    """All of a GPU machine's readers from the start (growing them as the GPU waited fed a large
    slide at half the rate on the H100); `--workers` fixes the count everywhere."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert reader_count(ExtractConfig(), "cuda") == 15
    assert reader_count(ExtractConfig(), "cpu") == 1
    fixed = ExtractConfig(workers=4)
    assert reader_count(fixed, "cuda") == reader_count(fixed, "cpu") == 4
