"""GenBio-PathFM against its authors' model, restated from TRIDENT's copy of it
(`trident/patch_encoder_models/model_zoo/genbio_pathfm/genbio_pathfm.py` at a91fa84, taken from
genbio-ai/genbio-pathfm): `RopePositionEmbedding`, `SelfAttention` (q and k rotated in the
RoPE's dtype), `SwiGLUFFN`, `LayerScale`, `SelfAttentionBlock` (inference path),
`VisionTransformer.prepare_tokens`/`forward_features`, and `GenBioPathFMInference.forward` (each
RGB channel as a grey image, the class tokens concatenated). Random weights in their layout,
`rope_embed.periods` in bfloat16 as their default stores it, go through wsi-mil's one strict
load; depth reduced."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import import_timm
from wsi_mil.features.encoders import create_encoder

import_timm()
DEPTH = 2


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x):
        return x * self.gamma


class SwiGLUFFN(nn.Module):  # "swiglu64": partial(SwiGLUFFN, align_to=64)
    def __init__(self, in_features, hidden_features, bias=True, align_to=64):
        super().__init__()
        d = int(hidden_features * 2 / 3)
        h = d + (-d % align_to)
        self.w1 = nn.Linear(in_features, h, bias=bias)
        self.w2 = nn.Linear(in_features, h, bias=bias)
        self.w3 = nn.Linear(h, in_features, bias=bias)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class PatchEmbed(nn.Module):  # flatten_embedding=False
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.size(2), x.size(3)
        return x.flatten(2).transpose(1, 2).reshape(-1, h, w, x.shape[1])


class RopePositionEmbedding(nn.Module):  # base 100, normalize_coords "separate", eval mode
    def __init__(self, embed_dim, num_heads, base=100.0, dtype=torch.bfloat16):
        super().__init__()
        self.D_head, self.dtype = embed_dim // num_heads, dtype
        periods = base ** (2 * torch.arange(self.D_head // 4, dtype=dtype) / (self.D_head // 2))
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, *, H, W):
        dd = {"dtype": self.dtype}
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def _rope_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope_apply(x, sin, cos):
    return (x * cos) + (_rope_rotate_half(x) * sin)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _apply_rope(self, q, k, rope):
        q_dtype, k_dtype = q.dtype, k.dtype
        sin, cos = rope
        q, k = q.to(sin.dtype), k.to(sin.dtype)
        prefix = q.shape[-2] - sin.shape[-2]
        q = torch.cat((q[:, :, :prefix], _rope_apply(q[:, :, prefix:], sin, cos)), dim=-2)
        k = torch.cat((k[:, :, :prefix], _rope_apply(k[:, :, prefix:], sin, cos)), dim=-2)
        return q.to(q_dtype), k.to(k_dtype)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = [t.transpose(1, 2) for t in torch.unbind(qkv, 2)]
        if rope is not None:
            q, k = self._apply_rope(q, k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # _NORM_LAYERS["layernorm"]
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFN(dim, int(dim * 4))  # ffn_ratio 4
        self.ls2 = LayerScale(dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):  # GenBioPathFMInference's arguments, depth reduced
    def __init__(self, depth=DEPTH, n_storage_tokens=4, qkv_bias=False, rope_dtype=torch.bfloat16):
        super().__init__()
        embed_dim, num_heads = 1536, 24
        self.n_storage_tokens = n_storage_tokens
        self.patch_embed = PatchEmbed(16, 1, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim))
        self.rope_embed = RopePositionEmbedding(embed_dim, num_heads, dtype=rope_dtype)
        self.blocks = nn.ModuleList(SelfAttentionBlock(embed_dim, num_heads, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def prepare_tokens(self, x):
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        ct = self.cls_token
        st = self.storage_tokens if self.n_storage_tokens > 0 else ct.new_empty(1, 0, ct.shape[-1])
        return torch.cat([ct.expand(B, -1, -1), st.expand(B, -1, -1), x], dim=1), (H, W)

    def forward_features(self, x):
        tokens, (H, W) = self.prepare_tokens(x)
        rope = self.rope_embed(H=H, W=W)
        for blk in self.blocks:
            tokens = blk(tokens, rope)
        return self.norm(tokens)[:, 0]


def genbio_forward(model, x_rgb):  # GenBioPathFMInference.forward
    b, _c, h, w = x_rgb.shape
    cls = model.forward_features(x_rgb.reshape(b * 3, 1, h, w)).view(b, 3, -1)
    return torch.cat([cls[:, 0], cls[:, 1], cls[:, 2]], dim=-1)


def authors_model(path=None, **kw):
    torch.manual_seed(0)
    model = VisionTransformer(**kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    if path is not None:
        torch.save(model.state_dict(), path)  # the hub's model.pth: the VisionTransformer's state dict
    return model


def _image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def test_genbio_pathfm_equals_the_authors_model(tmp_path):
    ref = authors_model(tmp_path / "model.pth")
    assert ref.rope_embed.periods.dtype == torch.bfloat16
    enc = create_encoder("genbio-pathfm", weights=tmp_path / "model.pth", depth=DEPTH)
    assert (enc.info.dim, enc.info.input_size, enc.info.interpolation) == (4608, 224, "bilinear")
    assert enc.info.mean == (0.697, 0.575, 0.728)  # GENBIO_PATHFM_MEAN (TRIDENT constants.py)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(enc.net(x), genbio_forward(ref, x), atol=1e-5, rtol=1e-5)


def test_genbio_pathfm_changed_settings_are_caught(tmp_path):
    # the RoPE in float32 (`pos_embed_rope_dtype="fp32"`, not GenBioPathFMInference's): the same
    # weights give another embedding, so the bfloat16 RoPE is what the parity above checks
    ref = authors_model(tmp_path / "fp32.pth", rope_dtype=torch.float32)
    enc = create_encoder("genbio-pathfm", weights=tmp_path / "fp32.pth", depth=DEPTH)
    x = _image()
    with torch.no_grad():
        assert not torch.allclose(enc.net(x), genbio_forward(ref, x), atol=1e-3)
    # qkv biases, or no storage tokens: the strict load says so
    authors_model(tmp_path / "bias.pth", qkv_bias=True)
    with pytest.raises(WsiMilError, match=r"encoder genbio-pathfm: tensors 2 unexpected.*qkv.bias"):
        create_encoder("genbio-pathfm", weights=tmp_path / "bias.pth", depth=DEPTH)
    authors_model(tmp_path / "nostore.pth", n_storage_tokens=0)
    with pytest.raises(WsiMilError, match=r"encoder genbio-pathfm: tensors 1 missing.*storage_tokens"):
        create_encoder("genbio-pathfm", weights=tmp_path / "nostore.pth", depth=DEPTH)
