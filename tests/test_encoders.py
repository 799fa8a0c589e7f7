"""Pathology foundation models as their authors publish them: architecture, embedding size,
strict weight loading in the authors' key layout, and clear errors for gated weights."""

import pytest
import torch

from wsi_mil.errors import WsiMilError
from wsi_mil.features import foundation
from wsi_mil.features.encoders import create_encoder, encoder_table
from wsi_mil.features.foundation import FOUNDATION_MODELS, build_vit

# embedding size and parameter count (millions) on each model's card
PUBLISHED = {
    "uni_v1": (1024, 303),
    "uni_v2": (1536, 681),
    "virchow": (2560, 632),
    "virchow2": (2560, 632),
    "hoptimus0": (1536, 1134),
    "hoptimus1": (1536, 1134),
    "gigapath": (1536, 1134),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_architecture_has_the_published_size(name):
    with torch.device("meta"):  # no memory: shapes only
        net = build_vit(FOUNDATION_MODELS[name], pretrained=False)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(millions - PUBLISHED[name][1]) / PUBLISHED[name][1] < 0.01, millions


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_depth_reduced_model_embeds_to_the_published_dim(name, tmp_path):
    enc = create_encoder(name, random_weights=True, depth=1)
    size = enc.info.input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = enc(x)
    assert feats.shape == (2, PUBLISHED[name][0]) == (2, enc.info.dim)
    # the authors' key layout (the timm ViT's own state dict, as in pytorch_model.bin) loads strictly
    vit = enc.net.net if isinstance(enc.net, foundation.TokenPool) else enc.net
    sd = vit.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    again = create_encoder(name, weights=tmp_path / "pytorch_model.bin", depth=1)
    with torch.no_grad():
        torch.testing.assert_close(again(x), feats)
    missing = dict(sd)
    missing.pop(next(k for k in sd if k.endswith("ls1.gamma") or k.endswith("norm1.weight")))
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(WsiMilError, match=f"encoder {name}: tensors 1 missing"):
        create_encoder(name, weights=tmp_path / "missing.bin", depth=1)


def test_virchow_embedding_is_class_token_and_mean_of_patch_tokens_only():
    enc = create_encoder("virchow2", random_weights=True, depth=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.net.net(x)  # [1, 1 + 4 registers + 256 patches, 1280]
        feats = enc(x)
    assert tokens.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(feats[0, :1280], tokens[0, 0])
    torch.testing.assert_close(feats[0, 1280:], tokens[0, 5:].mean(0))


def test_gigapath_reads_256_and_sees_the_central_224():
    enc = create_encoder("gigapath", random_weights=True, depth=1)
    assert (enc.info.input_size, enc.info.crop_size, enc.info.patch_px) == (256, 224, 256)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.net(x[..., 16:240, 16:240]))


def test_gated_weights_without_access_is_one_line_naming_the_way_in(monkeypatch):
    def refused(spec, pretrained, **kw):
        raise OSError("401 Client Error: Unauthorized. Access to model MahmoodLab/UNI is restricted")

    monkeypatch.setattr("wsi_mil.features.encoders.build_vit", refused)
    with pytest.raises(WsiMilError, match="gated; request access.*HF_TOKEN.*--weights") as info:
        create_encoder("uni_v1")
    assert "\n" not in str(info.value)


def test_encoder_table_lists_every_registered_name():
    names = {r["name"] for r in encoder_table()}
    assert names == {"resnet50_trunc", "resnet18", *FOUNDATION_MODELS}
    assert all(r["mpp"] == 0.5 for r in encoder_table())
