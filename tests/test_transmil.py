"""TransMIL's whole forward against its authors' file, restated.

`AuthorsTransMIL` is szc19990412/TransMIL models/TransMIL.py (9d6aee5) line for line, built on
the `nystrom-attention` package the authors import, with two changes only: the input width is
an argument (the authors hard-code 1024) and the class token is not moved with `.cuda()`.
bench/bench_plain_toy.py trains it as `transmil_authors`.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_mil.models import create_model

nystrom_attention = pytest.importorskip("nystrom_attention")


class AuthorsTransLayer(nn.Module):
    def __init__(self, norm_layer=nn.LayerNorm, dim=512):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = nystrom_attention.NystromAttention(
            dim=dim,
            dim_head=dim // 8,
            heads=8,
            num_landmarks=dim // 2,
            pinv_iterations=6,
            residual=True,
            dropout=0.1,
        )

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x


class AuthorsPPEG(nn.Module):
    def __init__(self, dim=512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x, H, W):
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((cls_token.unsqueeze(1), x), dim=1)
        return x


class AuthorsTransMIL(nn.Module):
    def __init__(self, n_classes, in_dim=1024):
        super().__init__()
        self.pos_layer = AuthorsPPEG(dim=512)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, 512))
        self.n_classes = n_classes
        self.layer1 = AuthorsTransLayer(dim=512)
        self.layer2 = AuthorsTransLayer(dim=512)
        self.norm = nn.LayerNorm(512)
        self._fc2 = nn.Linear(512, self.n_classes)

    def forward(self, **kwargs):
        h = kwargs["data"].float()  # [B, n, in_dim]
        h = self._fc1(h)  # [B, n, 512]
        H = h.shape[1]
        _H, _W = int(np.ceil(np.sqrt(H))), int(np.ceil(np.sqrt(H)))
        add_length = _H * _W - H
        h = torch.cat([h, h[:, :add_length, :]], dim=1)
        B = h.shape[0]
        cls_tokens = self.cls_token.expand(B, -1, -1)
        h = torch.cat((cls_tokens, h), dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, _H, _W)
        h = self.layer2(h)
        h = self.norm(h)[:, 0]
        logits = self._fc2(h)
        Y_hat = torch.argmax(logits, dim=1)
        Y_prob = F.softmax(logits, dim=1)
        return {"logits": logits, "Y_prob": Y_prob, "Y_hat": Y_hat}


AUTHORS_TO_OURS = {"_fc1.": "fc1.", "pos_layer.": "pos.", "_fc2.": "fc2."}


def authors_state_dict_for_ours(authors: nn.Module) -> dict:
    """The authors' parameters under wsi-mil's names (the two models' only naming differences)."""
    out = {}
    for name, value in authors.state_dict().items():
        for theirs, ours in AUTHORS_TO_OURS.items():
            name = name.replace(theirs, ours, 1) if name.startswith(theirs) else name
        out[name] = value
    return out


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    theirs = AuthorsTransMIL(2, in_dim=64).eval()
    ours = create_model("transmil", 64, 2).eval()
    ours.load_state_dict(authors_state_dict_for_ours(theirs))  # strict: every parameter copied
    return ours, theirs


def test_transmil_forward_matches_the_authors_file_on_a_bag_over_the_landmarks(pair):
    """300 instances: padded to a 18 x 18 grid + class token = 325 tokens > 256 landmarks, so
    both run the Nystrom approximation, PPEG, the class-token read-out and the head."""
    ours, theirs = pair
    x = torch.randn(300, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(data=x[None])["logits"][0], atol=1e-4, rtol=1e-4)


def test_transmil_forward_on_a_short_bag_differs_from_the_authors_only_by_exact_attention(pair):
    """60 instances (65 tokens): ours attends exactly where the package zero-pads to 256
    landmarks and approximates (the deliberate difference in docs/methods.md). Swapping the
    package's attention into ours recovers the authors' logits exactly."""
    ours, theirs = pair
    x = torch.randn(60, 64)
    with torch.no_grad():
        want = theirs(data=x[None])["logits"][0]
        assert (ours(x).logits - want).abs().max() > 1e-3
        for layer, their_layer in ((ours.layer1, theirs.layer1), (ours.layer2, theirs.layer2)):
            layer.attn.forward = their_layer.attn.forward
        try:
            torch.testing.assert_close(ours(x).logits, want, atol=1e-5, rtol=1e-4)
        finally:
            del ours.layer1.attn.forward, ours.layer2.attn.forward


def authors_rollout(theirs: AuthorsTransMIL, x: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020) of the authors' model's class token to the
    instances: (A2 + I) / 2 (A1 + I) / 2, row 0, heads averaged. A1 is the matrix the package's
    first layer applies (`return_attn`, its front padding cut off); A2 the second layer's exact
    softmax attention, from its own query and key weights; padding copies credited to the
    instance they copy, renormalised over the instances."""
    n = len(x)
    side = int(np.ceil(np.sqrt(n)))
    h = theirs._fc1(x[None])
    h = torch.cat([theirs.cls_token, h, h[:, : side * side - n]], dim=1)
    t = h.shape[1]

    def exact(layer, z):  # the layer's softmax attention [heads, t, t] and its exact output
        q, k, v = (u.view(t, 8, -1).transpose(0, 1) for u in layer.attn.to_qkv(layer.norm(z)).chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) * layer.attn.scale, -1)
        out = a @ v + layer.attn.res_conv(v[None])[0]
        return a.mean(0), z + layer.attn.to_out(out.transpose(0, 1).reshape(1, t, -1))

    if t <= 256:  # ours is exact below the landmark count (the deliberate difference)
        a1, h1 = exact(theirs.layer1, h)
    else:
        a1 = theirs.layer1.attn(theirs.layer1.norm(h), return_attn=True)[1].mean(1)[0, -t:, -t:]
        h1 = theirs.layer1(h)
    a2, _ = exact(theirs.layer2, theirs.pos_layer(h1, side, side))
    eye = torch.eye(t)
    row = ((a2 + eye) / 2 @ ((a1 + eye) / 2))[0]
    scores = row[1 : n + 1].clone()
    scores[: t - 1 - n] += row[n + 1 :]
    return scores / scores.sum()


@pytest.mark.parametrize("n", [1, 7, 60, 300])
def test_transmil_attention_is_the_class_tokens_rollout(pair, n):
    """The attention layer of a TransMIL heatmap: the rollout of the class token's attention
    over both layers, on bags with padding copies (7: 2 copies), exact (60) and over the
    landmarks (300: the package's Nystrom matrix)."""
    ours, theirs = pair
    x = torch.randn(n, 64)
    with torch.no_grad():
        got = ours(x).instance_scores
        torch.testing.assert_close(got, authors_rollout(theirs, x), atol=1e-5, rtol=1e-3)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_transmil_small_cohort_dropouts_train_on_part_of_the_bag_and_predict_on_all_of_it():
    """The small-cohort recipe (runs under 300 bags): a training step sees a random 70% of the
    bag with dropout on its projected instances; inference sees the whole bag, deterministically."""
    from wsi_mil.config import TrainConfig
    from wsi_mil.training.optim import resolve_recipe

    small = resolve_recipe("transmil", TrainConfig(), n_bags=48).kwargs({})
    assert small == {"dropout_patch": 0.3, "feature_dropout": 0.25}
    assert resolve_recipe("transmil", TrainConfig(), n_bags=300).kwargs({}) == {}
    torch.manual_seed(0)
    model = create_model("transmil", 16, 2, **small)
    x = torch.randn(40, 16)
    model.train()
    assert len(model(x).instance_scores) == 28
    h, active = model.fc1(x), model.fc1[:2](x) > 0
    assert 0.2 < (h[active] == 0).float().mean() < 0.3  # a quarter of the projected values dropped
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.testing.assert_close(model.fc1(x), model.fc1[:2](x))
    assert len(a.instance_scores) == 40 and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("side", [1, 2, 5])
def test_ppeg_as_one_summed_kernel_equals_its_three_convolutions_and_identity(side):
    """Small grids (bags of 1-25), where the 7 x 7 kernel overhangs the grid on every side."""
    from wsi_mil.models.transmil import PPEG

    torch.manual_seed(0)
    ppeg = PPEG(16)
    x = torch.randn(1, 1 + side * side, 16, requires_grad=True)
    grid = x[:, 1:].transpose(1, 2).reshape(1, 16, side, side)
    parts = ppeg.proj(grid) + grid + ppeg.proj1(grid) + ppeg.proj2(grid)
    want = torch.cat([x[:, :1], parts.flatten(2).transpose(1, 2)], dim=1)
    got = ppeg(x, side)
    torch.testing.assert_close(got, want)
    params = [x, ppeg.proj1.weight, ppeg.proj2.bias]
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [1, 7, 64, 65])
def test_nystrom_residual_on_short_sequences_equals_the_convolution(n):
    """The banded-matmul residual (sequences up to BANDED_MAX_TOKENS) against the package's
    per-head convolution along the sequence, values and weight gradients."""
    from wsi_mil.models.nystrom import NystromAttention

    torch.manual_seed(0)
    attn = NystromAttention(64, 8, 8, 256)
    v = torch.randn(2, 8, n, 8)
    got, want = attn._residual(v), attn.res_conv(v)
    torch.testing.assert_close(got, want)
    w = attn.res_conv.weight
    torch.testing.assert_close(
        torch.autograd.grad(got.square().sum(), w)[0],
        torch.autograd.grad(want.square().sum(), w)[0],
        rtol=1e-5,
        atol=1e-4,  # sums of 2 x 8 x 64 products in another order
    )
