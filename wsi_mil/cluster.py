"""Running extraction and cross-validation on a Dask cluster (dask.distributed).

`--cluster` takes `local:N` (a LocalCluster of N single-threaded worker processes on this
machine), `tcp://host:8786` (a running scheduler), or `slurm:CONFIG.yaml` (dask-jobqueue's
SLURMCluster; the YAML holds its keyword arguments plus `jobs`, the number of jobs to start).
One slide (or one fold) is one task. Each worker builds its own encoder on its own device and
opens its own slide handles. A task whose worker dies is rescheduled (Dask's
`allowed-failures`); the slide's partial file is resumed or restarted, never left behind, and
the manifest records the attempt count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .errors import WsiMilError


def make_client(spec: str):
    """A dask.distributed Client for `local:N`, `tcp://...` or `slurm:CONFIG.yaml`."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise WsiMilError("--cluster needs dask.distributed: pip install 'wsi-mil[cluster]'") from exc
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise WsiMilError(f"--cluster {spec}: write local:N with N workers, e.g. local:2") from None
        threads = max(1, (os.cpu_count() or 1) // n)
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": str(threads)},
        )
        return Client(cluster)
    if spec.startswith("tcp://"):
        return Client(spec)
    if spec.startswith("slurm:"):
        import yaml
        from dask_jobqueue import SLURMCluster

        path = Path(spec.split(":", 1)[1])
        if not path.exists():
            raise WsiMilError(f"--cluster {spec}: {path} not found (see docs/cluster.md)")
        kw = yaml.safe_load(path.read_text()) or {}
        jobs = int(kw.pop("jobs", 1))
        cluster = SLURMCluster(**kw)
        cluster.scale(jobs=jobs)
        return Client(cluster)
    raise WsiMilError(f"--cluster {spec}: use local:N, tcp://host:port or slurm:CONFIG.yaml")


def _attempts_path(out: Path) -> Path:
    return out.with_name(out.name + ".attempts")


def extract_task(entry, out_dir: str, cfg_json: str, overwrite: bool, tissue_geojson) -> dict:
    """One slide on a worker: segment, tile, encode. Counts attempts across worker deaths."""
    import torch

    from .config import PipelineConfig
    from .features.extract import runner_for
    from .pipeline import Layout, extract_one

    cfg = PipelineConfig.model_validate_json(cfg_json)
    e = cfg.extract
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    layout = Layout(Path(out_dir))
    out = layout.features(e.encoder, entry.name)
    attempts_file = _attempts_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    attempt = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text(str(attempt))

    t0 = time.perf_counter()
    summary = extract_one(entry, layout, cfg, runner_for(e), overwrite, tissue_geojson)
    attempts_file.unlink(missing_ok=True)
    return {**summary, "attempts": attempt, "seconds": time.perf_counter() - t0}


def extract_on_cluster(
    client,
    entries,
    out_dir: Path,
    cfg,
    overwrite: bool = False,
    tissue_geojson=None,
    on_done: Callable[[str, dict | Exception], None] | None = None,
):
    """Submit one task per slide; call `on_done(name, summary or exception)` as each finishes."""
    from dask.distributed import as_completed

    cfg_json = cfg.model_dump_json()
    futures = {
        client.submit(
            extract_task,
            entry,
            str(out_dir),
            cfg_json,
            overwrite,
            tissue_geojson,
            key=f"extract-{entry.name}",
            pure=False,
            retries=1,
        ): entry
        for entry in entries
    }
    for fut in as_completed(futures):
        entry = futures[fut]
        try:
            result = fut.result()
        except Exception as exc:  # the slide failed on every attempt; others go on
            result = exc
        if on_done:
            on_done(entry.name, result)


def fold_task(model_name, splits, classes, cfg_json, out, k) -> str:
    import torch

    from .config import TrainConfig
    from .training.crossval import train_one_fold

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = TrainConfig.model_validate_json(cfg_json)
    return str(
        train_one_fold(
            model_name,
            splits,
            classes,
            cfg,
            Path(out),
            k,
            "cpu"
            if cfg.device == "auto" and not torch.cuda.is_available()
            else ("cuda" if cfg.device == "auto" else cfg.device),
        )
    )


def run_folds_on_cluster(
    client, models, splits, classes, cfg, out: Path, progress: Callable[[str], None] | None = None
) -> None:
    """Train every unfinished (model, fold) as one task; raise if any fails."""
    from dask.distributed import as_completed

    folds = sorted(splits[splits.split == "train"].fold.unique())
    cfg_json = cfg.model_dump_json()
    splits_f = client.scatter(splits, broadcast=True)
    futures = {
        client.submit(
            fold_task,
            m,
            splits_f,
            classes,
            cfg_json,
            str(out),
            int(k),
            key=f"fold-{m}-{k}",
            pure=False,
            retries=1,
        ): (m, k)
        for m in models
        for k in folds
    }
    for fut in as_completed(futures):
        m, k = futures[fut]
        fut.result()
        if progress:
            progress(f"{m} fold {k + 1}/{len(folds)} done on the cluster")
