"""Dask cluster runs: same features and reports as local runs, worker deaths survived."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest
import torch

pytest.importorskip("dask.distributed")

from wsi_mil.synthetic import make_feature_cohort  # noqa: E402

EXTRACT = [
    "--encoder",
    "resnet18",
    "--random-weights",
    "--target-mpp",
    "1.0",
    "--patch-size",
    "128",
    "--workers",
    "0",
]


@pytest.fixture(scope="module")
def slides(four_slides, tmp_path_factory):
    """Two of the four slides (one with tumour, one without): a slide per cluster worker."""
    two = tmp_path_factory.mktemp("two_slides")
    for name in ("s0.tif", "s1.tif"):
        shutil.copy(four_slides / name, two / name)
    return two


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "wsi_mil", *args], capture_output=True, text=True, timeout=900, env=env
    )


def _features(folder):
    return {p.stem: h5py.File(p)["features"][:] for p in sorted(folder.glob("*.h5"))}


def test_cluster_extraction_matches_local_byte_for_byte(tmp_path, slides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as each cluster worker
    r = _cli("extract", str(slides), "--out", str(tmp_path / "local"), *EXTRACT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(
        "extract", str(slides), "--out", str(tmp_path / "dask"), *EXTRACT, "--cluster", "local:2", env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a = _features(tmp_path / "local" / "features" / "resnet18")
    b = _features(tmp_path / "dask" / "features" / "resnet18")
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    rows = list(csv.DictReader(open(tmp_path / "dask" / "manifest_extract.csv")))
    assert {r["status"] for r in rows} == {"ok"}
    assert not list((tmp_path / "dask").rglob("*.partial"))


def _descendants(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in out.stdout.split()]
    return kids + [g for k in kids for g in _descendants(k)]


def test_worker_killed_mid_slide_is_survived(tmp_path, slides):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsi_mil",
            "extract",
            str(slides),
            "--out",
            str(out),
            *EXTRACT,
            "--batch-size",
            "8",
            "--cluster",
            "local:2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    feats = out / "features" / "resnet18"
    deadline = time.time() + 300
    while time.time() < deadline and not list(feats.glob("*.h5.partial")):
        time.sleep(0.2)
    assert list(feats.glob("*.h5.partial")), "no slide started"
    # the workers are the nannies' children: kill them all mid-slide
    workers = [p for p in _descendants(proc.pid) if _descendants(p) == []]
    for p in workers:
        os.kill(p, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    rows = {r["slide"]: r for r in csv.DictReader(open(out / "manifest_extract.csv"))}
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values()), rows
    assert any(r["attempts"] == "2" for r in rows.values())  # the killed slides were retried
    assert not list(out.rglob("*.partial")) and not list(out.rglob("extract-*.lock"))
    assert len(list(feats.glob("*.h5"))) == 2


def test_crossval_on_cluster_equals_local(tmp_path):
    from dask.distributed import Client, LocalCluster

    from wsi_mil.cluster import dask_map
    from wsi_mil.config import TrainConfig
    from wsi_mil.training.crossval import run_crossval

    make_feature_cohort(tmp_path, n_bags=32, strength=4.0, seed=3)
    cfg = TrainConfig(folds=3, test_frac=0.25, epochs=6, patience=3, lr=5e-4, bootstrap=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_crossval(
            tmp_path / "features", tmp_path / "labels.csv", tmp_path / "local", cfg, ["psmil"]
        )
    finally:
        torch.set_num_threads(threads)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, env={"OMP_NUM_THREADS": "1"}
        ) as cluster,
        Client(cluster) as client,
    ):
        remote = run_crossval(
            tmp_path / "features",
            tmp_path / "labels.csv",
            tmp_path / "dask",
            cfg,
            ["psmil"],
            map_fn=dask_map(client),
        )
    assert local == remote
    assert (tmp_path / "local" / "report.md").read_text() == (tmp_path / "dask" / "report.md").read_text()
