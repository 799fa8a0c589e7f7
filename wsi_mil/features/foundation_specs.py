"""The pathology patch encoders' published settings, one `FoundationSpec` each, under TRIDENT's names.

Sources: TRIDENT (mahmoodlab/TRIDENT, `trident/patch_encoder_models/load.py` at commit a91fa84,
read 2026-11-22; `L<n>` below are its line numbers), its `model_zoo/` and `utils/constants.py`,
its README's `--patch_size`/`--mag` per encoder (the tiling default), and the model cards named
in docs/encoders.md. Architecture arguments are TRIDENT's literal `timm.create_model` kwargs
(for Kaiko and Lunit, the ones of its local-checkpoint branch, which names the timm
architecture the hub checkpoint was saved from).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus card
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CONCH constants.py
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TRIDENT utils/constants.py KAIKO_MEAN/STD
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm IMAGENET_INCEPTION_MEAN/STD (TRIDENT L330-332)
GENBIO = ((0.697, 0.575, 0.728), (0.188, 0.240, 0.187))  # TRIDENT utils/constants.py GENBIO_PATHFM_*
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))  # TRIDENT utils/constants.py HIBOU_MEAN/STD


@dataclass(frozen=True)
class FoundationSpec:
    name: str
    arch: str  # timm architecture the weights were saved from (or the authors' model name)
    kwargs: dict  # exact architecture arguments (TRIDENT load.py)
    dim: int
    embedding: str  # "cls", "cls+mean", "attn_pool", "avg" (mean of the final tokens/feature map)
    prefix_tokens: int  # class + register tokens before the patch tokens
    hub: str  # Hugging Face repository
    gated: bool
    mpp: float = 0.5  # trained at 20x
    patch_px: int = 224  # patch side read at `mpp` (TRIDENT README's `--patch_size` per encoder)
    input_size: int = 224  # network input
    resize_px: int | None = None  # resized to this before a center crop to input_size
    mean_std: tuple = IMAGENET
    interpolation: str = "bilinear"  # the authors' transform when resizing is needed
    source: str = ""
    act_layer: str | None = None  # "silu" with SwiGLU MLPs
    mlp_layer: str | None = None  # "swiglu_packed"
    # "timm", "conch_v15", "conch_v1", "dinov2_hf", "vit_hf", "dinov2_meta", "ctranspath", "musk",
    # "timm_features", "genbio", "keep" (features/foundation.py, foundation_arch.py, checkpoint_layouts.py,
    # rope_vit.py)
    builder: str = "timm"
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # tried in order
    hub_repo_type: str = "model"
    norm_eps: float | None = None  # LayerNorm eps when not timm's 1e-6 (transformers ViT)
    extra: str = ""  # what to pip install first, when the architecture lives in another package


_SRC = "TRIDENT load.py "
# a transformers DINOv2 checkpoint with SwiGLU MLPs (Hibou-L, Midnight), built as timm's SwiGLU ViT
_HF_DINOV2_SWIGLU = dict(
    builder="dinov2_hf", hub_files=("model.safetensors",), act_layer="silu", mlp_layer="swiglu_packed"
)
_KAIKO_HUB = "1aurent/{}.kaiko_ai_towards_large_pathology_fms"


def _kaiko(size: str, arch: str, dim: int, img: int, prefix: int, line: int) -> FoundationSpec:
    return FoundationSpec(
        f"kaiko-{size}", arch, {"img_size": img, "dynamic_img_size": True}, dim, "cls", prefix,
        _KAIKO_HUB.format(arch), False, patch_px=256, mean_std=KAIKO,
        source=_SRC + f"L567-573, L{line} (Resize 224 bilinear + CenterCrop 224, L595)",
        hub_files=("model.safetensors",),
    )  # fmt: skip


FOUNDATION_MODELS: dict[str, FoundationSpec] = {
    s.name: s
    for s in [
        FoundationSpec(
            "uni_v1", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            1024, "cls", 1, "MahmoodLab/UNI", True, patch_px=256, source=_SRC + "L803-809",
        ),
        FoundationSpec(
            "uni_v2", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
             "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
             "dynamic_img_size": True},
            1536, "cls", 9, "MahmoodLab/UNI2-h", True, patch_px=256, source=_SRC + "L856-870",
            act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "virchow", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True},
            2560, "cls+mean", 1, "paige-ai/Virchow", True, interpolation="bicubic",
            source=_SRC + "L996-1005, L1037-1046", act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "virchow2", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
             "dynamic_img_size": True},
            2560, "cls+mean", 5, "paige-ai/Virchow2", True, interpolation="bicubic",
            source=_SRC + "L1071-1081, L1113-1122", act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "hoptimus0", "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
            1536, "cls", 5, "bioptimus/H-optimus-0", True, mean_std=HOPTIMUS, source=_SRC + "L1145-1151",
        ),
        FoundationSpec(
            "hoptimus1", "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
            1536, "cls", 5, "bioptimus/H-optimus-1", True, mean_std=HOPTIMUS, source=_SRC + "L1205-1211",
        ),
        FoundationSpec(
            "h0-mini", "vit_base_patch14_reg4_dinov2",
            {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "dynamic_img_size": True},
            768, "cls", 5, "bioptimus/H0-mini", True, mean_std=HOPTIMUS,
            source=_SRC + "L1390-1454 (timm hf-hub with SwiGLUPacked, SiLU, img_size 224; the CLS); "
            "owkin/plism-benchmark 4736df4 bioptimus.py H0Mini (vit_base_patch14_reg4_dinov2, 224 px, "
            "patch 14, init_values 1e-5, mlp_ratio 4 with DINOv2's SwiGLUFFNFused: hidden 2048, SiLU; "
            "H-optimus mean/std)",
            act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "gigapath", "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
             "num_heads": 24, "mlp_ratio": 5.33334, "dynamic_img_size": True},
            1536, "cls", 1, "prov-gigapath/prov-gigapath", True, patch_px=256, resize_px=256,
            interpolation="bicubic", source=_SRC + "L924-935 (Resize 256 bicubic, CenterCrop 224: L953-959)",
        ),
        FoundationSpec(
            "conch_v15", "vit_large_patch16_224", {"img_size": 448, "init_values": 1.0},
            768, "attn_pool", 1, "MahmoodLab/conchv1_5", True, patch_px=512, input_size=448,
            source=_SRC + "L1302-1320; model_zoo/conchv1_5 (Resize 448 bilinear)",
            builder="conch_v15", hub_files=("pytorch_model_vision.bin",),
        ),
        FoundationSpec(
            "conch_v1", "vit_base_patch16_224", {"img_size": 448, "dynamic_img_size": True},
            512, "attn_pool", 1, "MahmoodLab/CONCH", True, patch_px=512, input_size=448,
            mean_std=OPENAI, interpolation="bicubic",
            source=_SRC + "L347-390 (conch create_model_from_pretrained, encode_image without projection); "
            "CONCH e9c9e5b conch_ViT-B-16.json, coca_model.py L70-96, vision_tower.py, transform.py "
            "(Resize 448 bicubic + CenterCrop 448, OpenAI mean/std)",
            builder="conch_v1", hub_files=("pytorch_model.bin",),
        ),
        FoundationSpec(
            "phikon_v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1.0},
            1024, "cls", 1, "owkin/phikon-v2", False,
            source=_SRC + "L1273, L1278-1291 (AutoModel, CLS; Resize 224 + CenterCrop 224)",
            builder="dinov2_hf", hub_files=("model.safetensors",),
        ),
        FoundationSpec(
            "hibou_l", "vit_large_patch14_reg4_dinov2", {"img_size": 224, "mlp_ratio": 2 * 2736 / 1024},
            1024, "cls", 5, "histai/hibou-L", True, mean_std=HIBOU, interpolation="bicubic",
            source=_SRC + "L500-534 (AutoModel trust_remote_code, pooler_output; Resize 224 bicubic); "
            "histai/hibou-b config.json (Dinov2ModelWithRegisters: 4 registers, use_swiglu_ffn, patch "
            "14, 224 px, eps 1e-6) at ViT-L width, depth and heads (HistAI/hibou vision_transformer.py "
            "vit_large: 1024, 24, 16; build_model: swiglufused, 4 registers, patch 14)",
            **_HF_DINOV2_SWIGLU,
        ),
        FoundationSpec(
            "midnight12k", "vit_giant_patch14_dinov2", {"img_size": 224, "init_values": 1.0},
            3072, "cls+mean", 1, "kaiko-ai/midnight", False, mean_std=KAIKO,
            source=_SRC + "L1329-1388 (AutoModel; Resize 224 + CenterCrop 224, Kaiko mean/std; 'cls+mean', "
            "3072-d in its README table); kaiko-ai/Midnight e48dce1 README (transformers AutoModel; 224 px, "
            "mean/std 0.5; the classification embedding: CLS ++ mean of the patch tokens) and "
            "eval/hest_bench_config.yaml (their checkpoints built as DINOv2's "
            "dinov2_vitg14); facebook/dinov2-giant config.json (Dinov2Model 1536 / 40 blocks / 24 heads, "
            "SwiGLU, eps 1e-6, patch 14, no registers)",
            **_HF_DINOV2_SWIGLU,
        ),
        FoundationSpec(
            "musk", "vit_large_patch16_384",
            {"img_size": 384, "scale_attn_norm": True, "scale_mlp_norm": True},
            1024, "cls", 1, "xiangjx/musk", True, patch_px=384, input_size=384, mean_std=INCEPTION,
            interpolation="bicubic",
            source=_SRC + "L290-344 (musk_large_patch16_384, image CLS without head or norm; Resize 384 "
            "bicubic + CenterCrop 384); lilab-stanford/MUSK 714b666 modeling.py (_get_large_config: "
            "1024 / 24 / 16 heads, FFN 4096, multiway, normalize_output) and its torchscale BEiT-3 "
            "(pre-norm, sub-LayerNorms in attention and FFN, eps 1e-5, GELU, positions from row 2)",
            builder="musk", norm_eps=1e-5, hub_files=("model.safetensors",),
        ),
        FoundationSpec(
            "keep", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            768, "proj", 1, "Astaxanthin/KEEP", False, patch_px=256, interpolation="bicubic",
            source=_SRC + "L234-287 (AutoModel trust_remote_code, encode_image; Resize 224 bicubic + "
            "CenterCrop 224, ImageNet); MAGIC-AI4Med/KEEP a346a70 quick_start/keep_inference.py "
            "(KEEPModel: timm vit_large_patch16_224 with UNI's arguments, visual_head Linear-GELU-Linear "
            "to 768, L2-normalised)",
            builder="keep",
        ),
        FoundationSpec(
            "genbio-pathfm", "genbio_pathfm",
            {"width": 1536, "depth": 40, "heads": 24, "patch": 16, "storage": 4},
            4608, "cls", 5, "genbio-ai/genbio-pathfm", False, mean_std=GENBIO,
            source=_SRC + "L1581-1636 (GenBioPathFMInference: each channel's CLS, concatenated; Resize "
            "224 bilinear); model_zoo/genbio_pathfm/genbio_pathfm.py (VisionTransformer L477-576, "
            "GenBioPathFMInference L583-655: patch 16, 1 channel, 1536 / 40 / 24 heads, 4 storage "
            "tokens, swiglu64, LayerScale, no qkv bias, RoPE base 100 in bfloat16)",
            builder="genbio", hub_files=("model.pth",),
        ),
        FoundationSpec(
            "ctranspath", "swin_tiny_patch4_window7_224", {"img_size": 224},
            768, "avg", 0, "MahmoodLab/hest-bench", True, mpp=1.0, patch_px=256,
            source=_SRC + "L414-445; model_zoo/ctranspath/ctran.py (ConvStem, L33-78)",
            builder="ctranspath", hub_files=("fm_v1/ctranspath/CHIEF_CTransPath.pth",),
            hub_repo_type="dataset",
        ),
        FoundationSpec(
            "phikon", "vit_base_patch16_224", {"img_size": 224},
            768, "cls", 1, "owkin/phikon", False,
            source=_SRC + "L480-493 (ViTModel, add_pooling_layer=False, CLS); owkin/phikon config.json",
            builder="vit_hf", norm_eps=1e-12,
        ),
        _kaiko("vits16", "vit_small_patch16_224", 384, 224, 1, 606),
        _kaiko("vits8", "vit_small_patch8_224", 384, 224, 1, 619),
        _kaiko("vitb16", "vit_base_patch16_224", 768, 224, 1, 632),
        _kaiko("vitb8", "vit_base_patch8_224", 768, 224, 1, 645),
        _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 518, 5, 658),
        FoundationSpec(
            "lunit-vits8", "vit_small_patch8_224", {"img_size": 224, "dynamic_img_size": True},
            384, "cls", 1, "1aurent/vit_small_patch8_224.lunit_dino", False, resize_px=248,
            interpolation="bicubic",
            source=_SRC + "L758-778 (timm data config of the hub config.json: Resize 248 bicubic, "
            "CenterCrop 224, ImageNet mean/std)",
            hub_files=("model.safetensors",),
        ),
        FoundationSpec(
            "gpfm", "vit_large_patch14_dinov2",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
            1024, "cls", 1, "majiabo/GPFM", False, interpolation="bicubic",
            source=_SRC + "L1550-1576", hub_files=("GPFM.pth",),
        ),
        FoundationSpec(
            "openmidnight", "vit_giant_patch14_reg4_dinov2", {"img_size": 224},
            1536, "cls", 5, "SophontAI/OpenMidnight", False,
            source=_SRC + "L1473-1516 (DINOv2 hub dinov2_vitg14_reg; Resize (224, 224))",
            builder="dinov2_meta", hub_files=("teacher_checkpoint_load.pt",),
        ),
        FoundationSpec(
            "resnet50", "resnet50", {"features_only": True, "out_indices": [3], "num_classes": 0},
            1024, "avg", 0, "timm/resnet50.tv_in1k", False, patch_px=256,
            source=_SRC + "L680-736 (layer3 + AdaptiveAvgPool2d; Resize 224 + CenterCrop 224)",
            builder="timm_features",
        ),
    ]
}  # fmt: skip

# TRIDENT's patch encoders not built here, and why (docs/encoders.md)
NOT_REGISTERED = {
    "gemma4-e4b": "the vision tower of a multimodal language model",
    "gemma4-26b": "the vision tower of a multimodal language model",
}
