"""Each patch encoder against a reference built independently of wsi-mil's spec table: timm with
the kwargs copied literally from TRIDENT's `trident/patch_encoder_models/load.py` (line numbers
below), or the authors' transformers class with its model card's config. Random weights in the
authors' key layout are saved to a file, loaded into the reference as the authors load them and
into the encoder through the one strict path (`create_encoder(weights=...)`), and the embeddings
compared. Depth is reduced in both. Once per family, a changed architecture setting in the
reference is shown to be caught (refused by the strict load, or a different embedding)."""

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import ensure_torchvision_importable, import_timm
from wsi_mil.features.encoders import create_encoder

timm = import_timm()
SwiGLUPacked = timm.layers.SwiGLUPacked

# name -> (timm architecture, TRIDENT's kwargs verbatim, embedding as TRIDENT's forward takes it)
TRIDENT_TIMM = {
    "uni_v1": ("vit_large_patch16_224", {  # L803-809
        "img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True,
    }, "out"),
    "uni_v2": ("vit_giant_patch14_224", {  # L856-870
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
        "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "reg_tokens": 8, "dynamic_img_size": True,
    }, "out"),
    "virchow": ("vit_huge_patch14_224", {  # L996-1005, forward L1037-1046
        "img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
        "dynamic_img_size": True, "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU,
    }, "cls+mean1"),
    "virchow2": ("vit_huge_patch14_224", {  # L1071-1081, forward L1113-1122
        "img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
        "global_pool": "", "dynamic_img_size": True, "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU,
    }, "cls+mean5"),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", {  # L1145-1151
        "num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5,
        "dynamic_img_size": True,
    }, "out"),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", {  # L1205-1211
        "num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5,
        "dynamic_img_size": True,
    }, "out"),
    "gigapath": ("vit_giant_patch14_dinov2", {  # L924-935
        "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
        "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True,
    }, "out"),
    # Kaiko L567-573 with HF_HUB_ID / IMG_SIZE of L605-659
    "kaiko-vits16": ("vit_small_patch16_224",
                     {"num_classes": 0, "img_size": 224, "dynamic_img_size": True}, "out"),
    "kaiko-vits8": ("vit_small_patch8_224",
                    {"num_classes": 0, "img_size": 224, "dynamic_img_size": True}, "out"),
    "kaiko-vitb16": ("vit_base_patch16_224",
                     {"num_classes": 0, "img_size": 224, "dynamic_img_size": True}, "out"),
    "kaiko-vitb8": ("vit_base_patch8_224",
                    {"num_classes": 0, "img_size": 224, "dynamic_img_size": True}, "out"),
    "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2",
                     {"num_classes": 0, "img_size": 518, "dynamic_img_size": True}, "out"),
    # Lunit L758-759 (the hub config's num_classes 0)
    "lunit-vits8": ("vit_small_patch8_224",
                    {"img_size": 224, "dynamic_img_size": True, "num_classes": 0}, "out"),
    "gpfm": ("vit_large_patch14_dinov2.lvd142m", {  # L1550-1556
        "pretrained": False, "img_size": 224, "init_values": 1e-5, "dynamic_img_size": True,
    }, "out"),
}  # fmt: skip


def _embed(ref: nn.Module, x: torch.Tensor, rule: str) -> torch.Tensor:
    out = ref(x)
    if rule == "out":
        return out
    prefix = int(rule[len("cls+mean") :])
    return torch.cat([out[:, 0], out[:, prefix:].mean(1)], dim=-1)


def _randomise(module: nn.Module, scale: float = 0.05) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _timm_reference(name: str, depth: int = 1, **changed) -> tuple[nn.Module, str]:
    """TRIDENT's timm build, depth-reduced, with random weights (drawn directly: timm's own init of
    a ViT-g block costs seconds)."""
    arch, kwargs, rule = TRIDENT_TIMM[name]
    return _random_timm(arch, **{"pretrained": False, **kwargs, "depth": depth, **changed}), rule


def _random_timm(arch: str, **kwargs) -> nn.Module:
    """`timm.create_model(arch, **kwargs)` with random weights drawn directly."""
    with torch.device("meta"):
        ref = timm.create_model(arch, **kwargs)
    ref = ref.to_empty(device="cpu").eval()
    for m in ref.modules():  # Swin's relative position index and attention masks
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            base = 1.0 if re.search(r"norm\d?\.weight$", pname) else 0.0
            p.copy_(base + 0.05 * torch.randn_like(p))
        for bname, b in ref.named_buffers():
            if bname.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif bname.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return ref


def _input(enc, batch: int = 1) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, 3, enc.info.input_size, enc.info.input_size)


@pytest.mark.parametrize("name", sorted(TRIDENT_TIMM))
def test_timm_encoder_equals_tridents_timm_build(name, tmp_path):
    ref, rule = _timm_reference(name)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # the hub file: timm's own keys
    enc = create_encoder(name, weights=tmp_path / "pytorch_model.bin", depth=1)
    x = _input(enc)
    if enc.info.dim > 1024:  # ViT-H/g blocks: a 112 px input (both interpolate positions alike) saves seconds
        x = x[..., :112, :112]
    c = enc.info.crop_size if enc.info.crop_size and enc.info.crop_size < x.shape[-1] else x.shape[-1]
    o = (x.shape[-1] - c) // 2
    with torch.no_grad():
        want = _embed(ref, x[..., o : o + c, o : o + c], rule)  # the authors' CenterCrop
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, changed",
    [
        ("kaiko-vitl14", {"no_embed_class": False}),
        ("virchow2", {"reg_tokens": 0}),
        ("uni_v1", {"init_values": 0.0}),
    ],
)
def test_timm_family_a_changed_shape_setting_is_refused(name, changed, tmp_path):
    # (init_values 0, not None: timm.create_model drops None kwargs; 0 builds no LayerScale)
    ref, _ = _timm_reference(name, **changed)
    torch.save(ref.state_dict(), tmp_path / "changed.bin")
    with pytest.raises(WsiMilError, match=f"not {name}'s|weights do not fit encoder {name}"):
        create_encoder(name, weights=tmp_path / "changed.bin", depth=1)


def test_timm_family_a_changed_activation_changes_the_embedding(tmp_path):
    ref, rule = _timm_reference("virchow", act_layer=torch.nn.GELU)  # Virchow's is SiLU
    torch.save(ref.state_dict(), tmp_path / "gelu.bin")
    enc = create_encoder("virchow", weights=tmp_path / "gelu.bin", depth=1)
    x = _input(enc)
    with torch.no_grad():
        assert not torch.allclose(enc(x), _embed(ref, x, rule), atol=1e-3)


# -- H0-mini: plism-benchmark's build (owkin/plism-benchmark 4736df4, plismbench/models) --------


class _PlismSwiGLUFFNFused(nn.Module):
    """utils.py `SwiGLUFFNFused`: xformers' packed SwiGLU (`w12` = [w1; w2], `w3`), hidden size by
    DINOv2's rule (2/3 of the timm hidden size, rounded up to 8). `**_`: the arguments today's
    timm also passes (norm_layer, device, dtype), unused as in their timm."""

    gate = staticmethod(F.silu)

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, drop=0.0,
                 bias=True, **_):  # fmt: skip
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.gate(x1) * x2)


H0_MINI_PLISM = {  # bioptimus.py `H0Mini`, local-weights branch, verbatim; its forward returns the CLS
    "model_name": "vit_base_patch14_reg4_dinov2", "img_size": 224, "patch_size": 14, "init_values": 1e-5,
    "num_classes": 0, "dynamic_img_size": False, "mlp_ratio": 4, "mlp_layer": _PlismSwiGLUFFNFused,
    "act_layer": torch.nn.SiLU,
}  # fmt: skip


def _h0_mini_reference(tmp_path, **changed) -> tuple[nn.Module, object]:
    kw = {**H0_MINI_PLISM, "depth": 1, **changed}
    ref = _random_timm(kw.pop("model_name"), **kw)
    torch.save(ref.state_dict(), tmp_path / "h0_mini.pth")  # their file's keys: mlp.w12, mlp.w3
    return ref, tmp_path / "h0_mini.pth"


def test_h0_mini_equals_plism_benchmarks_build(tmp_path):
    ref, path = _h0_mini_reference(tmp_path)
    enc = create_encoder("h0-mini", weights=path, depth=1)
    assert (enc.info.dim, enc.info.input_size) == (768, 224)
    assert enc.info.mean == (0.707223, 0.578729, 0.703617)  # their transform's Normalize
    assert enc.info.std == (0.211883, 0.230117, 0.177517)
    x = _input(enc)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)
        # the hub's timm layout (SwiGLUPacked's fc1, fc2 names) loads to the same network
        sd = ref.state_dict()
        timm_keys = {k.replace(".w12.", ".fc1.").replace(".w3.", ".fc2."): v for k, v in sd.items()}
        torch.save(timm_keys, tmp_path / "m.bin")
        torch.testing.assert_close(create_encoder("h0-mini", weights=tmp_path / "m.bin", depth=1)(x), want)


class _GeluGated(_PlismSwiGLUFFNFused):
    gate = staticmethod(F.gelu)


def test_h0_mini_changed_settings_are_caught(tmp_path):
    ref, path = _h0_mini_reference(tmp_path, mlp_layer=_GeluGated)
    enc = create_encoder("h0-mini", weights=path, depth=1)
    x = _input(enc)
    with torch.no_grad():
        assert not torch.allclose(enc(x), ref(x), atol=1e-3)
    for changed in ({"mlp_ratio": 5.33334}, {"init_values": 0.0}, {"model_name": "vit_base_patch14_dinov2"}):
        _, path = _h0_mini_reference(tmp_path, **changed)
        with pytest.raises(WsiMilError, match="weights do not fit encoder h0-mini|not h0-mini's"):
            create_encoder("h0-mini", weights=path, depth=1)


# -- transformers: Phikon (ViTModel) ------------------------------------------------------------

PHIKON_CONFIG = {  # owkin/phikon config.json
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "qkv_bias": True,
}  # fmt: skip


def _phikon_reference(tmp_path, **changed):
    ensure_torchvision_importable()
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**{**PHIKON_CONFIG, "num_hidden_layers": 2, **changed})
    torch.manual_seed(0)
    ref = transformers.ViTModel(config, add_pooling_layer=False).eval()  # TRIDENT L480
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    return ref


def test_phikon_equals_transformers_vitmodel(tmp_path):
    ref = _phikon_reference(tmp_path)
    enc = create_encoder("phikon", weights=tmp_path / "model.safetensors", depth=2)
    x = _input(enc)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 0]  # TRIDENT L490-493
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


def test_phikon_family_changed_settings_are_caught(tmp_path):
    _phikon_reference(tmp_path / "nobias", qkv_bias=False)
    with pytest.raises(WsiMilError, match="weights do not fit encoder phikon: tensors .*missing.*qkv.bias"):
        create_encoder("phikon", weights=tmp_path / "nobias" / "model.safetensors", depth=2)
    ref = _phikon_reference(tmp_path / "tanh", hidden_act="gelu_new")
    enc = create_encoder("phikon", weights=tmp_path / "tanh" / "model.safetensors", depth=2)
    x = _input(enc)
    with torch.no_grad():
        assert not torch.allclose(enc(x), ref(pixel_values=x).last_hidden_state[:, 0], atol=1e-4)


# -- transformers: Hibou-L (DINOv2 with registers) ----------------------------------------------

HIBOU_CONFIG = {  # histai/hibou-b config.json (Dinov2ModelWithRegisters) at ViT-L width, depth, heads
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
    "use_swiglu_ffn": True, "num_register_tokens": 4, "patch_size": 14, "image_size": 224,
    "layer_norm_eps": 1e-6, "qkv_bias": True,
}  # fmt: skip


def _transformers_reference(tmp_path, model: str, config: dict, **changed):
    """transformers' `model` (one block) with `config`, random weights saved in the hub layout
    (attention.attention.query, mlp.weights_in ...)."""
    ensure_torchvision_importable()
    transformers = pytest.importorskip("transformers")
    config_class = getattr(transformers, model.replace("Model", "Config"))
    cfg = config_class(**{**config, "num_hidden_layers": 1, **changed})
    torch.manual_seed(0)
    ref = getattr(transformers, model)(cfg).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    return ref


def _hibou_reference(tmp_path, **changed):
    return _transformers_reference(tmp_path, "Dinov2WithRegistersModel", HIBOU_CONFIG, **changed)


@pytest.mark.parametrize("image_size", [224, 518])  # a file grid other than 16: resized on loading
def test_hibou_l_equals_transformers_dinov2_with_registers(tmp_path, image_size):
    ref = _hibou_reference(tmp_path, image_size=image_size)
    enc = create_encoder("hibou_l", weights=tmp_path / "model.safetensors", depth=1)
    x = _input(enc, 2)
    with torch.no_grad():
        want = ref(pixel_values=x).pooler_output  # TRIDENT L531-534
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


def test_hibou_family_changed_settings_are_caught(tmp_path):
    _hibou_reference(tmp_path / "gelu_mlp", use_swiglu_ffn=False)
    fit = "weights do not fit encoder hibou_l"
    with pytest.raises(WsiMilError, match=f"{fit}: tensors 3 of another shape.*mlp.fc1"):
        create_encoder("hibou_l", weights=tmp_path / "gelu_mlp" / "model.safetensors", depth=1)
    _hibou_reference(tmp_path / "reg8", num_register_tokens=8)
    with pytest.raises(WsiMilError, match=f"{fit}: .*reg_token"):
        create_encoder("hibou_l", weights=tmp_path / "reg8" / "model.safetensors", depth=1)
    ref = _hibou_reference(tmp_path / "eps", layer_norm_eps=1e-12)  # same tensors, another norm
    enc = create_encoder("hibou_l", weights=tmp_path / "eps" / "model.safetensors", depth=1)
    x = _input(enc)
    with torch.no_grad():
        ref_out = ref(pixel_values=x * 0 + 0.5).pooler_output  # a flat image: tokens of tiny variance
        assert not torch.allclose(enc(x * 0 + 0.5), ref_out, atol=1e-4)
    _hibou_reference(tmp_path / "ok")  # Phikon-v2 is a transformers Dinov2 too: named, not loaded
    named = "have hibou_l's key layout.*not phikon_v2's: pass --encoder hibou_l"
    with pytest.raises(WsiMilError, match=named):
        create_encoder("phikon_v2", weights=tmp_path / "ok" / "model.safetensors", depth=1)


# -- Midnight-12k: transformers Dinov2Model, DINOv2's ViT-g/14 ----------------------------------

MIDNIGHT_CONFIG = {  # facebook/dinov2-giant config.json: the dinov2_vitg14 the authors build (Midnight eval)
    "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "mlp_ratio": 4,
    "use_swiglu_ffn": True, "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "patch_size": 14,
    "image_size": 518, "qkv_bias": True,
}  # fmt: skip


def _midnight_reference(tmp_path, **changed):
    return _transformers_reference(tmp_path, "Dinov2Model", MIDNIGHT_CONFIG, **changed)


@pytest.mark.parametrize("image_size", [224, 518])  # the hub's grid is not known: both load
def test_midnight12k_equals_transformers_dinov2_giant(tmp_path, image_size):
    ref = _midnight_reference(tmp_path, image_size=image_size)
    enc = create_encoder("midnight12k", weights=tmp_path / "model.safetensors", depth=1)
    assert (enc.info.dim, enc.info.mean, enc.info.std) == (3072, (0.5,) * 3, (0.5,) * 3)
    x = _input(enc, 2)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state  # Kaiko's extract_classification_embedding:
        want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)  # CLS ++ mean of the patches
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)


def test_midnight12k_changed_settings_are_caught(tmp_path):
    _midnight_reference(tmp_path / "gelu", use_swiglu_ffn=False)
    with pytest.raises(WsiMilError, match="weights do not fit encoder midnight12k|not midnight12k's"):
        create_encoder("midnight12k", weights=tmp_path / "gelu" / "model.safetensors", depth=1)
    ref = _midnight_reference(tmp_path / "heads", num_attention_heads=16)  # same tensors
    enc = create_encoder("midnight12k", weights=tmp_path / "heads" / "model.safetensors", depth=1)
    x = _input(enc)
    with torch.no_grad():
        assert not torch.allclose(enc(x)[:, :1536], ref(pixel_values=x).last_hidden_state[:, 0], atol=1e-3)


# -- KEEP: the hub's KEEPModel (MAGIC-AI4Med/KEEP a346a70 quick_start/keep_inference.py) ---------


class KEEPModel(nn.Module):
    """KEEPModel restated (its image encoder and head; a small BERT stands in for the text tower,
    whose tensors the image embedding does not use)."""

    def __init__(self, depth=1, head_act=nn.GELU, projection_dim=768):
        super().__init__()
        ensure_torchvision_importable()
        transformers = pytest.importorskip("transformers")
        self.visual = _random_timm(
            "vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16, init_values=1e-5,
            num_classes=0, dynamic_img_size=True, depth=depth,
        )  # fmt: skip
        width, dim = self.visual.num_features, projection_dim
        self.visual_head = nn.Sequential(nn.Linear(width, dim), head_act(), nn.Linear(dim, dim))
        bert = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
        self.text = transformers.BertModel(bert)
        self.logit_scale = nn.Parameter(torch.ones([]))
        _randomise(self.visual_head)

    def encode_image(self, image_inputs):
        return F.normalize(self.visual_head(self.visual(image_inputs)), dim=-1)


def test_keep_equals_the_authors_keepmodel(tmp_path):
    ref = KEEPModel().eval()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # the whole model, as the hub's
    enc = create_encoder("keep", weights=tmp_path / "pytorch_model.bin", depth=1)
    assert (enc.info.dim, enc.info.patch_px, enc.info.interpolation) == (768, 256, "bicubic")
    x = _input(enc, 2)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)
    # another head activation: the same tensors, another embedding
    ref = KEEPModel(head_act=nn.ReLU).eval()
    torch.save(ref.state_dict(), tmp_path / "relu.bin")
    enc = create_encoder("keep", weights=tmp_path / "relu.bin", depth=1)
    with torch.no_grad():
        assert not torch.allclose(enc(x), ref.encode_image(x), atol=1e-4)
    # another projection width: refused by the strict load; the UNI trunk alone is named as UNI's
    torch.save(KEEPModel(projection_dim=512).state_dict(), tmp_path / "p512.bin")
    with pytest.raises(WsiMilError, match=r"not fit encoder keep: tensors .*of another shape.*visual_head"):
        create_encoder("keep", weights=tmp_path / "p512.bin", depth=1)
    torch.save(ref.visual.state_dict(), tmp_path / "uni.bin")
    with pytest.raises(WsiMilError, match=r"uni_v1's key layout.*not keep's"):
        create_encoder("keep", weights=tmp_path / "uni.bin", depth=1)


# -- OpenMidnight: DINOv2's own layout (dinov2_vitg14_reg) ---------------------------------------


def _dinov2_layout(timm_sd: dict, grid: int) -> dict:
    """A random checkpoint in DINOv2's key layout (what `teacher_checkpoint_load.pt` holds)."""
    torch.manual_seed(3)
    sd = {re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", k)): v
          for k, v in timm_sd.items() if k not in ("reg_token", "pos_embed", "cls_token")}  # fmt: skip
    dim = timm_sd["cls_token"].shape[-1]
    sd["cls_token"], sd["register_tokens"] = torch.randn(1, 1, dim) * 0.1, torch.randn(1, 4, dim) * 0.1
    sd["pos_embed"], sd["mask_token"] = torch.randn(1, 1 + grid * grid, dim) * 0.1, torch.zeros(1, dim)
    return sd


def test_openmidnight_equals_timms_dinov2_conversion(tmp_path):
    grid = 37  # a checkpoint grid (DINOv2's 518 px) other than the input's 16: resized as DINOv2 does
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = _random_timm("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=224, depth=1)
    sd = _dinov2_layout(ref.state_dict(), grid)
    torch.save(sd, tmp_path / "teacher_checkpoint_load.pt")
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref), strict=True)  # timm's own DINOv2 conversion
    enc = create_encoder("openmidnight", weights=tmp_path / "teacher_checkpoint_load.pt", depth=1)
    x = _input(enc)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), atol=1e-5, rtol=1e-5)  # CLS after the norm
    sd.pop("register_tokens")  # a DINOv2 checkpoint without registers is not OpenMidnight's
    torch.save(sd, tmp_path / "noreg.pt")
    with pytest.raises(WsiMilError, match="not in openmidnight's key layout.*register_tokens"):
        create_encoder("openmidnight", weights=tmp_path / "noreg.pt", depth=1)


# -- CTransPath: timm's Swin-T with TransPath's ConvStem, checkpoint in timm 0.5.4's layout ------


class TransPathConvStem(nn.Module):
    """TRIDENT model_zoo/ctranspath/ctran.py `ConvStem` (L33-71), copied; NHWC out and the extra
    keyword arguments current timm's Swin passes are the only changes."""

    def __init__(
        self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, flatten=True, **kw
    ):
        super().__init__()
        assert patch_size == 4
        assert embed_dim % 8 == 0
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem = []
        input_dim, output_dim = 3, embed_dim // 8
        for _ in range(2):
            stem.append(nn.Conv2d(input_dim, output_dim, kernel_size=3, stride=2, padding=1, bias=False))
            stem.append(nn.BatchNorm2d(output_dim))
            stem.append(nn.ReLU(inplace=True))
            input_dim = output_dim
            output_dim *= 2
        stem.append(nn.Conv2d(input_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _ctranspath_reference(**changed):
    # ctran.py L74-78: swin_tiny_patch4_window7_224, embed_layer=ConvStem, img_size=224; head Identity
    kw = {"embed_layer": TransPathConvStem, "pretrained": False, "img_size": 224, "num_classes": 0}
    return _random_timm("swin_tiny_patch4_window7_224", **{**kw, "depths": (2, 1, 1, 1), **changed})


def _timm054_layout(sd: dict) -> dict:
    """The state dict as timm 0.5.4 saved it: patch merging at the end of the previous stage, and
    the persistent `relative_position_index` buffers (TRIDENT drops only `attn_mask`, L439)."""
    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
           for k, v in sd.items()}  # fmt: skip
    for k in [k for k in out if k.endswith("relative_position_bias_table")]:
        out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49).long()
    return out


def test_ctranspath_equals_timm_swin_with_the_convstem(tmp_path):
    from timm.models.swin_transformer import checkpoint_filter_fn

    ref = _ctranspath_reference()
    sd = _timm054_layout(ref.state_dict())
    assert "layers.0.downsample.reduction.weight" in sd
    torch.save({"model": sd}, tmp_path / "CHIEF_CTransPath.pth")  # TRIDENT L432: ['model']
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref), strict=True)  # timm's own conversion
    enc = create_encoder("ctranspath", weights=tmp_path / "CHIEF_CTransPath.pth", depths=(2, 1, 1, 1))
    assert (enc.info.mpp, enc.info.patch_px, enc.info.dim) == (1.0, 256, 768)
    x = _input(enc)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), atol=1e-5, rtol=1e-5)


def test_ctranspath_without_the_convstem_is_refused(tmp_path):
    from timm.layers import PatchEmbed

    ref = _ctranspath_reference(embed_layer=PatchEmbed)  # timm's linear patch embedding
    torch.save({"model": _timm054_layout(ref.state_dict())}, tmp_path / "plain.pth")
    with pytest.raises(WsiMilError, match="weights do not fit encoder ctranspath: tensors .*patch_embed"):
        create_encoder("ctranspath", weights=tmp_path / "plain.pth", depths=(2, 1, 1, 1))


# -- TRIDENT's resnet50: timm features_only up to layer3, average pooled -------------------------


def _resnet50_reference(file, device="cpu", **changed):
    timm_kwargs = {"features_only": True, "out_indices": [3], "num_classes": 0}  # L680
    with torch.device("meta"):  # (timm's own init is overwritten by the load below)
        ref = timm.create_model("resnet50", pretrained=False, **{**timm_kwargs, **changed}).eval()
    ref = ref.to_empty(device=device)
    if device == "cpu":
        ref.load_state_dict(torch.load(file), strict=False)  # L698
    return lambda x: nn.AdaptiveAvgPool2d(1)(ref(x)[0]).squeeze(-1).squeeze(-1)  # L725-736


def test_resnet50_equals_tridents_timm_features_build(tmp_path):
    full = _random_timm("resnet50", pretrained=False)  # resnet50.tv_in1k's file: the whole network
    torch.save(full.state_dict(), tmp_path / "pytorch_model.bin")
    enc = create_encoder("resnet50", weights=tmp_path / "pytorch_model.bin")
    assert (enc.info.input_size, enc.info.patch_px, enc.info.dim) == (224, 256, 1024)
    x = torch.randn(1, 3, 64, 64)  # a convolutional network: any size shows the same computation
    with torch.no_grad():
        torch.testing.assert_close(
            enc(x), _resnet50_reference(tmp_path / "pytorch_model.bin")(x), atol=1e-5, rtol=1e-5
        )
    with torch.no_grad(), torch.device("meta"):  # the untruncated network, shapes only
        layer4 = _resnet50_reference(None, device="meta", out_indices=[4])(x.to("meta"))
    assert layer4.shape == (1, 2048) != enc(x).shape  # it is not TRIDENT's resnet50
