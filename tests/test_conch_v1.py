"""CONCH v1 against its authors' vision tower, restated from mahmoodlab/CONCH (e9c9e5b):
`conch/open_clip_custom/coca_model.py` `_build_vision_tower` (a timm `VisionTransformer`,
`forward = forward_features`), `vision_tower.py` `VisualModel` (contrastive and caption
poolers, `forward_no_head`: what TRIDENT's `encode_image(proj_contrast=False,
normalize=False)` returns), `transformer.py` `AttentionalPooler`, and `coca_model.py`
`resize_pos_embed`. Random weights in the authors' whole-model checkpoint layout (`visual.`,
`text.`, `text_decoder.`, `logit_scale`) go through wsi-mil's one strict load; depth reduced."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import import_timm
from wsi_mil.features.encoders import create_encoder

timm = import_timm()
DEPTH = 2


class LayerNorm(nn.LayerNorm):  # transformer.py: torch's, cast back to the input dtype
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class AttentionalPooler(nn.Module):  # transformer.py
    def __init__(self, d_model, context_dim, n_head=8, n_queries=256, norm_layer=LayerNorm, bias=True):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, bias=bias)
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x, attn_mask=None):
        x = self.ln_k(x).permute(1, 0, 2)  # NLD -> LND
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, n, 1), x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)  # LND -> NLD


class VisualModel(nn.Module):  # vision_tower.py, attentional pools on (conch_ViT-B-16.json)
    def __init__(self, trunk, embed_dim_contrast=512, embed_dim_caption=768, pooler_bias=True):
        super().__init__()
        self.trunk = trunk
        prev_chs = trunk.num_features
        self.attn_pool_contrast = AttentionalPooler(
            embed_dim_contrast, prev_chs, n_head=8, n_queries=1, bias=pooler_bias
        )
        self.ln_contrast = nn.LayerNorm(embed_dim_contrast)
        scale = prev_chs**-0.5
        self.proj_contrast = nn.Parameter(scale * torch.randn(embed_dim_contrast, embed_dim_contrast))
        self.head = nn.Sequential(OrderedDict())
        self.attn_pool_caption = AttentionalPooler(embed_dim_caption, prev_chs, n_head=8, n_queries=256)
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def forward_no_head(self, x):
        x = self.trunk(x)
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])


def authors_visual(image_size=448, **kw) -> VisualModel:
    """`_build_vision_tower` with conch_ViT-B-16.json's vision_cfg (CoCaVisionCfg defaults:
    width 768, 12 layers, 12 heads, mlp_ratio 4, patch 16), depth reduced, random weights."""
    torch.manual_seed(3)
    trunk = timm.models.vision_transformer.VisionTransformer(
        embed_dim=768, depth=DEPTH, num_heads=12, mlp_ratio=4, img_size=image_size, patch_size=16,
        num_classes=0, dynamic_img_size=True,
    )  # fmt: skip
    trunk.forward = trunk.forward_features
    visual = VisualModel(trunk, **kw).eval()
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return visual


def coca_checkpoint(visual: VisualModel, path) -> dict:
    """The whole CoCa model's state dict as the hub's pytorch_model.bin holds it (text towers
    stand in as a few tensors: only their names matter to the vision tower's load)."""
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    sd.update({"text.token_embedding.weight": torch.randn(8, 4), "text.ln_final.weight": torch.ones(4),
               "text_decoder.ln_final.weight": torch.ones(4), "logit_scale": torch.tensor(2.6)})  # fmt: skip
    torch.save(sd, path)
    return sd


def resize_pos_embed(state_dict, model):  # coca_model.py, for the VisualModel alone
    pos_embed_w = state_dict["trunk.pos_embed"]
    if pos_embed_w.shape != model.trunk.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        trunk = model.trunk
        num_prefix_tokens = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
        pos_embed_w = resample_abs_pos_embed(
            pos_embed_w, new_size=model.trunk.patch_embed.grid_size, num_prefix_tokens=num_prefix_tokens,
            interpolation="bilinear", antialias=False, verbose=True,
        )  # fmt: skip
    state_dict["trunk.pos_embed"] = pos_embed_w


def _image(size=448):
    torch.manual_seed(4)
    return torch.randn(2, 3, size, size)


def test_conch_v1_equals_the_authors_vision_tower_on_their_checkpoint(tmp_path):
    visual = authors_visual()
    coca_checkpoint(visual, tmp_path / "pytorch_model.bin")
    enc = create_encoder("conch_v1", weights=tmp_path / "pytorch_model.bin", depth=DEPTH)
    assert (enc.info.dim, enc.info.input_size, enc.info.interpolation) == (512, 448, "bicubic")
    assert enc.info.mean == (0.48145466, 0.4578275, 0.40821073)  # OPENAI_DATASET_MEAN (factory.py)
    x = _image()
    with torch.no_grad():
        want, got = visual.forward_no_head(x), enc.net(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_conch_v1_resizes_another_position_grid_as_the_authors_do(tmp_path):
    """A checkpoint saved at 224 px (14 x 14 positions) into the 448 px model: their
    `resize_pos_embed` (timm resample, bilinear, no antialias)."""
    small = authors_visual(image_size=224)
    coca_checkpoint(small, tmp_path / "c224.bin")
    ref = authors_visual()
    sd = {k: v.clone() for k, v in small.state_dict().items()}
    resize_pos_embed(sd, ref)
    ref.load_state_dict(sd)
    enc = create_encoder("conch_v1", weights=tmp_path / "c224.bin", depth=DEPTH)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(enc.net(x), ref.forward_no_head(x), atol=1e-5, rtol=1e-5)


def test_conch_v1_changed_pooler_or_wrong_checkpoint_is_refused(tmp_path):
    # the pooler without its biases (a changed architecture setting): the strict load says so
    coca_checkpoint(authors_visual(pooler_bias=False), tmp_path / "nobias.bin")
    with pytest.raises(WsiMilError, match=r"encoder conch_v1: tensors 2 missing.*in_proj_bias"):
        create_encoder("conch_v1", weights=tmp_path / "nobias.bin", depth=DEPTH)
    # CONCH v1 weights passed as CONCH v1.5, and v1.5's vision file passed as v1: both named
    coca_checkpoint(authors_visual(), tmp_path / "v1.bin")
    with pytest.raises(WsiMilError, match=r"conch_v1's key layout.*--encoder conch_v1"):
        create_encoder("conch_v15", weights=tmp_path / "v1.bin", depth=1)
    v15 = create_encoder("conch_v15", random_weights=True, depth=1)
    torch.save(v15.net.state_dict(), tmp_path / "pytorch_model_vision.bin")
    with pytest.raises(WsiMilError, match=r"conch_v15's key layout.*--encoder conch_v15"):
        create_encoder("conch_v1", weights=tmp_path / "pytorch_model_vision.bin", depth=DEPTH)
