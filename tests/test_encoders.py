"""Pathology foundation models as their authors publish them: architecture, embedding size,
strict weight loading in the authors' key layout (from a file or the hub), the authors' resize
filters, and clear errors for gated weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import ensure_torchvision_importable, import_timm, import_torchvision
from wsi_mil.features.encoders import create_encoder, encoder_table
from wsi_mil.features.foundation import FOUNDATION_MODELS, build_vit
from wsi_mil.features.reading import resize_patch, resize_patch_pil
from wsi_mil.wsi.readers import open_slide

# embedding size and parameter count (millions) on each model's card
PUBLISHED = {
    "uni_v1": (1024, 303),
    "uni_v2": (1536, 681),
    "virchow": (2560, 632),
    "virchow2": (2560, 632),
    "hoptimus0": (1536, 1134),
    "hoptimus1": (1536, 1134),
    "gigapath": (1536, 1134),
    "phikon_v2": (1024, 303),
}
# the embedding size in TRIDENT README's patch encoder table (for the encoders added from it)
TRIDENT_DIM = {
    "ctranspath": 768, "phikon": 768, "kaiko-vits16": 384, "kaiko-vits8": 384, "kaiko-vitb16": 768,
    "kaiko-vitb8": 768, "kaiko-vitl14": 1024, "lunit-vits8": 384, "gpfm": 1024, "openmidnight": 1536,
    "resnet50": 1024, "hibou_l": 1024, "musk": 1024, "genbio-pathfm": 4608, "keep": 768, "midnight12k": 3072,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_architecture_has_the_published_size(name):
    with torch.device("meta"):  # no memory: shapes only
        net = build_vit(FOUNDATION_MODELS[name])
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(millions - PUBLISHED[name][1]) / PUBLISHED[name][1] < 0.01, millions


@pytest.mark.parametrize("name", sorted({**PUBLISHED, "conch_v15": (768, None)}))
def test_depth_reduced_model_embeds_to_the_published_dim(name):
    enc = create_encoder(name, random_weights=True, depth=1)
    size = enc.info.input_size
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, size, size))
    assert feats.shape == (2, {**PUBLISHED, "conch_v15": (768,)}[name][0]) == (2, enc.info.dim)


@pytest.mark.parametrize("name", sorted(TRIDENT_DIM))
def test_added_encoders_embed_to_tridents_dim(name):
    spec = FOUNDATION_MODELS[name]
    assert spec.dim == TRIDENT_DIM[name]
    import_timm()
    with torch.device("meta"):  # shapes only
        net = build_vit(spec, depth=1)
        feats = net(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert feats.shape == (2, spec.dim)


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
    from huggingface_hub.errors import GatedRepoError

    def refused(repo, filename, **kw):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, f"Cannot access gated repo for url https://huggingface.co/{repo}/{filename}")
        raise err

    monkeypatch.setattr("huggingface_hub.hf_hub_download", refused)
    with pytest.raises(WsiMilError, match="gated; request access.*HF_TOKEN.*--weights") as info:
        create_encoder("uni_v1", depth=1)
    assert "\n" not in str(info.value)


def _hub_cache(root, repo: str, filename: str, sd: dict) -> None:
    """`sd` saved as `filename` of `repo` in a Hugging Face hub cache laid out as the hub writes it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    torch.save(sd, folder / "snapshots" / commit / filename)


def test_hub_checkpoint_goes_through_the_same_strict_load(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the cache only: no network in tests
    with pytest.raises(WsiMilError, match="encoder uni_v1: pretrained weights unavailable.*--weights"):
        create_encoder("uni_v1", depth=1)  # nothing cached
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in create_encoder("uni_v1", random_weights=True, depth=1)
          .net.state_dict().items()}  # fmt: skip
    _hub_cache(tmp_path, "MahmoodLab/UNI", "pytorch_model.bin", sd)  # UNI's file name on the hub
    torch.save(sd, tmp_path / "local.bin")
    hub_enc = create_encoder("uni_v1", depth=1)
    assert hub_enc.info.weights == "hub:MahmoodLab/UNI"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            hub_enc(x), create_encoder("uni_v1", weights=tmp_path / "local.bin", depth=1)(x)
        )
    sd.pop("blocks.0.ls1.gamma")
    _hub_cache(tmp_path, "MahmoodLab/UNI", "pytorch_model.bin", sd)
    with pytest.raises(
        WsiMilError, match="pytorch_model.bin: weights do not fit encoder uni_v1: tensors 1 missing"
    ):
        create_encoder("uni_v1", depth=1)


@pytest.mark.parametrize("image_size", [224, 448])
def test_phikon_v2_equals_transformers_dinov2_on_its_own_checkpoint(tmp_path, image_size):
    ensure_torchvision_importable()  # transformers imports torchvision
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, patch_size=16, image_size=image_size
    )
    ref = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)  # the published layout: attention.attention.query, layer_scale1.lambda1 ...
    enc = create_encoder("phikon_v2", weights=tmp_path / "model.safetensors", depth=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 0]  # TRIDENT's Phikonv2InferenceEncoder
        torch.testing.assert_close(enc(x), want, atol=2e-4, rtol=2e-4)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("encoder.layer.0.attention.attention.key.bias")
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(
        WsiMilError, match="weights do not fit encoder phikon_v2: tensors 1 missing.*qkv.bias"
    ):
        create_encoder("phikon_v2", weights=tmp_path / "broken.safetensors", depth=1)


def _conch_as_trident_computes_it(sd: dict, trunk, x: torch.Tensor) -> torch.Tensor:
    """CONCH v1.5 restated from TRIDENT's conchv1_5.py with the checkpoint's 14x14 position grid:
    DINO's per-forward `interpolate_pos_encoding`, then the attentional pooler written out."""
    tokens = F.conv2d(x, sd["trunk.patch_embed.proj.weight"], sd["trunk.patch_embed.proj.bias"], stride=16)
    tokens = torch.cat([sd["trunk.cls_token"].expand(len(x), -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
    pos, dim = sd["trunk.pos_embed"], tokens.shape[-1]
    w0 = x.shape[-1] // 16 + 0.1
    grid = pos[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(grid, scale_factor=(w0 / 14, w0 / 14), mode="bicubic")
    tokens = tokens + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    tokens = trunk.norm(trunk.blocks(tokens))
    p = "attn_pool_contrast."

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[p + name + ".weight"], sd[p + name + ".bias"])

    k, v = F.linear(ln(tokens, "ln_k"), sd[p + "to_kv.weight"]).chunk(2, -1)
    q = F.linear(ln(sd[p + "query"], "ln_q"), sd[p + "to_q.weight"])  # one query
    q, k, v = q.reshape(8, 96), k.reshape(len(x), -1, 8, 96), v.reshape(len(x), -1, 8, 96)
    sim = torch.einsum("hd,bnhd->bhn", q * 96**-0.5, k)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = F.linear(torch.einsum("bhn,bnhd->bhd", attn, v).reshape(len(x), 768), sd[p + "to_out.weight"])
    return F.layer_norm(out, (768,), sd["ln_contrast.weight"], sd["ln_contrast.bias"])  # fmt: skip


def test_conch_v15_equals_trident_restatement_on_an_authors_checkpoint(tmp_path):
    enc = create_encoder("conch_v15", random_weights=True, depth=1)
    assert (enc.info.input_size, enc.info.patch_px, enc.info.dim) == (448, 512, 768)
    torch.manual_seed(1)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in enc.net.state_dict().items()}
    sd["trunk.pos_embed"] = torch.randn(1, 1 + 14 * 14, 1024) * 0.1  # the checkpoint's 224 px grid
    torch.save(sd, tmp_path / "pytorch_model_vision.bin")
    loaded = create_encoder("conch_v15", weights=tmp_path / "pytorch_model_vision.bin", depth=1)
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        want = _conch_as_trident_computes_it(sd, loaded.net.trunk, x)
        torch.testing.assert_close(loaded(x), want, atol=2e-4, rtol=2e-4)
    sd.pop("attn_pool_contrast.query")
    torch.save(sd, tmp_path / "missing.bin")
    with pytest.raises(WsiMilError, match="encoder conch_v15: tensors 1 missing.*attn_pool_contrast.query"):
        create_encoder("conch_v15", weights=tmp_path / "missing.bin", depth=1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("side", [512, 256, 180])
def test_resize_is_within_two_levels_of_torchvisions_resize_on_pil_images(
    interpolation, side, synthetic_slide
):
    tv = import_torchvision()
    mode = getattr(tv.transforms.InterpolationMode, interpolation.upper())
    with open_slide(synthetic_slide.path) as slide:  # tissue texture: resizers differ on edges
        img = slide.read_region((2000, 1500), 0, (side, side))
    on_pil = np.asarray(tv.transforms.Resize(224, interpolation=mode)(Image.fromarray(img)))
    np.testing.assert_array_equal(resize_patch_pil(img, 224, interpolation), on_pil)  # reader processes
    ours = resize_patch(img, 224, interpolation)  # torch's kernel, the default
    diff = np.abs(ours.astype(int) - on_pil)
    assert ours.shape == on_pil.shape and diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_encoder_table_lists_every_registered_name():
    names = {r["name"] for r in encoder_table()}
    assert names == {"resnet50_trunc", "resnet18", *FOUNDATION_MODELS}
    assert {"conch_v15", "phikon_v2"} <= names
    # TRIDENT README's --patch_size and --mag per encoder (CTransPath at 10x, the others at 20x)
    assert {r["name"]: r["mpp"] for r in encoder_table() if r["mpp"] != 0.5} == {"ctranspath": 1.0}
    px = {r["name"]: r["patch_px"] for r in encoder_table()}
    assert (px["uni_v1"], px["conch_v15"], px["virchow2"], px["gigapath"]) == (256, 512, 224, 256)
    assert (px["ctranspath"], px["kaiko-vitb8"], px["lunit-vits8"]) == (256, 256, 224)


def test_a_trident_encoder_not_built_here_says_why():
    """TRIDENT's names that wsi-mil does not build are refused with the reason, not as unknown
    typos; `wsi-mil encoders` lists them too."""
    from wsi_mil.features.foundation_specs import NOT_REGISTERED

    assert not set(NOT_REGISTERED) & set(FOUNDATION_MODELS)
    with pytest.raises(WsiMilError, match=r"unknown encoder 'gemma4-e4b' \(the vision tower of a multimodal"):
        create_encoder("gemma4-e4b", random_weights=True)
