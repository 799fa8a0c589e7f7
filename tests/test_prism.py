"""PRISM's slide encoder against its authors' code, restated from the hub's remote-code files
(paige-ai/Prism, as copied with the hub's config.json in DIAGNijmegen/unicorn_baseline at
dec3809, src/unicorn_baseline/vision_language/prism/): `perceiver.py` (CrossAttention on its
default scaled_dot_product_attention path, MHSA, GEGLU, FeedForward, Perceiver,
PerceiverResampler), `config.json`'s `perceiver_config`, and `modeling_prism.py`
(`slide_representations`, whose `image_embedding` TRIDENT takes). `sdp_kernel(enable_math=True)`
only picks a CUDA backend and is left out. Random weights in their layout (shared modules under
every layer's name, as `torch.save` writes them) are loaded through `create_slide_encoder`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import WsiMilError
from wsi_mil.features.slide_encoders import create_slide_encoder


class CrossAttention(nn.Module):
    def __init__(self, *, query_dim, context_dim, head_dim, heads, return_attn=False, c_norm=True):
        super().__init__()
        self.query_dim, self.context_dim = query_dim, context_dim
        self.head_dim, self.heads = head_dim, heads
        self.inner_dim = self.head_dim * self.heads
        self.x_norm = nn.LayerNorm(self.query_dim)
        self.c_norm = nn.LayerNorm(self.context_dim) if c_norm is True else None
        self.to_q = nn.Linear(self.query_dim, self.inner_dim, bias=False)
        self.to_kv = nn.Linear(self.context_dim, self.inner_dim * 2, bias=False)
        self.to_out = nn.Linear(self.inner_dim, self.query_dim, bias=False)

    def forward(self, x, c=None, kvt=None, attn_mask=None):
        Bx, Nx, Dimx = x.shape
        x = self.x_norm(x)
        c = self.c_norm(c) if self.c_norm is not None else c
        q = self.to_q(x)
        q = q.reshape(Bx, Nx, self.heads, self.head_dim)
        if c is not None and kvt is None:
            Bc, Nc, _ = c.shape
            kv = self.to_kv(c)
            kv = kv.reshape(Bc, Nc, 2, self.heads, self.head_dim)
            k, v = kv.unbind(2)
            kvt = (k, v)
        else:
            k, v = kvt
            Bc, Nc, _, _ = k.shape
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(Bc, 1, Nx, Nc).expand(-1, self.heads, -1, -1)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        a = a.transpose(1, 2)
        c = a.reshape(Bx, Nx, self.inner_dim)
        return self.to_out(c), kvt, torch.empty(0)


class MHSA(nn.Module):
    def __init__(self, *, dim, num_heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, dropout=0.0, bias=False,
                                         add_bias_kv=False, add_zero_attn=False, kdim=dim, vdim=dim,
                                         batch_first=True)  # fmt: skip

    def forward(self, x):
        x = self.norm(x)
        x, _ = self.mha(x, x, x, key_padding_mask=None, need_weights=False, attn_mask=None,
                        average_attn_weights=False, is_causal=False)  # fmt: skip
        return x


class GEGLU(nn.Module):
    def forward(self, x):
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, *, dim, mult=1, dropout=0.0, activation="geglu"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        actfn, extra_dim = (GEGLU, 2) if activation == "geglu" else (nn.GELU, 1)
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult * extra_dim), actfn(), nn.Linear(dim * mult, dim), nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.net(self.norm(x))


class Perceiver(nn.Module):
    def __init__(self, *, latent_seq=512, latent_dim=768, context_dim=2560, mhsa_heads=8, perceiver_depth=8,
                 transformer_depth=6, share_xattn_start_layer=1, share_tf_start_layer=0, xattn_heads=1,
                 mlp_mult=1, mlp_activation="geglu"):  # fmt: skip
        super().__init__()
        self.share_xattn_start_layer = share_xattn_start_layer
        self.share_tf_start_layer = share_tf_start_layer
        self.latent_seq = latent_seq
        self.latents = nn.Parameter(torch.randn(latent_seq, latent_dim))

        def get_xattn():
            return nn.ModuleDict({
                "xattn": CrossAttention(query_dim=latent_dim, context_dim=context_dim,
                                        head_dim=latent_dim // xattn_heads, heads=xattn_heads,
                                        return_attn=False, c_norm=False),
                "ff": FeedForward(dim=latent_dim, mult=mlp_mult, activation=mlp_activation),
            })  # fmt: skip

        def get_mhsa():
            return nn.ModuleDict({
                "mhsa": MHSA(dim=latent_dim, num_heads=mhsa_heads),
                "ff": FeedForward(dim=latent_dim, mult=mlp_mult, activation=mlp_activation),
            })  # fmt: skip

        layers = []
        for i in range(perceiver_depth):
            layers.append(nn.ModuleDict({
                "xattn": get_xattn() if i <= self.share_xattn_start_layer else layers[-1]["xattn"],
                "tf": (nn.ModuleList([get_mhsa() for _ in range(transformer_depth)])
                       if i <= self.share_tf_start_layer else layers[-1]["tf"]),
            }))  # fmt: skip
        self.layers = nn.ModuleList(layers)

    def forward(self, context, attn_mask):
        B, N, _ = context.shape
        attn_mask = attn_mask.reshape(B, 1, N).expand(-1, self.latent_seq, -1)
        x = self.latents.unsqueeze(0).expand(B, -1, -1)
        kvt = None
        for i, l in enumerate(self.layers):  # noqa: E741 (their name)
            xattn = l["xattn"]
            if i <= self.share_xattn_start_layer:
                xattn_out, kvt, _ = xattn["xattn"](x, c=context, kvt=None, attn_mask=attn_mask)
            else:
                xattn_out, kvt, _ = xattn["xattn"](x, c=None, kvt=kvt, attn_mask=attn_mask)
            x = xattn_out + x
            x = xattn["ff"](x) + x
            for mhsa in l["tf"]:
                x = mhsa["mhsa"](x) + x
                x = mhsa["ff"](x) + x
        return x


PERCEIVER_CONFIG = {  # the hub config.json's perceiver_config
    "context_dim": 2560, "latent_dim": 1280, "latent_seq": 512, "mhsa_heads": 8, "mlp_activation": "geglu",
    "mlp_mult": 1, "perceiver_depth": 8, "share_tf_start_layer": 0, "share_xattn_start_layer": 1,
    "transformer_depth": 6, "xattn_heads": 1,
}  # fmt: skip


class PerceiverResampler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.query_dim, self.query_seq = config["latent_dim"], config["latent_seq"]
        self.cls_norm = nn.LayerNorm(config["latent_dim"])
        self.img_norm = nn.LayerNorm(config["latent_dim"])
        self.perceiver = Perceiver(**{**config, "latent_seq": 1 + config["latent_seq"]})

    def forward(self, tile_embeddings, tile_mask=None):
        if tile_mask is None:
            tile_mask = torch.ones(tile_embeddings.shape[:2], dtype=tile_embeddings.dtype)
        x = self.perceiver(context=tile_embeddings, attn_mask=tile_mask)
        cls_emb, img_emb = x[:, 0], x[:, 1:]
        return {"image_embedding": self.cls_norm(cls_emb), "image_latents": self.img_norm(img_emb)}


class Prism(nn.Module):
    def __init__(self, **changed):
        super().__init__()
        self.image_resampler = PerceiverResampler({**PERCEIVER_CONFIG, **changed})
        self.text_decoder = nn.Linear(4, 4)  # stands in for BioGPT, dropped on loading
        self.img_to_latents = nn.Sequential()  # EmbedToLatents(1280, 5120): to_latents, no bias
        self.img_to_latents.to_latents = nn.Linear(1280, 16, bias=False)  # (width reduced)
        self.text_to_latents = nn.Sequential()
        self.text_to_latents.to_latents = nn.Linear(4, 16, bias=False)
        self.temperature = nn.Parameter(torch.log(torch.tensor(1.0) / 0.07))

    def slide_representations(self, tile_embeddings, tile_mask=None):
        return self.image_resampler(tile_embeddings, tile_mask=tile_mask)


def _reference(**changed):
    torch.manual_seed(1)
    ref = Prism(**changed).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_prism_equals_the_authors_slide_representations(tmp_path):
    ref = _reference()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # shared modules under every name
    enc = create_slide_encoder("prism", weights=tmp_path / "pytorch_model.bin")
    info = enc.info
    assert (info.patch_encoder, info.in_dim, info.dim, info.mpp, info.patch_px) == (
        "virchow",
        2560,
        1280,
        0.5,
        224,
    )
    x = torch.randn(1, 37, 2560)
    with torch.no_grad():
        want = ref.slide_representations(x)["image_embedding"]
    torch.testing.assert_close(enc(x[0]), want, atol=1e-4, rtol=1e-4)


def _small(tmp_path, name, **changed):
    """A reference with 32 latent queries instead of 513 (the forward costs ~0.6 TFLOP at 513),
    saved, and the encoder built at the same size."""
    ref = _reference(latent_seq=31, **changed)
    torch.save(ref.state_dict(), tmp_path / name)
    return ref, tmp_path / name


def test_prism_loads_one_copy_of_each_shared_module_and_refuses_copies_that_differ(tmp_path):
    ref, path = _small(tmp_path, "all.bin")
    enc = create_slide_encoder("prism", weights=path, latent_seq=32)
    sd = ref.state_dict()
    x = torch.randn(20, 2560)
    # one copy each, under the last layer's name (as a deduplicating writer may keep it)
    single = {k: v for k, v in sd.items() if not any(f"layers.{i}.xattn." in k for i in range(1, 7))}
    single = {k: v for k, v in single.items() if not any(f"layers.{i}.tf." in k for i in range(7))}
    torch.save(single, tmp_path / "single.bin")
    got = create_slide_encoder("prism", weights=tmp_path / "single.bin", latent_seq=32)(x)
    torch.testing.assert_close(got, enc(x))
    with torch.no_grad():
        torch.testing.assert_close(
            enc(x), ref.slide_representations(x[None])["image_embedding"], atol=1e-4, rtol=1e-4
        )
    bad = dict(sd)
    key = next(k for k in sd if ".layers.5.xattn.xattn.to_q." in k)
    bad[key] = sd[key] + 1
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(WsiMilError, match="weights do not fit encoder prism.*unexpected"):
        create_slide_encoder("prism", weights=tmp_path / "bad.bin", latent_seq=32)


def test_prism_changed_settings_are_caught(tmp_path):
    ref, path = _small(tmp_path, "heads.bin", mhsa_heads=16)  # no tensor shows the head count
    enc = create_slide_encoder("prism", weights=path, latent_seq=32)
    x = torch.randn(1, 30, 2560)
    with torch.no_grad():
        assert not torch.allclose(enc(x[0]), ref.slide_representations(x)["image_embedding"], atol=1e-3)
    _, path = _small(tmp_path, "unshared.bin", share_xattn_start_layer=2)
    with pytest.raises(WsiMilError, match="weights do not fit encoder prism"):
        create_slide_encoder("prism", weights=path, latent_seq=32)
