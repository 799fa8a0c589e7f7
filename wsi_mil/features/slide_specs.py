"""The slide encoders' published settings, one `SlideEncoderSpec` each, under TRIDENT's names.

Sources: TRIDENT (mahmoodlab/TRIDENT at a91fa84): `trident/slide_encoder_models/load.py` (`L<n>`
below: the slide encoder -> patch encoder map L43-54, each loader) and its README's slide
encoder table (`--patch_size`, `--mag`; 20x is 0.5 um/px, 10x is 1.0 um/px). Architectures from
the authors' code, cited per entry (features/slide_arch.py restates them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SlideEncoderSpec:
    name: str
    patch_encoder: str  # the patch features it takes (TRIDENT load.py L43-54)
    in_dim: int
    dim: int  # slide embedding size
    mpp: float | None  # resolution its patches are read at (None: any, mean pooling)
    patch_px: int | None  # patch side at `mpp` (None: any)
    builder: str  # "mean", "chief", "abmil", "madeleine", "titan", "prism" (slide_arch.BUILDERS)
    kwargs: dict = field(default_factory=dict)  # the authors' constructor arguments
    hub: str | None = None  # Hugging Face repository of the weights (None: --weights only)
    hub_files: tuple[str, ...] = ()
    gated: bool = False
    weights_note: str = ""  # where the weights come from when not on the hub
    source: str = ""
    extra: str = ""
    unused: tuple[str, ...] = ()  # checkpoint tensors dropped by name (another tower's)


_TR = "TRIDENT load.py "
_README = "TRIDENT README slide encoder table"
_FEATHER = {"embed_dim": 512, "num_fc_layers": 1, "dropout": 0.25, "attn_dim": 384, "gate": True}  # base.yaml

SLIDE_MODELS: dict[str, SlideEncoderSpec] = {
    s.name: s
    for s in [
        SlideEncoderSpec(
            "chief", "ctranspath", 768, 768, 1.0, 256, "chief",
            {"size_arg": "small", "gate": True, "dropout": True, "n_classes": 2},
            gated=True, weights_note="CHIEF_pretraining.pth (access on request, hms-dbmi/CHIEF README L78)",
            source="hms-dbmi/CHIEF models/CHIEF.py L82-142 at 1abed33 (`WSI_feature`: attention-weighted "
            f"mean of the input features); {_TR}L44-54, L290, L304-308; {_README} (256 px, 10x)",
        ),
        SlideEncoderSpec(
            "feather", "conch_v15", 768, 512, 0.5, 512, "abmil",
            {"in_dim": 768, **_FEATHER},
            hub="MahmoodLab/abmil.base.conch_v15.pc108-24k", hub_files=("model.safetensors",), gated=True,
            source="mahmoodlab/MIL-Lab src/models/abmil.py L29-105, layers.py create_mlp, "
            f"model_configs/abmil/base.yaml at dfc3c17; {_TR}L480-508; {_README} (512 px, 20x)",
        ),
        SlideEncoderSpec(
            "feather_uni_v2", "uni_v2", 1536, 512, 0.5, 256, "abmil",
            {"in_dim": 1536, **_FEATHER},
            hub="MahmoodLab/abmil.base.uni_v2.pc108-24k", hub_files=("model.safetensors",), gated=True,
            source="as feather; " + _TR + "L510-538; " + _README + " (256 px, 20x)",
        ),
        SlideEncoderSpec(
            "madeleine", "conch_v1", 512, 512, 1.0, 256, "madeleine",
            {"patch_embedding_dim": 512, "wsi_encoder_hidden_dim": 512, "n_heads": 4,
             "activation": "softmax"},
            hub="MahmoodLab/madeleine", hub_files=("model.pt",),
            source="mahmoodlab/MADELEINE madeleine/models/Model.py L45-108, L314-446, abmil.py L8-68 at "
            "419287d; settings of scripts/launch_pretrain_withoutStainEncodings.sh (the hub's "
            f"model_config.json not read); {_TR}L364-386; {_README} (256 px, 10x)",
        ),
        SlideEncoderSpec(
            "titan", "conch_v15", 768, 768, 0.5, 512, "titan", {},
            hub="MahmoodLab/TITAN", hub_files=("model.safetensors",), gated=True, unused=("text_encoder.",),
            source="MahmoodLab/TITAN hub remote code and config.json, as copied in "
            "DIAGNijmegen/unicorn_baseline dec3809 src/unicorn_baseline/vision/pathology/titan/: "
            "configuration_titan.py "
            "(TitanVisionConfig defaults; TitanConfig: attentional_pool 'parallel'), vision_transformer.py "
            "(preprocess_features, VisionTransformer, AttentionalPooler), modeling_titan.py "
            f"(encode_slide_from_patch_features: no_proj=True); {_TR}L459-478; {_README} (512 px, 20x)",
        ),
        SlideEncoderSpec(
            "prism", "virchow", 2560, 1280, 0.5, 224, "prism", {},
            hub="paige-ai/Prism", hub_files=("model.safetensors", "pytorch_model.bin"), gated=True,
            unused=("text_decoder.", "text_to_latents.", "img_to_latents.", "temperature"),
            source="paige-ai/Prism hub remote code and config.json, as copied in "
            "DIAGNijmegen/unicorn_baseline dec3809 src/unicorn_baseline/vision_language/prism/: "
            "perceiver.py (PerceiverResampler), config.json perceiver_config, modeling_prism.py "
            f"(slide_representations: image_embedding); {_TR}L189-229; {_README} (224 px, 20x)",
        ),
    ]
}  # fmt: skip

# TRIDENT's spellings of the mean-pooled Kaiko encoders (load.py L580-589, L631-635)
TRIDENT_MEAN_ALIASES = {
    "mean-kaiko-vit8s": "kaiko-vits8",
    "mean-kaiko-vit16s": "kaiko-vits16",
    "mean-kaiko-vit8b": "kaiko-vitb8",
    "mean-kaiko-vit16b": "kaiko-vitb16",
    "mean-kaiko-vit14l": "kaiko-vitl14",
}

# TRIDENT's slide encoders not built here, and why (docs/encoders.md)
NOT_REGISTERED = {
    "gigapath": "LongNet dilated attention needs flash_attn 2.5.8 (CUDA only; TRIDENT load.py L329-334)",
    "threads": "not released (TRIDENT load.py L405: 'Coming Soon!')",
    "care": "model code only on the Hugging Face hub (Zipper-1/CARE, trust_remote_code)",
}
