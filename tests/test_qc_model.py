"""GrandQC's artefact model as a QC source (wsi/qc_model.py): built and preprocessed as its
authors' package does it, loaded strictly, and its class map placed on the slide exactly."""

import numpy as np
import pytest
import shapely
import torch

from wsi_mil.config import QCConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import import_timm
from wsi_mil.synthetic import write_synthetic_slide
from wsi_mil.wsi import qc, qc_model
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tissue import segment_tissue

import_timm()  # torchvision's stand-in ops before smp imports timm (features/compat.py)
smp = pytest.importorskip("segmentation_models_pytorch", reason="pip install 'wsi-mil[qc]'")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8, activation=None)
    for m in model.modules():  # running statistics away from 0/1, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("grandqc") / "GrandQC_MPP1_state_dict.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_same_classes_as_the_authors_pipeline(checkpoint):
    """The authors' inference (wsi_process.py): smp's imagenet preprocessing_fn on the RGB
    tile, then `model.predict` and argmax over the 8 outputs."""
    path, theirs = checkpoint
    ours = qc_model.load_grandqc(path)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    # smp 0.3.1 (the authors' pin): get_preprocessing_fn("timm-efficientnet-b0", "imagenet") is
    # preprocess_input with prepare_settings(timm's default_cfgs["tf_efficientnet_b0"]); smp 0.6
    # fetches the same settings from the hub, so they are taken from timm here (offline)
    from segmentation_models_pytorch.encoders._preprocessing import preprocess_input
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("tf_efficientnet_b0")
    prep = lambda t: preprocess_input(t, cfg.mean, cfg.std, input_space="RGB", input_range=(0, 1))  # noqa: E731
    x = torch.from_numpy(np.stack([prep(t).transpose(2, 0, 1).astype("float32") for t in tiles]))
    expected = theirs.predict(x).argmax(1).numpy()
    got = qc_model.predict_classes(ours, tiles)
    assert got.dtype == np.uint8 and (got == expected).mean() > 0.999


def test_checkpoint_errors_name_the_file(checkpoint, tmp_path):
    path, model = checkpoint
    state = model.state_dict()
    state.pop("segmentation_head.0.bias")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WsiMilError, match="partial.pth: not GrandQC's artefact model"):
        qc_model.load_grandqc(tmp_path / "partial.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole pickled module
    with pytest.raises(WsiMilError, match="pickled.pth: not a state dict"):
        qc_model.load_grandqc(tmp_path / "pickled.pth")
    with pytest.raises(WsiMilError, match="missing.pth: no such file"):
        qc_model.load_grandqc(tmp_path / "missing.pth")


def test_class_map_lands_where_the_artefact_is(tmp_path, monkeypatch, checkpoint):
    """A stand-in network that calls blue pixels "pen marking" (4): apply_qc's pen polygons must
    cover the slide's blue pixels (and little else), so tiles, mosaic and QC grid line up."""
    s = write_synthetic_slide(tmp_path / "s.tif", 1600, 1200, 1.0, seed=3, n_pieces=2, artefacts=True)
    blue = lambda img: qc.pen_masks(img, QCConfig())["pen_blue"]  # noqa: E731

    def fake_predict(model, tiles, batch=8):
        return np.where(np.stack([blue(t) for t in tiles]), 4, 1).astype(np.uint8)

    monkeypatch.setattr(qc_model, "predict_classes", fake_predict)
    with open_slide(s.path) as slide:
        mask = segment_tissue(slide)
        out = qc.apply_qc(slide, mask, QCConfig(mode="remove", model=checkpoint[0]))
        ys, xs = np.nonzero(blue(slide.read_at_mpp(0, 0, *slide.dimensions, 1.0)))  # 1 um = level 0
    assert set(out.artefacts) == {"pen"} and 0 < out.qc["removed_fraction"]["pen"] < 0.3
    on_tissue = shapely.contains_xy(mask.polygons, xs + 0.5, ys + 0.5)
    found = shapely.contains_xy(out.artefacts["pen"], xs + 0.5, ys + 0.5)[on_tissue]
    shifted = shapely.contains_xy(out.artefacts["pen"], xs + 16.5, ys + 0.5)[on_tissue]
    assert found.mean() > 0.9 and found.mean() > shifted.mean() + 0.05  # 94% here, 86% 16 px off
    assert 0.75 < out.artefacts["pen"].area / on_tissue.sum() < 1.25
    assert not out.polygons.intersection(out.artefacts["pen"]).area > 1  # cut out in remove mode
