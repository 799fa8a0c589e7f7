"""MUSK against its authors' model, restated from lilab-stanford/MUSK (714b666): `musk/modeling.py`
(`MUSK.forward(image, with_head=False, out_norm=False, return_global=True)`: what TRIDENT's
`MuskInferenceEncoder` returns; `_get_large_config`), its vendored torchscale BEiT-3
(`model/BEiT3.py`, `architecture/encoder.py` `Encoder`/`EncoderLayer`, `component/
multihead_attention.py`, `feedforward_network.py`, `multiway_network.py`, `embedding.py`), and
`musk/utils.py` `load_model_and_may_interpolate`'s position resize. Only the image path is
restated (multiway split position -1: every module's `A` branch); the text modules exist so
the checkpoint has the authors' whole key layout. Random weights go through wsi-mil's one
strict load; depth and vocabulary reduced."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import import_timm
from wsi_mil.features.encoders import create_encoder

import_timm()
DEPTH, DIM, HEADS, FFN, EPS = 2, 1024, 16, 4096, 1e-5  # _get_large_config; EncoderConfig eps


class MultiwayNetwork(nn.Module):  # multiway_network.py: A for vision, B for language
    def __init__(self, module):
        super().__init__()
        self.A, self.B = module, copy.deepcopy(module)

    def forward(self, x, **kw):
        return self.A(x, **kw)  # split_position == -1 (BEiT3.forward without text)


class PositionalEmbedding(nn.Embedding):  # embedding.py: positions start at 2, as fairseq's
    def __init__(self, n, dim, offset=2):
        super().__init__(n, dim)
        self.offset = offset

    def forward(self, x, positions=None):
        positions = torch.arange(self.offset, x.size(1) + self.offset).long().unsqueeze(0)
        return F.embedding(positions, self.weight)


class MutliwayEmbedding(MultiwayNetwork):  # multiway_network.py (their spelling)
    def __init__(self, a, b):
        nn.Module.__init__(self)
        self.A, self.B = a, b


class VisionEmbedding(nn.Module):  # embedding.py, contain_mask_token and prepend_cls_token
    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)


class MultiheadAttention(nn.Module):  # multihead_attention.py, self-attention with subln
    def __init__(self, dim, heads, subln=True):
        super().__init__()
        self.heads, self.scaling = heads, (dim // heads) ** -0.5
        self.k_proj = MultiwayNetwork(nn.Linear(dim, dim, bias=True))
        self.v_proj = MultiwayNetwork(nn.Linear(dim, dim, bias=True))
        self.q_proj = MultiwayNetwork(nn.Linear(dim, dim, bias=True))
        self.out_proj = MultiwayNetwork(nn.Linear(dim, dim, bias=True))
        self.inner_attn_ln = MultiwayNetwork(nn.LayerNorm(dim, eps=EPS)) if subln else None

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):  # 'b l (h d) -> (b h) l d'
            return t.reshape(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = q * self.scaling
        w = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1, dtype=torch.float32).type_as(q)
        attn = torch.bmm(w, v).reshape(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        if self.inner_attn_ln is not None:
            attn = self.inner_attn_ln(attn)
        return self.out_proj(attn)


class FeedForwardNetwork(nn.Module):  # feedforward_network.py, gelu, subln
    def __init__(self, dim, ffn, subln=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn, eps=EPS) if subln else None

    def forward(self, x):
        x = F.gelu(self.fc1(x).float()).type_as(x)
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):  # encoder.py: normalize_before (subln forces it), alpha 1
    def __init__(self, subln=True):
        super().__init__()
        self.self_attn = MultiheadAttention(DIM, HEADS, subln)
        self.self_attn_layer_norm = MultiwayNetwork(nn.LayerNorm(DIM, eps=EPS))
        self.ffn = MultiwayNetwork(FeedForwardNetwork(DIM, FFN, subln))
        self.final_layer_norm = MultiwayNetwork(nn.LayerNorm(DIM, eps=EPS))

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class Encoder(nn.Module):  # encoder.py: no_scale_embedding, no layernorm_embedding
    def __init__(self, n_pos, subln=True, offset=2):
        super().__init__()
        self.embed_positions = MutliwayEmbedding(
            PositionalEmbedding(n_pos, DIM, offset), PositionalEmbedding(1024, DIM)
        )  # BEiT3.py: the vision table has num_position_embeddings() + 2 rows
        self.layers = nn.ModuleList([EncoderLayer(subln) for _ in range(DEPTH)])
        self.layer_norm = MultiwayNetwork(nn.LayerNorm(DIM, eps=EPS))  # normalize_output

    def forward(self, x):
        x = x + self.embed_positions(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class BEiT3(nn.Module):
    def __init__(self, img_size, subln=True, offset=2, vocab=100):
        super().__init__()
        self.text_embed = nn.Embedding(vocab, DIM)  # 64010 in MUSK; unused by images
        self.vision_embed = VisionEmbedding(img_size, 16, DIM)
        self.encoder = Encoder(self.vision_embed.num_patches + 1 + 2, subln, offset)

    def forward(self, visual_tokens):
        return {"encoder_out": self.encoder(self.vision_embed(visual_tokens))}


class MUSK(nn.Module):  # modeling.py
    def __init__(self, img_size=384, **kw):
        super().__init__()
        self.beit3 = BEiT3(img_size, **kw)
        self.language_head = nn.Linear(DIM, DIM, bias=False)
        self.vision_head = nn.Linear(DIM, DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image, with_head=False, out_norm=False, return_global=True):
        x = self.beit3(visual_tokens=image)["encoder_out"]
        vision_cls = x[:, 0, :] if return_global else x
        if with_head:
            vision_cls = self.vision_head(vision_cls)
        return F.normalize(vision_cls, dim=-1) if out_norm else vision_cls


def authors_musk(path=None, **kw) -> MUSK:
    torch.manual_seed(0)
    model = MUSK(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] in (DIM, FFN) else 0.0))
    if path is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)  # hub: model.safetensors
    return model


def _image(size=384):
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size)


def test_musk_equals_the_authors_image_embedding(tmp_path):
    ref = authors_musk(tmp_path / "model.safetensors")
    enc = create_encoder("musk", weights=tmp_path / "model.safetensors", depth=DEPTH)
    assert (enc.info.dim, enc.info.input_size, enc.info.interpolation) == (1024, 384, "bicubic")
    assert enc.info.mean == (0.5, 0.5, 0.5)  # IMAGENET_INCEPTION_MEAN (TRIDENT L330-332)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(enc.net(x), ref(x), atol=1e-5, rtol=1e-5)


def test_musk_resizes_another_position_grid_as_the_authors_do(tmp_path):
    """A checkpoint saved at 224 px (14 x 14 positions) into the 384 px model: their
    `load_model_and_may_interpolate` keeps the 3 extra rows and resizes the rest (bicubic)."""
    authors_musk(tmp_path / "m224.safetensors", img_size=224)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "m224.safetensors")
    key = "beit3.encoder.embed_positions.A.weight"
    pos = sd[key]
    grid = pos[3:].reshape(1, 14, 14, DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(24, 24), mode="bicubic", align_corners=False)
    sd[key] = torch.cat([pos[:3], grid.permute(0, 2, 3, 1).reshape(-1, DIM)])
    ref = MUSK().eval()
    ref.load_state_dict(sd)
    enc = create_encoder("musk", weights=tmp_path / "m224.safetensors", depth=DEPTH)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(enc.net(x), ref(x), atol=1e-5, rtol=1e-5)


def test_musk_changed_settings_and_wrong_checkpoints_are_caught(tmp_path):
    # without the sub-LayerNorms (torchscale's subln=False): the strict load says so
    authors_musk(tmp_path / "nosub.safetensors", subln=False)
    with pytest.raises(WsiMilError, match=r"encoder musk: tensors 8 missing.*(attn|mlp)\.norm"):
        create_encoder("musk", weights=tmp_path / "nosub.safetensors", depth=DEPTH)
    # positions counted from 0 instead of fairseq's 2: the same tensors, another embedding
    ref = authors_musk(tmp_path / "from0.safetensors", offset=0)
    enc = create_encoder("musk", weights=tmp_path / "from0.safetensors", depth=DEPTH)
    x = _image()
    with torch.no_grad():
        assert not torch.allclose(enc.net(x), ref(x), atol=1e-3)
    # MUSK's file passed as another encoder is named, not loaded
    with pytest.raises(WsiMilError, match=r"musk's key layout.*--encoder musk"):
        create_encoder("uni_v1", weights=tmp_path / "from0.safetensors", depth=1)
