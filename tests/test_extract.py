import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from wsi_mil.config import ExtractConfig, TilingConfig
from wsi_mil.device import cpu_has_bf16, cpu_has_vnni
from wsi_mil.errors import WsiMilError
from wsi_mil.features import reading as ex
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.extract import extract_features
from wsi_mil.features.reading import read_patch
from wsi_mil.features.runner import EncoderRunner
from wsi_mil.formats.features import read_features
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import segment_tissue


@pytest.fixture(scope="module")
def grid(synthetic_pair):
    s25 = synthetic_pair[1]  # 0.25 um/px scan tiled at 1 um/px: exercises the pyramid path
    with open_slide(s25.path) as slide:
        g = tile(slide, segment_tissue(slide), TilingConfig(target_mpp=1.0, patch_size=128))
    return s25.path, g


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    return EncoderRunner(create_encoder("resnet18", random_weights=True), "cpu", "fp32")


def test_features_match_encoder_on_single_reads(tmp_path, grid, runner):
    path, g = grid
    out = tmp_path / "f.h5"
    extract_features(path, g, runner, out, ExtractConfig(batch_size=16, workers=1))
    bag = read_features(out)
    np.testing.assert_array_equal(bag.coords, g.coords)
    assert bag.features.shape == (len(g), 512)
    for key in (
        "patch_size",
        "patch_size_level0",
        "target_mpp",
        "level0_mpp",
        "encoder",
        "encoder_dim",
        "wsi_mil_version",
        "slide_path",
        "created",
        "encoder_weights",
    ):
        assert key in bag.attrs, key
    assert bag.attrs["encoder_weights"] == "random" and bag.attrs["patch_size_level0"] == 512
    with h5py.File(out) as f:
        assert f["features"].chunks[0] >= min(len(g), 1024)
    idx = np.linspace(0, len(g) - 1, 12).astype(int)
    with open_slide(path) as slide:
        imgs = np.stack([read_patch(slide, *g.coords[i], 512, 128, 224) for i in idx])
    ref = runner(imgs)
    np.testing.assert_allclose(bag.features[idx], ref, rtol=1e-4, atol=1e-4)


def test_bf16_features_close_to_fp32(grid, runner):
    path, g = grid
    with open_slide(path) as slide:
        imgs = np.stack([read_patch(slide, *g.coords[i], 512, 128, 224) for i in range(8)])
    bf = EncoderRunner(runner.encoder, "cpu", "bf16")(imgs)
    ref = runner(imgs)
    cos = (bf * ref).sum(1) / np.linalg.norm(bf, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_cnn_runs_with_relu_and_residual_add_fused_into_its_convolutions(grid):
    """On the CPU every conv+relu / conv+add+relu of resnet50_trunc is one oneDNN call
    (onednn.py), and the features are the unfused encoder's: fp32 to rounding, bf16 to cosine 0.9999."""
    path, g = grid
    with open_slide(path) as slide:
        imgs = np.stack([read_patch(slide, *g.coords[i], 512, 128, 224) for i in range(8)])
    torch.manual_seed(0)
    enc = create_encoder("resnet50_trunc", random_weights=True).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (enc.info.mean, enc.info.std))
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() - mean) / std
    for precision in ("fp32", "bf16"):
        runner = EncoderRunner(enc, "cpu", precision)
        if precision == "bf16" and not cpu_has_bf16():  # oneDNN's fused bf16 kernels need AVX-512
            assert runner.eager is runner.encoder  # so bf16 runs unfused here
        else:
            ops = [n.target for n in runner.eager.net.graph.nodes if n.op in ("call_module", "call_function")]
            fused = [t for t in ops if str(t).endswith("_fused")]
            assert len(fused) == 1 + 3 * (3 + 4 + 6)  # the stem and every block's three convs
            assert not [t for t in ops if "relu" in str(t) or "add" in str(t)]
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            ref = enc(x).float().numpy()
        got = runner(imgs)
        if precision == "fp32":
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.9999, (precision, cos.min())


def test_interrupted_run_resumes_to_identical_file(tmp_path, grid, runner):
    path, g = grid
    cfg = ExtractConfig(batch_size=8, workers=0)
    full = tmp_path / "full.h5"
    extract_features(path, g, runner, full, cfg)
    out = tmp_path / "resumed.h5"
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(path, g, runner, out, cfg, on_batch=interrupt)
    assert not out.exists() and out.with_name("resumed.h5.partial").exists()
    seen = []
    extract_features(path, g, runner, out, cfg, on_batch=lambda d, t: seen.append(d))
    assert seen[0] == 32  # picked up after the 3 finished batches
    a, b = read_features(full), read_features(out)
    np.testing.assert_array_equal(a.features, b.features)
    assert not out.with_name("resumed.h5.partial").exists()


def test_corrupt_region_falls_back_per_patch_and_goes_on(tmp_path, grid, runner, monkeypatch):
    path, g = grid
    bad_y = int(g.coords[0, 1])
    real_row, real_patch = ex.read_patch_row, ex.read_patch

    def row(slide, xs, y, *a):
        if y == bad_y:
            raise OSError("corrupt JPEG tile")
        return real_row(slide, xs, y, *a)

    def patch(slide, x, y, *a):
        if y == bad_y and x == g.coords[0, 0]:
            raise OSError("corrupt JPEG tile")
        return real_patch(slide, x, y, *a)

    monkeypatch.setattr(ex, "read_patch_row", row)
    monkeypatch.setattr(ex, "read_patch", patch)
    summary = extract_features(path, g, runner, tmp_path / "c.h5", ExtractConfig(workers=0))
    assert summary["failed_patches"] == 1
    assert read_features(tmp_path / "c.h5").attrs["failed_patches"] == 1


def test_resnet50_trunc_loads_torchvision_state_dict(tmp_path):
    from wsi_mil.features.compat import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(1)
    full = tv.models.resnet50(weights=None).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "r50.pth")
    enc = create_encoder("resnet50_trunc", weights=tmp_path / "r50.pth")
    assert enc.info.dim == 1024 and enc.info.weights.endswith("r50.pth")
    assert torch.equal(enc.net.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = enc(x)
        f = full
        ref = f.layer3(f.layer2(f.layer1(f.maxpool(f.relu(f.bn1(f.conv1(x)))))))
        ref = ref.mean((2, 3))
    assert feats.shape == (2, 1024)
    torch.testing.assert_close(feats, ref)


def test_timm_encoder_and_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    enc = create_encoder("timm:resnet18", random_weights=True)
    assert enc.info.name == "timm:resnet18" and enc.info.dim == 512
    save_file(enc.net.state_dict(), str(tmp_path / "w.safetensors"))
    again = create_encoder("timm:resnet18", weights=tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), again(x))


def test_missing_weights_give_clear_error(tmp_path, monkeypatch):
    with pytest.raises(WsiMilError, match="weights file not found"):
        create_encoder("resnet50_trunc", weights=tmp_path / "nope.pth")
    from wsi_mil.features.compat import import_torchvision

    tv = import_torchvision()

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(WsiMilError, match="--weights PATH.*--random-weights"):
        create_encoder("resnet50_trunc")
    with pytest.raises(WsiMilError, match="unknown encoder"):
        create_encoder("vgg_nonsense")
    with pytest.raises(WsiMilError, match="--weights w.pth and --random-weights both given; pass one"):
        create_encoder("resnet18", weights="w.pth", random_weights=True)  # the file won silently
    # a mistyped timm name was a 105-line traceback (RuntimeError: Unknown model)
    with pytest.raises(WsiMilError, match=r"timm:resnet1: timm has no model 'resnet1'; close names: .*res"):
        create_encoder("timm:resnet1", random_weights=True)


def test_compat_lets_timm_and_transforms_import_in_a_fresh_process():
    code = (
        "from wsi_mil.features.compat import import_timm; timm = import_timm(); "
        "import torchvision.transforms.v2 as T; m = timm.create_model('resnet18'); "
        "print('ok', type(T.Resize(224)).__name__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok Resize"


def test_extract_cli_end_to_end(tmp_path, synthetic_slide):
    from typer.testing import CliRunner

    from wsi_mil.cli import app

    out = tmp_path / "out"
    args = [
        "extract",
        str(synthetic_slide.path),
        "--out",
        str(out),
        "--encoder",
        "resnet18",
        "--random-weights",
        "--target-mpp",
        "2.0",
        "--patch-size",
        "112",
        "--workers",
        "0",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    name = synthetic_slide.path.stem
    bag = read_features(out / "features" / "resnet18" / f"{name}.h5")
    assert bag.features.shape[1] == 512 and len(bag) > 10
    import csv

    row = next(csv.DictReader(open(out / "manifest_extract.csv")))
    assert row["status"] == "ok" and float(row["patches_per_s"]) > 0
    r = CliRunner().invoke(
        app, ["extract", str(synthetic_slide.path), "--out", str(out), "--encoder", "resnet18"]
    )
    assert r.exit_code == 0, r.output  # done slides are skipped: no weights needed


def test_weights_are_loaded_strictly(tmp_path):
    """A checkpoint with one tensor removed, one unknown tensor, or one of another shape is
    refused with the keys named; a classifier head the encoder lacks may be dropped."""
    enc = create_encoder("timm:resnet18", random_weights=True)
    sd = dict(enc.net.state_dict())
    first = next(k for k in sd if k.endswith("weight"))
    cases = {
        "missing": {k: v for k, v in sd.items() if k != first},
        "unexpected": {**sd, "layer1.0.ls1.gamma": torch.ones(64)},
        "of another shape": {**sd, first: torch.zeros(1)},
    }
    for what, bad in cases.items():
        torch.save(bad, tmp_path / "w.pth")
        with pytest.raises(WsiMilError, match=f"encoder resnet18: tensors .*1 {what}"):
            create_encoder("timm:resnet18", weights=tmp_path / "w.pth")
    torch.save({**sd, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, tmp_path / "h.pth")
    with_head = create_encoder("timm:resnet18", weights=tmp_path / "h.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(with_head(x), enc(x))


@pytest.mark.skipif(not cpu_has_vnni(), reason="int8 needs a CPU with VNNI")
def test_int8_features_stay_within_cosine_0999_of_fp32_on_real_patches(tmp_path, real_slide):
    with open_slide(real_slide) as slide:
        g = tile(slide, segment_tissue(slide), TilingConfig(target_mpp=0.5, patch_size=256))
        imgs = np.stack([read_patch(slide, *g.coords[i], g.patch_size_level0, 256, 224) for i in range(24)])
    enc = create_encoder("resnet50_trunc", random_weights=True)
    cal = tmp_path / "int8_calibration.npy"
    int8 = EncoderRunner(enc, "cpu", "int8", int8_calibration=cal)
    feats = int8(imgs[:16])  # the first batch calibrates, and is kept for later runs
    ref = EncoderRunner(enc, "cpu", "fp32")(imgs[16:])
    got = int8(imgs[16:])  # patches the calibration never saw
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert int8.precision_name == "int8" and cos.min() >= 0.999, cos.min()
    # a resumed run (or another worker) starts on other patches but calibrates on the saved ones
    again = EncoderRunner(enc, "cpu", "int8", int8_calibration=cal)
    again(imgs[16:])
    np.testing.assert_array_equal(again(imgs[:16]), feats)
    with pytest.raises(WsiMilError, match="int8 supports BatchNorm CNN encoders"):
        EncoderRunner(create_encoder("uni_v1", random_weights=True, depth=1), "cpu", "int8")(imgs[:2])
