"""Dask clients for `--cluster`, and the map function that runs tasks on them.

`--cluster` takes `local:N` (a LocalCluster of N worker processes on this machine),
`tcp://host:8786` (a running scheduler), or `slurm:CONFIG.yaml` (dask-jobqueue's
SLURMCluster; the YAML holds its keyword arguments plus `jobs`, the number of jobs to start).
Nothing here knows a stage: the pipeline runner and crossval hand their per-slide or per-fold
function to `dask_map`. A task whose worker dies is rescheduled (`retries`).
"""

from __future__ import annotations

import os
import uuid
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


def dask_map(client, retries: int = 1):
    """A map function over `client`: one task per item, `retries` reschedules when a worker
    dies; yields (item, result or the exception) as tasks finish."""
    from dask.distributed import as_completed

    def map_fn(fn, items):
        futures = {
            client.submit(fn, item, key=f"wsi-mil-{uuid.uuid4().hex}", pure=False, retries=retries): item
            for item in items
        }
        for fut in as_completed(futures):
            try:
                yield futures[fut], fut.result()
            except Exception as exc:  # failed on every attempt; the others go on
                yield futures[fut], exc

    return map_fn
