"""Cross-validation time on small bags: the six MIL models on 240 digit bags of 10-30 instances.

The cohort is `digit_bags.make_digit_bags` (Ilse et al.'s MNIST-bags on sklearn's 8x8 digits,
64-d instances, 25% of the bags a held-out test split by the labels' `split` column) with
bags of 10-30 digits. Each model runs `run_crossval` as `wsi-mil crossval` does by default
(TrainConfig(): 5 folds, 50 epochs, patience 10, inner selection, patch calibration), into
its own run folder. Per model: wall seconds of the whole `run_crossval`, the CPU seconds of
the process over it (all threads), the seconds of its training epochs (history.csv), the
epochs run over the 5 folds, and the test AUC of the fold ensemble; then the totals. On a
machine shared with other processes the CPU seconds of a one-thread run are about the wall
time it would take on an idle core.

Usage: python bench/bench_small_bags.py [--models abmil,...] [--bags 240] [--sizes 10,30]
       [--epochs 50] [--threads N] [--keep DIR] [--json FILE]

`--keep DIR` leaves the run folders there (to compare checkpoints of two code versions);
`--resume` (with `--keep`) keeps the models finished there and resumes an interrupted one from
its finished folds (its wall and CPU seconds then cover the rest only: marked `resumed`);
`--threads` sets torch's intra-op threads before anything runs (default: torch's own);
`--cluster local:N` trains the folds on N worker processes (`wsi-mil crossval --cluster`).
The figures of one code version against another are only comparable from runs on the same
machine at about the same time (interleave them when the machine is shared).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from digit_bags import make_digit_bags  # noqa: E402

from wsi_mil.config import TrainConfig  # noqa: E402
from wsi_mil.formats.run import RunFolder  # noqa: E402
from wsi_mil.training.crossval import run_crossval  # noqa: E402

MODELS = "abmil,dsmil,dtfd,camil,transmil,psmil"


def line(r: dict) -> str:
    epochs, mark = r["epochs"], " resumed" if r["resumed"] else ""
    return (
        f"| {r['model']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['train_s']:.1f} "
        f"| {sum(epochs)} ({'/'.join(map(str, epochs))}) | {r['test_auc']:.4f} |{mark}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--bags", type=int, default=240)
    ap.add_argument("--sizes", default="10,30", help="smallest,largest instances per bag")
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's (50)")
    ap.add_argument("--seed", type=int, default=0, help="the cohort's seed")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", default=None, help="write the cohort and run folders here")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--resume", action="store_true", help="keep what --keep DIR holds (see above)")
    ap.add_argument("--cluster", default=None, help="local:N: folds on N worker processes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp())
    lo, hi = (int(s) for s in args.sizes.split(","))
    data = root / "cohort"
    if not (data / "labels.csv").exists():
        make_digit_bags(data, n_bags=args.bags, bag_size=(lo, hi + 1), seed=args.seed)
    cfg = TrainConfig(**({"epochs": args.epochs} if args.epochs else {}))
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} intra-op threads; {args.bags} bags of {lo}-{hi} instances")
    print("| model | wall s | CPU s | training s | epochs (5 folds) | test AUC |")
    print("|---|---|---|---|---|---|", flush=True)
    rows, map_fn = [], None
    if args.cluster:
        from wsi_mil.cluster import dask_map, make_client

        map_fn = dask_map(make_client(args.cluster))
    for name in args.models.split(","):
        out, done = root / f"run_{name}", root / f"row_{name}.json"
        if args.resume and done.exists():
            row = json.loads(done.read_text())
            rows.append(row)
            print(line(row), flush=True)
            continue
        resumed = args.resume and out.exists()
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_crossval(
            data / "features", data / "labels.csv", out, cfg, [name], map_fn=map_fn, overwrite=not resumed
        )[0]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        run = RunFolder(out)
        hist = [run.read_fold_history(name, k) for k in range(cfg.folds)]
        epochs = [len(h) for h in hist]
        train_s = float(sum(h.seconds.sum() for h in hist))
        auc = res["test"]["auc"]
        row = {"model": name, "wall_s": wall, "cpu_s": cpu, "train_s": train_s, "epochs": epochs}
        row["test_auc"], row["resumed"] = auc, resumed
        rows.append(row)
        done.write_text(json.dumps(row))
        print(line(row), flush=True)
    wall, cpu, train_s = (sum(r[k] for r in rows) for k in ("wall_s", "cpu_s", "train_s"))
    epochs = sum(sum(r["epochs"]) for r in rows)
    print(f"| total | {wall:.1f} | {cpu:.1f} | {train_s:.1f} | {epochs} | |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
