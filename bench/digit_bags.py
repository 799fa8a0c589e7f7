"""Digit bags: a real-image MIL cohort with instance labels, built offline.

The MNIST-bags construction of Ilse et al. (ICML 2018, section 5.2: a bag is positive when it
holds a '9') on scikit-learn's bundled 8x8 handwritten digits (1,797 images, 180 nines), so it
needs no download. Instances are the 64 pixel values scaled to [0, 1]. Positive bags hold 1-3
nines, negative bags none; the rest of each bag are other digits. Test bags (the labels'
`split` column, which crossval respects) are drawn from a disjoint quarter of the images, so no
image is in both a training and a test bag.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

from wsi_mil.formats.features import write_features
from wsi_mil.synthetic import grid_coords


def make_digit_bags(
    out_dir: Path,
    n_bags: int = 100,
    bag_size: tuple[int, int] = (8, 13),
    n_key: tuple[int, int] = (1, 4),
    test_frac: float = 0.25,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write `features/<bag>.h5` and `labels.csv` (with `split`); return each bag's key mask."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    x, nine = (digits.data / 16.0).astype(np.float32), digits.target == 9
    test_pool = np.zeros(len(x), bool)
    for cls in (True, False):  # a quarter of the nines and a quarter of the others held out
        idx = rng.permutation(np.flatnonzero(nine == cls))
        test_pool[idx[: int(round(len(idx) * test_frac))]] = True
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    n_test = int(round(n_bags * test_frac))
    keys, rows = {}, []
    for i in range(n_bags):
        split = "test" if i < n_test else "train"
        pool = test_pool if split == "test" else ~test_pool
        y = i % 2
        n = int(rng.integers(*bag_size))
        k = int(rng.integers(*n_key)) if y else 0
        members = np.concatenate(
            [rng.choice(np.flatnonzero(pool & nine), k, replace=False),
             rng.choice(np.flatnonzero(pool & ~nine), n - k, replace=False)]
        )  # fmt: skip
        order = rng.permutation(n)
        members, key = members[order], (np.arange(n) < k)[order]
        coords = grid_coords(n)
        name = f"bag_{i:03d}"
        attrs = {"patch_size": 256, "patch_size_level0": 256, "encoder": "digits8x8", "encoder_dim": 64}
        write_features(out_dir / "features" / f"{name}.h5", x[members], coords, attrs)
        keys[name] = key
        rows.append({"slide_id": name, "label": y, "case_id": name, "split": split})
    pd.DataFrame(rows).to_csv(out_dir / "labels.csv", index=False)
    return keys
