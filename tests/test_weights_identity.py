"""Checkpoint identity (#32): a checkpoint in another encoder's key layout is refused naming both,
CLAM's truncated ResNet50 checkpoint loads as `resnet50_trunc`, the weights file's sha256 is in
every feature file and in the run fingerprint, and `heatmap` never swaps a run's missing (or
changed) weights file for the hub's. Tiny models only: depth-1 ViTs, ResNets."""

from functools import partial

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_mil.config import PipelineConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.features import weights as wmod
from wsi_mil.features.compat import import_timm
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.foundation import FOUNDATION_MODELS, build_vit, weights_module
from wsi_mil.features.weights import file_sha256, layout_owners


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def uni_file(tmp_path_factory):
    """A UNI checkpoint (timm ViT-L/16 layout, LayerScale), depth 1."""
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(weights_module(create_encoder("uni_v1", random_weights=True, depth=1).net).state_dict(), path)
    return path


def test_uni_checkpoint_is_refused_as_phikon_v2_naming_both(uni_file):
    with pytest.raises(WsiMilError) as info:
        create_encoder("phikon_v2", weights=uni_file, depth=1)
    _one_line(info, str(uni_file), "uni_v1's key layout", "patch_embed.proj", "not phikon_v2's",
              "--encoder uni_v1", "phikon_v2 checkpoint")  # fmt: skip
    # ... and it is still UNI's own checkpoint
    assert create_encoder("uni_v1", weights=uni_file, depth=1).info.weights_sha256 == file_sha256(uni_file)


def test_a_checkpoint_that_fits_no_registered_layout_says_it_is_not_phikon_v2(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, tmp_path / "odd.bin")
    with pytest.raises(WsiMilError) as info:
        create_encoder("phikon_v2", weights=tmp_path / "odd.bin", depth=1)
    _one_line(info, "not in phikon_v2's key layout", "embeddings.patch_embeddings", "patch_embed.proj.weight")


def _meta_weights(name: str) -> dict:
    """Encoder `name`'s checkpoint layout, shapes only (depth 1): no memory, no init time."""
    with torch.device("meta"):
        return weights_module(build_vit(FOUNDATION_MODELS[name], depth=1)).state_dict()


def test_strict_failure_names_the_encoder_whose_layout_the_file_has():
    """Virchow2 has 4 register tokens, Virchow none: a Virchow checkpoint fails Virchow2's strict
    load, and the refusal names Virchow."""
    import_timm()
    sd = _meta_weights("virchow")
    assert layout_owners(sd) == ["virchow"]
    with torch.device("meta"):
        virchow2 = weights_module(build_vit(FOUNDATION_MODELS["virchow2"], depth=1))
    err = str(wmod._identity_error("v.bin", sd, "virchow2", virchow2))
    assert err == (
        "v.bin: these weights have virchow's key layout (e.g. no reg_token), not virchow2's: "
        "pass --encoder virchow, or the virchow2 checkpoint"
    )


def test_identical_layouts_load_as_either():
    """H-optimus-0 and -1 share one architecture: the layout cannot tell them apart (the
    sha256 in the feature files can), so neither refuses the other."""
    import_timm()
    sd = _meta_weights("hoptimus0")
    assert layout_owners(sd) == ["hoptimus0", "hoptimus1"]
    assert wmod._identity_error("h.bin", sd, "hoptimus1", None) is None
    err = str(wmod._identity_error("h.bin", sd, "uni_v2", None))
    assert "hoptimus0's key layout" in err and "--encoder hoptimus0 (or hoptimus1)," in err


@pytest.fixture(scope="module")
def clam_trunc(tmp_path_factory):
    """CLAM's resnet50_trunc as CLAM saves it: TimmCNNEncoder(`model` = timm resnet50.tv_in1k
    features_only, out_indices=(3,)): layer3 is the last stage, no fc, keys under `model.`."""
    timm = import_timm()
    torch.manual_seed(3)
    features = timm.create_model("resnet50.tv_in1k", features_only=True, out_indices=(3,), pretrained=False)
    with torch.no_grad():  # running statistics that are not the defaults
        for name, buf in features.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("clam") / "resnet50_trunc.pth"
    torch.save({f"model.{k}": v for k, v in features.state_dict().items()}, path)
    return features.eval(), path


def test_clams_truncated_checkpoint_loads_as_resnet50_trunc(clam_trunc):
    features, path = clam_trunc
    enc = create_encoder("resnet50_trunc", weights=path)
    assert enc.info.weights == str(path) and enc.info.weights_sha256 == file_sha256(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = features(x)[-1].mean((2, 3))  # CLAM: AdaptiveAvgPool2d(1) on layer3's output
        torch.testing.assert_close(enc(x), want)


def test_resnet50_trunc_errors_name_resnet50_trunc(clam_trunc, tmp_path, uni_file):
    _, path = clam_trunc
    sd = torch.load(path, weights_only=True)
    sd.pop("model.layer3.5.bn3.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WsiMilError) as info:
        create_encoder("resnet50_trunc", weights=tmp_path / "broken.pth")
    msg = _one_line(info, "encoder resnet50_trunc: tensors 1 missing (e.g. layer3.5.bn3.weight)")
    assert "layer4" not in msg
    with pytest.raises(WsiMilError) as info:  # CLAM's checkpoint is not a ResNet18
        create_encoder("resnet18", weights=path)
    _one_line(info, "resnet50_trunc's key layout", "not resnet18's", "--encoder resnet50_trunc")
    with pytest.raises(WsiMilError) as info:
        create_encoder("resnet50_trunc", weights=uni_file)
    _one_line(info, "uni_v1's key layout", "not resnet50_trunc's")


def test_wrong_weights_probes_exit_2_with_one_line(uni_file, clam_trunc, tmp_path, monkeypatch):
    from wsi_mil.cli import app
    from wsi_mil.features import runner as runner_module

    # the CLI builds the full-size encoder; a depth-1 one refuses the same file the same way
    def small(name, weights=None, random_weights=False):
        depth = {"depth": 1} if name in ("phikon_v2", "uni_v1") else {}
        return create_encoder(name, weights, random_weights, **depth)

    monkeypatch.setattr(runner_module, "create_encoder", small)
    monkeypatch.setattr(runner_module, "_RUNNERS", {})
    slide = tmp_path / "s.tif"  # the encoder is built, and refused, before any slide is opened
    slide.write_bytes(b"not read")
    base = ["extract", str(slide), "--out", str(tmp_path / "out"), "--workers", "0"]
    for encoder, weights, needle in (
        ("phikon_v2", uni_file, "uni_v1's key layout"),
        ("resnet18", clam_trunc[1], "resnet50_trunc's key layout"),
    ):
        r = CliRunner().invoke(app, [*base, "--encoder", encoder, "--weights", str(weights)])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in r.output.replace("\n", ""), r.output


def test_feature_files_carry_the_weights_sha256(tmp_path):
    from types import SimpleNamespace

    from wsi_mil.config import ExtractConfig
    from wsi_mil.features.extract import open_feature_writer
    from wsi_mil.formats.features import read_features
    from wsi_mil.wsi.tiling import PatchGrid

    w = tmp_path / "r18.pth"
    torch.save(create_encoder("resnet18", random_weights=True).net.state_dict(), w)
    grid = PatchGrid(np.array([[0, 0], [512, 0]], np.int64), 64, 512, 4.0, 0.5)
    with_file, random = create_encoder("resnet18", weights=w), create_encoder("resnet18", random_weights=True)
    for name, enc in (("w", with_file), ("r", random)):
        runner = SimpleNamespace(info=enc.info, precision_name="fp32")  # what the writer reads of it
        writer = open_feature_writer(tmp_path / f"{name}.h5", grid, runner, ExtractConfig(), "s.tif")
        writer.write(0, np.ones((2, 512), np.float32))
        writer.finish()
    assert read_features(tmp_path / "w.h5").attrs["encoder_weights_sha256"] == file_sha256(w)
    assert create_encoder("resnet18", weights=w).info.weights_sha256 == file_sha256(w)
    # random weights have no file: no attribute
    assert "encoder_weights_sha256" not in read_features(tmp_path / "r.h5").attrs


def test_sha256_is_streamed_and_cached_by_path_mtime_and_size(tmp_path, monkeypatch):
    import hashlib
    import os
    from types import SimpleNamespace

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10_000_000)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    calls = []
    counting = SimpleNamespace(sha256=lambda: calls.append(1) or hashlib.sha256())
    monkeypatch.setattr(wmod, "hashlib", counting)
    file_sha256(f)
    assert calls == []  # cached
    f.write_bytes(b"b" * 10_000_000)
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() and calls == [1]


def test_partial_feature_file_of_other_weights_is_not_resumed(tmp_path):
    from wsi_mil.formats.features import FeatureWriter

    coords = np.zeros((4, 2), np.int64)

    def writer(sha):
        attrs = {"encoder": "e", **({"encoder_weights_sha256": sha} if sha else {})}
        return FeatureWriter(tmp_path / "f.h5", coords, 3, "float32", attrs)

    w = writer("a")
    w.write(0, np.ones((2, 3), np.float32))
    w.abort()
    for sha, resumed in (("a", 2), (None, 2), ("b", 0)):  # None: a caller that does not know it
        w = writer(sha)
        assert w.n_done == resumed, sha
        w.abort()


def test_run_fingerprint_holds_the_weights_sha256_and_old_runs_still_resume():
    from wsi_mil.config import TrainConfig
    from wsi_mil.training.run_inputs import _fingerprint_differences

    config = TrainConfig().model_dump(exclude={"device"})
    base = {"labels": "l", "features": "f", "wsi_mil_version": "v", "config": config}
    now = {**base, "encoder_weights_sha256": ["b" * 64]}
    assert _fingerprint_differences({**base, "encoder_weights_sha256": ["b" * 64]}, now) == []
    assert _fingerprint_differences(base, now) == []  # a run from before the sha256 was kept
    assert _fingerprint_differences({**base, "encoder_weights_sha256": None}, now) == []
    diffs = _fingerprint_differences({**base, "encoder_weights_sha256": ["a" * 64]}, now)
    assert diffs == [f"encoder weights (sha256 {'a' * 12} -> {'b' * 12})"]


def test_input_fingerprint_reads_the_sha256_from_the_feature_files(tmp_path):
    import pandas as pd

    from wsi_mil.config import TrainConfig
    from wsi_mil.formats.features import write_features
    from wsi_mil.training.run_inputs import feature_spec, input_fingerprint

    paths = []
    for i, sha in enumerate(["c" * 64, None]):
        p = tmp_path / f"s{i}.h5"
        attrs = {"encoder": "resnet18", "encoder_weights": "w.pth", "encoder_weights_sha256": sha}
        write_features(p, np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), attrs)
        paths.append(p)
    table = pd.DataFrame({"slide_id": ["s0", "s1"], "label_name": ["a", "b"], "path": paths})
    cohort = type("C", (), {"table": table})()
    assert input_fingerprint(cohort, TrainConfig())["encoder_weights_sha256"] == ["c" * 64]
    assert feature_spec(cohort)["encoder_weights_sha256"] == "c" * 64


def _run_with_weights(tmp_path, weights, sha=None):
    from wsi_mil.formats.run import RunFolder

    run = RunFolder(tmp_path / "run")
    spec = {"encoder": "resnet18", "encoder_weights": str(weights), "target_mpp": 4.0, "patch_size": 64,
            "encoder_dim": 512, **({"encoder_weights_sha256": sha} if sha else {})}  # fmt: skip
    run.write_config({"features": spec})
    return run


def test_heatmap_stops_when_the_runs_weights_file_is_missing_or_changed(tmp_path):
    from wsi_mil.pipeline.heatmap import extraction_stage
    from wsi_mil.pipeline.runner import process_slide
    from wsi_mil.wsi.collect import SlideEntry

    entry = SlideEntry(tmp_path / "s.tif")  # refused before the slide is opened
    stage = partial(extraction_stage, work=tmp_path / "work", cfg=PipelineConfig(), overlap=0.0, device="cpu")
    gone = tmp_path / "gone.pth"
    run = _run_with_weights(tmp_path, gone)
    outcome = process_slide(stage(run), entry, blocking=True)
    assert outcome.status == "failed"
    assert outcome.error == (
        f"{run.root}: the run's encoder weights {gone} are missing: restore the file, or pass --features "
        "with the slide's feature file"
    )
    with pytest.raises(WsiMilError, match="are missing"):  # never the hub's checkpoint instead
        stage(run).run(entry)
    # the file is back but is another checkpoint than the run's features came from
    gone.write_bytes(b"other weights")
    run = _run_with_weights(tmp_path, gone, sha="0" * 64)
    with pytest.raises(WsiMilError) as info:
        stage(run).run(entry)
    _one_line(info, "have changed", "sha256", "restore the file, or pass --features")
    # the run's own file: extraction goes ahead with it
    run = _run_with_weights(tmp_path, gone, sha=file_sha256(gone))
    assert stage(run).cfg.extract.weights == str(gone)
    # features already in the work folder need no weights
    run = _run_with_weights(tmp_path, tmp_path / "gone-again.pth")
    s = stage(run)
    s.output(entry).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(s.output(entry), "w"):
        pass
    assert process_slide(s, entry, blocking=True).status == "skipped"
