"""Shared fixtures: synthetic slides built once per session, and the real Aperio slide."""

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.synthetic import make_masks, write_synthetic_slide

REAL_SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def real_slide() -> Path:
    if not REAL_SLIDE.exists():
        pytest.skip("../shared/data/CMU-1-Small-Region.svs is absent")
    return REAL_SLIDE


@pytest.fixture(scope="session")
def synthetic_pair(tmp_path_factory):
    """The same tissue 'scanned' at 0.5 and 0.25 um/px (3 x 2 mm, with tumor)."""
    d = tmp_path_factory.mktemp("pair")
    masks = make_masks(3000, 2000, np.random.default_rng(7), n_pieces=3, tumor_regions=2)
    s50 = write_synthetic_slide(d / "s50.tif", 3000, 2000, 0.5, masks=masks, seed=7)
    s25 = write_synthetic_slide(d / "s25.tif", 3000, 2000, 0.25, masks=masks, seed=7)
    return s50, s25


@pytest.fixture(scope="session")
def synthetic_slide(synthetic_pair):
    return synthetic_pair[0]


@pytest.fixture(scope="session")
def four_slides(tmp_path_factory):
    """Four 2.5 x 2 mm slides at 0.5 um/px, two with tumor (the stream, cluster and fault tests')."""
    d = tmp_path_factory.mktemp("four_slides")
    for i in range(4):
        write_synthetic_slide(d / f"s{i}.tif", 2500, 2000, 0.5, tumor_regions=i % 2, seed=20 + i)
    return d
