"""PRISM's slide encoder (Shaikovski et al., 2024; paige-ai/Prism): the Perceiver resampler of
the hub's remote code, `perceiver.py` (`CrossAttention`, `MHSA`, `GEGLU`, `FeedForward`,
`Perceiver`, `PerceiverResampler`) with the hub's `config.json` `perceiver_config` (513 latent
queries of 1280, 2560-d Virchow context, 8 Perceiver layers, a 6-block transformer, cross
attention of one head, 8 self-attention heads, GEGLU, MLP multiplier 1); the slide embedding
is `slide_representations(x)["image_embedding"]` (`modeling_prism.py`, as TRIDENT takes it).
Read from the copies in DIAGNijmegen/unicorn_baseline at dec3809
(`src/unicorn_baseline/vision_language/prism/`); tests/test_prism.py restates them and compares.

Weight sharing as the authors build it: layers 0 and 1 have their own cross attention, layers
2-7 reuse layer 1's (and its keys and values of the context); one transformer serves all 8
layers. Here each shared module exists once (`layers.1.xattn`, `layers.0.tf`); a checkpoint
that holds the shared tensors under every layer's name, or under another layer's, is mapped
onto them (`prism_shared_names`), its copies checked equal. The BioGPT decoder and the
contrastive heads are dropped by name when loading.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Latent queries attend over the context (no context LayerNorm, no biases)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, query_dim // heads
        self.x_norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim, bias=False)

    def keys_values(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = c.shape
        k, v = self.to_kv(c).reshape(b, n, 2, self.heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q = self.to_q(self.x_norm(x)).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, *kv)
        return self.to_out(a.transpose(1, 2).reshape(b, n, d))


class MHSA(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(
            nn.Linear(dim, 2 * dim * mult), GEGLU(), nn.Linear(dim * mult, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class Perceiver(nn.Module):
    def __init__(self, latent_seq=513, latent_dim=1280, context_dim=2560, mhsa_heads=8, perceiver_depth=8,
                 transformer_depth=6, xattn_heads=1, mlp_mult=1):  # fmt: skip
        super().__init__()
        self.depth = perceiver_depth
        self.latents = nn.Parameter(torch.randn(latent_seq, latent_dim))

        def xattn() -> nn.ModuleDict:
            cross = CrossAttention(latent_dim, context_dim, xattn_heads)
            return nn.ModuleDict({"xattn": cross, "ff": FeedForward(latent_dim, mlp_mult)})

        def mhsa() -> nn.ModuleDict:
            return nn.ModuleDict(
                {"mhsa": MHSA(latent_dim, mhsa_heads), "ff": FeedForward(latent_dim, mlp_mult)}
            )

        tf = nn.ModuleList([mhsa() for _ in range(transformer_depth)])
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"xattn": xattn(), "tf": tf}), nn.ModuleDict({"xattn": xattn()})]
        )

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(len(context), -1, -1)
        for i in range(self.depth):
            block = self.layers[min(i, 1)]["xattn"]  # layers 2-7 reuse layer 1's, and its keys and values
            if i <= 1:
                kv = block["xattn"].keys_values(context)
            x = block["xattn"](x, kv) + x
            x = block["ff"](x) + x
            for layer in self.layers[0]["tf"]:
                x = layer["mhsa"](x) + x
                x = layer["ff"](x) + x
        return x


class PerceiverResampler(nn.Module):
    def __init__(self, latent_dim=1280, **perceiver):
        super().__init__()
        self.cls_norm, self.img_norm = nn.LayerNorm(latent_dim), nn.LayerNorm(latent_dim)
        self.perceiver = Perceiver(latent_dim=latent_dim, **perceiver)


class Prism(nn.Module):
    """Virchow tile embeddings [N, 2560] -> PRISM's slide embedding [1, 1280]."""

    def __init__(self, **perceiver):
        super().__init__()
        self.image_resampler = PerceiverResampler(**perceiver)

    def checkpoint_names(self, sd: dict) -> dict:
        """The authors' checkpoint names of shared modules mapped onto this module's."""
        return prism_shared_names(sd)

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        x = self.image_resampler.perceiver(h.unsqueeze(0))
        return self.image_resampler.cls_norm(x[:, 0])


_LAYER = re.compile(r"^(image_resampler\.perceiver\.layers\.)(\d+)\.(xattn|tf)\.(.*)$")


def prism_shared_names(sd: dict) -> dict:
    """A PRISM checkpoint's shared tensors under the one name each has here (`layers.1.xattn`
    for layers 1-7's cross attention, `layers.0.tf` for every layer's transformer); copies that
    differ are left under their own names, so the strict load refuses them."""
    out, seen = {}, {}
    for key, value in sd.items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, i, part, rest = m.groups()
        owner = min(int(i), 1) if part == "xattn" else 0
        name = f"{prefix}{owner}.{part}.{rest}"
        if name in seen and not torch.equal(seen[name], value):
            out[key] = value
            continue
        seen[name] = out[name] = value
    return out
