"""Slide encoders' networks, restated from their authors' code with the same module tree (so
their checkpoints load strictly) and the same computation. Each takes one slide's patch
features [N, D] and returns its embedding [1, dim]; dropout layers are kept where the authors
have them (they hold no tensors; the encoders run in eval mode).

- CHIEF (hms-dbmi/CHIEF `models/CHIEF.py` at 1abed33): gated attention over a 768->512 MLP,
  and `WSI_feature` = the attention-weighted mean of the *input* features (768-d; L118-142).
  The classifiers, attention head, text projection and organ embedding are built because the
  checkpoint holds them; the embedding does not use them.
- FEATHER (mahmoodlab/MIL-Lab `src/models/abmil.py` and `layers.py` at dfc3c17): ABMIL with a
  one-layer patch MLP (Linear + ReLU), gated attention, `forward_features` (no classifier).
- TITAN: features/slide_titan.py; PRISM: features/slide_prism.py.
- MADELEINE (mahmoodlab/MADELEINE `madeleine/models/Model.py`, `abmil.py` at 419287d):
  `encode_he`: a 3-layer pre-attention MLP to `n_heads` x 512, one gated attention per head,
  attention-weighted sums flattened (512, heads) and projected to 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .slide_prism import Prism
from .slide_titan import Titan


class GatedAttention(nn.Module):
    """Ilse et al.'s gated attention as CHIEF's `Attn_Net_Gated` / MIL-Lab's
    `GlobalGatedAttention` / MADELEINE's `BatchedABMIL` build it: `attention_a`, `_b`, `_c`."""

    def __init__(self, L: int, D: int, dropout: float = 0.0, n_out: int = 1):
        super().__init__()
        self.attention_a = nn.Sequential(
            nn.Linear(L, D), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else [])
        )
        self.attention_b = nn.Sequential(
            nn.Linear(L, D), nn.Sigmoid(), *([nn.Dropout(dropout)] if dropout else [])
        )
        self.attention_c = nn.Linear(D, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(x) * self.attention_b(x))


class _ChiefAttention(GatedAttention):
    def forward(self, x):  # CHIEF's returns the features beside the scores
        return super().forward(x), x


class ChiefAttHead(nn.Module):
    """CHIEF's `Att_Head` (unused by the embedding; in the checkpoint)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.relu, self.fc2, self.sigmoid = (
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
            nn.Sigmoid(),
        )


CHIEF_SIZES = {
    "xs": [384, 256, 256],
    "small": [768, 512, 256],
    "big": [1024, 512, 384],
    "large": [2048, 1024, 512],
}


class CHIEF(nn.Module):
    """CHIEF's slide aggregator (models/CHIEF.py L82-142); forward -> `WSI_feature` [1, 768]."""

    def __init__(self, size_arg: str = "small", gate: bool = True, dropout: bool = True, n_classes: int = 2):
        super().__init__()
        size = CHIEF_SIZES[size_arg]
        fc = [nn.Linear(size[0], size[1]), nn.ReLU(), *([nn.Dropout(0.25)] if dropout else [])]
        if not gate:
            raise ValueError("CHIEF's released checkpoint uses gated attention")
        fc.append(_ChiefAttention(size[1], size[2], 0.25 if dropout else 0.0))
        self.attention_net = nn.Sequential(*fc)
        self.classifiers = nn.Linear(size[1], n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(size[1], 2) for _ in range(n_classes)])
        self.att_head = ChiefAttHead(size[1], size[2])
        self.text_to_vision = nn.Sequential(nn.Linear(768, size[1]), nn.ReLU(), nn.Dropout(p=0.25))
        self.register_buffer("organ_embedding", torch.randn(19, 768))

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        a, _ = self.attention_net(h)
        a = F.softmax(a.transpose(1, 0), dim=1)
        return a @ h  # `slide_embeddings = torch.mm(A, h_ori)` (L130)


class FeatherABMIL(nn.Module):
    """MIL-Lab's ABMIL (abmil.py L29-105) without a classifier: `forward_features` [1, embed_dim]."""

    def __init__(self, in_dim=1024, embed_dim=512, num_fc_layers=1, dropout=0.25, attn_dim=384, gate=True):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_fc_layers - 1):  # create_mlp(hid_dims=[embed_dim] * (num_fc_layers - 1))
            layers += [nn.Linear(d, embed_dim), nn.ReLU(), nn.Dropout(dropout)]
            d = embed_dim
        self.patch_embed = nn.Sequential(*layers, nn.Linear(d, embed_dim), nn.ReLU())  # end_with_fc=False
        if not gate:
            raise ValueError("FEATHER's released checkpoints use gated attention")
        self.global_attn = GatedAttention(embed_dim, attn_dim, dropout)

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        h = self.patch_embed(h.unsqueeze(0))  # [1, N, E]
        a = F.softmax(self.global_attn(h).transpose(-2, -1), dim=-1)  # [1, 1, N]
        return torch.bmm(a, h).squeeze(1)


class MadeleineABMIL(GatedAttention):
    """MADELEINE's `BatchedABMIL` (abmil.py L8-68): activated scores over the tokens (dim 1)."""

    ACTIVATIONS = {
        "softmax": lambda t: F.softmax(t, dim=1), "leaky_relu": F.leaky_relu, "relu": F.relu,
        "sigmoid": torch.sigmoid,
    }  # fmt: skip

    def __init__(self, input_dim: int, hidden_dim: int, activation: str = "softmax"):
        super().__init__(input_dim, hidden_dim, 0.25)
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"MADELEINE attention activation {activation!r} is not one of its four")
        self.activation = activation

    def forward(self, x):
        return self.ACTIVATIONS[self.activation](super().forward(x))


class MadeleineEmbedder(nn.Module):
    """MADELEINE's `ABMILEmbedder` (Model.py L314-446), regular aggregation, one view."""

    def __init__(self, input_dim: int, hidden_dim: int, n_heads: int, activation: str):
        super().__init__()
        self.n_heads = n_heads
        self.pre_attn = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(hidden_dim, hidden_dim * n_heads), nn.LayerNorm(hidden_dim * n_heads), nn.GELU(),
            nn.Dropout(0.1),
        )  # fmt: skip
        self.attn = nn.ModuleList([MadeleineABMIL(hidden_dim, 512, activation) for _ in range(n_heads)])

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        e = self.pre_attn(bags)  # [B, T, E * heads]
        e = e.unflatten(-1, (-1, self.n_heads))  # einops 'b t (e c) -> b t e c'
        attention = torch.stack([net(e[..., i]) for i, net in enumerate(self.attn)], dim=-1)
        return (e * attention).sum(dim=1)  # [B, E, heads]


class Madeleine(nn.Module):
    """MADELEINE (Model.py L45-108) without stain encodings; forward = `encode_he` [1, 512]."""

    def __init__(self, patch_embedding_dim=512, wsi_encoder_hidden_dim=512, n_heads=4, activation="softmax"):
        super().__init__()
        hidden = 512  # attention_params['params']['hidden_dim'] (L71)
        self.token_projector = nn.Linear(hidden * n_heads, 128)
        self.wsi_embedders = MadeleineEmbedder(
            patch_embedding_dim, wsi_encoder_hidden_dim, n_heads, activation
        )
        self.projector = nn.Linear(hidden * n_heads, hidden)

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        z = self.wsi_embedders(h.unsqueeze(0))
        return self.projector(z.reshape(1, -1))


class MeanPool(nn.Module):
    """TRIDENT's `MeanSlideEncoder` (load.py L541-600): the mean of the patch features."""

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        return h.mean(0, keepdim=True)


BUILDERS = {"chief": CHIEF, "abmil": FeatherABMIL, "madeleine": Madeleine, "titan": Titan, "prism": Prism}
