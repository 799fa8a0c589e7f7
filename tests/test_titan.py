"""TITAN's slide encoder against its authors' code, restated from the hub's remote-code files
(MahmoodLab/TITAN, as copied with the hub's config.json in DIAGNijmegen/unicorn_baseline at
dec3809, src/unicorn_baseline/vision/pathology/titan/): `configuration_titan.py` (TitanVisionConfig's
defaults; TitanConfig sets `attentional_pool = "parallel"`), `vision_transformer.py`
(preprocess_features, Attention's ALiBi path, Block, CustomSequential, AttentionalPooler,
VisionTransformer.forward_features / forward_attn_pool / forward / get_alibi,
build_vision_tower) and `modeling_titan.py` (Titan.__init__, encode_slide_from_patch_features).
Only what a batch of one runs is restated (their B > 1 training branches are not). Random
weights in their layout (the whole Titan, a stand-in text tower included) are saved, loaded
through `create_slide_encoder(weights=...)`, and the embeddings compared."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import WsiMilError
from wsi_mil.features.compat import import_timm
from wsi_mil.features.slide_encoders import create_slide_encoder

Mlp = import_timm().layers.Mlp


def preprocess_features(features, coords, patch_size_lv0):
    features = features.squeeze(0) if features.dim() == 3 else features
    coords = coords.squeeze(0) if coords.dim() == 3 else coords
    offset = coords.min(dim=0).values
    grid_coords = torch.floor_divide(coords - offset, patch_size_lv0)
    grid_offset = grid_coords.min(dim=0).values
    grid_coords = grid_coords - grid_offset
    _H, _W = grid_coords.max(dim=0).values + 1
    feature_grid = torch.zeros((_H, _W, features.size(-1)), device=features.device)
    coords_grid = torch.zeros((_H, _W, 2), dtype=torch.int64, device=coords.device)
    indices = grid_coords[:, 0] * _W + grid_coords[:, 1]
    feature_grid.view(-1, features.size(-1)).index_add_(0, indices, features)
    coords_grid.view(-1, 2).index_add_(0, indices, coords)
    feature_grid = feature_grid.permute(2, 0, 1)
    coords_grid = coords_grid.permute(2, 0, 1)
    bg_mask = torch.any(feature_grid != 0, dim=0)
    return feature_grid.unsqueeze(0), coords_grid.unsqueeze(0), bg_mask.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, pos_encode=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pos_encode = pos_encode
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_bias, bg_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.pos_encode == "alibi":  # B == 1
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=0.0)
        else:  # "none": B == 1
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(
        self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm, pos_encode=None
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, pos_encode=pos_encode)
        self.ls1 = nn.Identity()  # init_values None
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=0.0)
        self.ls2 = nn.Identity()

    def forward(self, x, attn_bias, bg_mask=None):
        x = x + self.ls1(self.attn(self.norm1(x), attn_bias=attn_bias, bg_mask=bg_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class CustomSequential(nn.Module):
    def __init__(self, *modules):
        super().__init__()
        self.modules_list = nn.ModuleList(modules)

    def forward(self, x, attn_mask, bg_mask=None):
        for module in self.modules_list:
            x = module(x, attn_mask, bg_mask)
        return x


class AttentionalPooler(nn.Module):
    def __init__(self, d_model, context_dim, n_head=8, n_queries=256, norm_layer=nn.LayerNorm):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)
        self.n_head = n_head

    def forward(self, x, bg_mask=None):  # B == 1
        x = self.ln_k(x).permute(1, 0, 2).contiguous()
        N = x.shape[1]
        q = self.ln_q(self.query)
        out, _ = self.attn(q.unsqueeze(1).expand(-1, N, -1), x, x, need_weights=False)
        return out.permute(1, 0, 2).contiguous()


class VisionTransformer(nn.Module):
    def __init__(self, grid_size=14, global_pool="token", embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, mlp_patch_embed_dim=768, pos_encode_type="alibi",
                 attentional_pool=None, attn_pooler_queries=128, attn_pooler_heads=8):  # fmt: skip
        super().__init__()
        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731 (partial(nn.LayerNorm, eps=1e-6))
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Sequential(nn.Linear(mlp_patch_embed_dim, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_encode_type = pos_encode_type
        self.num_heads = num_heads
        self.blocks = CustomSequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer, pos_encode_type)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = norm_layer(embed_dim)  # use_fc_norm False for global_pool "token"
        self.attn_pool_type = attentional_pool
        self.attn_pool = AttentionalPooler(embed_dim, embed_dim, attn_pooler_heads, attn_pooler_queries)
        self.attn_pool_contrastive = AttentionalPooler(embed_dim, embed_dim, attn_pooler_heads, 1)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

    def forward_features(self, x, coords=None, bg_mask=None):
        B, nc, w, h = x.shape
        x = x.flatten(2, 3).transpose(1, 2)
        if self.pos_encode_type == "alibi":  # B == 1, not the 6x6 / 14x14 training crops
            attn_bias = self.get_alibi(w, h, bg_mask).repeat(x.shape[0], 1, 1, 1).type(x.dtype).to(x.device)
        else:
            attn_bias = None
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + torch.zeros_like(x)  # interpolate_pos_encoding for "alibi" / "none"
        bg_mask = torch.cat(
            (torch.ones((1, 1), dtype=torch.bool, device=x.device), bg_mask.view(1, -1)), dim=1
        )
        x = x[bg_mask].unsqueeze(0)
        x = self.blocks(x, attn_bias, bg_mask)
        return self.norm(x)

    def forward_attn_pool(self, x, bg_mask=None):
        tokens = self.attn_pool(x, bg_mask=bg_mask)
        if self.attn_pool_type == "parallel":
            pooled = self.attn_pool_contrastive(x, bg_mask=bg_mask)
        else:
            pooled = self.attn_pool_contrastive(tokens, bg_mask=bg_mask)
        return pooled.squeeze(1), tokens

    def forward(self, patch_features, patch_coords, patch_size_lv0, no_proj=False):
        x, coords, bg_mask = preprocess_features(patch_features, patch_coords, patch_size_lv0)
        x = self.forward_features(x, coords=coords, bg_mask=bg_mask)
        pooled, tokens = self.forward_attn_pool(x, bg_mask=bg_mask)
        return pooled if no_proj else pooled @ self.proj

    def get_alibi(self, w, h, bg_mask=None):
        x, y = np.meshgrid(np.arange(w), np.arange(h), indexing="ij")
        if bg_mask is not None:
            x = x[bg_mask.cpu().squeeze(0)]
            y = y[bg_mask.cpu().squeeze(0)]
        points = np.stack([x.ravel(), y.ravel()], axis=1)
        diffs = points[:, None, :] - points[None, :, :]
        dists = np.sqrt(np.sum(diffs**2, axis=-1))

        def get_slopes(n):
            if math.log2(n).is_integer():
                p = 2 ** (-(2 ** -(math.log2(n) - 3)))
                return [p * (p**i) for i in range(n)]
            nearest_power_of_2 = 2 ** math.floor(math.log2(n))
            base_slopes = get_slopes(nearest_power_of_2)
            if nearest_power_of_2 == n:
                return base_slopes
            extra_slopes = get_slopes(2 * nearest_power_of_2)[0::2][: n - nearest_power_of_2]
            return base_slopes + extra_slopes

        slopes = torch.tensor(get_slopes(self.num_heads), dtype=torch.float32).view(self.num_heads, 1, 1)
        n_patches = dists.shape[-1]
        dists_tensor = torch.tensor(dists, dtype=torch.float32).view(1, n_patches, n_patches)
        bias_matrix = dists_tensor * slopes * -1
        embed_len = n_patches + 1
        all_bias = torch.zeros(1, self.num_heads, embed_len, embed_len)
        all_bias[:, :, 1:, 1:] = bias_matrix
        return all_bias


VISION_CONFIG = {  # the hub config.json's vision_config (= TitanVisionConfig defaults, pool "parallel")
    "grid_size": 14, "global_pool": "token", "embed_dim": 768, "depth": 6, "num_heads": 12, "mlp_ratio": 4.0,
    "qkv_bias": True, "mlp_patch_embed_dim": 768, "pos_encode_type": "alibi", "attentional_pool": "parallel",
    "attn_pooler_queries": 128, "attn_pooler_heads": 8,
}  # fmt: skip


class Titan(nn.Module):
    def __init__(self, **changed):
        super().__init__()
        self.vision_encoder = VisionTransformer(**{**VISION_CONFIG, **changed})
        self.text_encoder = nn.Linear(8, 8)  # stands in for the CoCa text tower, dropped on loading

    def encode_slide_from_patch_features(self, patch_features, patch_coords, patch_size_lv0):
        return self.vision_encoder(patch_features, patch_coords, patch_size_lv0, no_proj=True)


def _reference(tmp_path, **changed):
    torch.manual_seed(1)
    ref = Titan(**changed).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def _slide(n=40, size0=1024, seed=2):
    """`n` patches on a grid with gaps (background cells), one all-zero feature row (TITAN
    counts it as background) and coordinates not starting at the origin."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(9 * 8, generator=g)[:n]
    coords = torch.stack([cells % 9, cells // 9], 1) * size0 + torch.tensor([3 * size0 + 17, 5 * size0 + 4])
    x = torch.randn(n, 768, generator=g)
    x[7] = 0
    return x, coords


def test_titan_equals_the_authors_encode_slide(tmp_path):
    ref, path = _reference(tmp_path)
    enc = create_slide_encoder("titan", weights=path)
    assert (enc.info.patch_encoder, enc.info.mpp, enc.info.patch_px, enc.info.dim) == (
        "conch_v15",
        0.5,
        512,
        768,
    )
    for size0 in (1024, 512):  # a 40x slide tiled at 20x, a 20x slide
        x, c = _slide(size0=size0)
        with torch.no_grad():
            want = ref.encode_slide_from_patch_features(x.unsqueeze(0), c.unsqueeze(0), size0)
        torch.testing.assert_close(enc(x, c, size0), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(WsiMilError, match="titan places patches on a grid.*patch_size_level0"):
        enc(x, c)


@pytest.mark.parametrize("changed", [{"num_heads": 8}, {"pos_encode_type": "none"}])
def test_titan_changed_settings_change_the_embedding(tmp_path, changed):
    ref, path = _reference(tmp_path, **changed)
    enc = create_slide_encoder("titan", weights=path)
    x, c = _slide()
    with torch.no_grad():
        assert not torch.allclose(
            enc(x, c, 1024), ref.encode_slide_from_patch_features(x, c, 1024), atol=1e-3
        )
        assert not torch.allclose(enc(x, c, 512), enc(x, c, 1024), atol=1e-3)  # the grid matters


@pytest.mark.parametrize("changed", [{"depth": 5}, {"attn_pooler_queries": 64}, {"mlp_ratio": 2.0}])
def test_titan_changed_shape_settings_are_refused(tmp_path, changed):
    _, path = _reference(tmp_path, **changed)
    with pytest.raises(WsiMilError, match="weights do not fit encoder titan"):
        create_slide_encoder("titan", weights=path)


def test_slide_embed_with_titan_reads_the_level0_patch_size(tmp_path):
    import h5py

    from wsi_mil.formats.features import read_features
    from wsi_mil.pipeline.slide_embed import embed_slides
    from wsi_mil.synthetic import make_feature_cohort

    make_feature_cohort(tmp_path, n_bags=2, n_instances=(20, 30), dim=768, n_key=(3, 5), seed=1)
    files = sorted((tmp_path / "features").glob("*.h5"))
    for p in files:  # CONCH v1.5 at 20x, 512 px; grid_coords are 256 level-0 px apart
        with h5py.File(p, "a") as f:
            f.attrs.update({"encoder": "conch_v15", "target_mpp": 0.5, "patch_size": 512})
            for where in (f.attrs, f["coords"].attrs):  # root and TRIDENT's place
                where.pop("patch_size_level0", None)
    enc = create_slide_encoder("titan", random_weights=True)
    with pytest.raises(WsiMilError, match="patch_size_level0"):
        embed_slides(tmp_path / "features", enc, tmp_path / "no_size")
    for p in files:
        with h5py.File(p, "a") as f:
            f.attrs["patch_size_level0"] = 256
    with h5py.File(files[0], "a") as f:
        f.attrs["overlap"] = 0.25
    with pytest.raises(WsiMilError, match=r"patches overlap \(0.25\).*--overlap 0"):
        embed_slides(tmp_path / "features", enc, tmp_path / "overlap")
    with h5py.File(files[0], "a") as f:
        f.attrs["overlap"] = 0.0
    embed_slides(tmp_path / "features", enc, tmp_path / "titan")
    bag, src = read_features(tmp_path / "titan" / files[0].name), read_features(files[0])
    assert bag.features.shape == (1, 768) and bag.attrs["patch_size_level0"] == 256
    want = enc(torch.from_numpy(src.features), torch.from_numpy(src.coords), 256).numpy()
    np.testing.assert_allclose(bag.features, want, rtol=1e-5, atol=1e-5)
