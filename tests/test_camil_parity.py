"""CAMIL (wsi_mil/models/camil.py) against its authors' whole-slide code, restated below from
olgarithmics/ICLR_CAMIL at commit 5f8ef577e040293794d0f695ceb810f890c5e9f7, not from our module:

- the tile graph: feature_extractor/compute_feats.py `generate_values_resnet` (16 nearest tiles
  by `np.argsort` of sklearn's Euclidean `pairwise_distances` of the coordinates, scipy cosine
  distances of the features) and dataset_utils/camelyon_batch_generator.py `__data_generation`
  (nan_to_num, drop column 0, sklearn l2 `normalize`, exp(-), the row max prepended, 8 columns
  kept, a sparse N x N adjacency);
- nystromformer/nystrom_attention.py `NystromAttention.call` and nystromformer/utils.py
  `MoorePenrosePseudoinverse` (TensorFlow): front zero-padding to a multiple of 256 whenever
  n % 256 > 0, tfa `AdaptiveAveragePooling2D((heads, 256))` landmarks (contiguous segment
  means), the Keras `Conv2D((33, 1), filters=dim_head, groups=heads, padding="same")` residual
  on the channels-last [1, heads, n, dim_head] values, `to_out`, `out[:, -n:]`;
- models/custom_layers.py `encoder.call`, `CustomAttention`, `NeighborAggregator`,
  `MILAttentionLayer` (gated, no biases) and `Last_Sigmoid` (sum pooling; sigmoid, or softmax
  with `--subtyping`); models/camil.py `CAMIL.__init__` (how they are wired).

Keras layers hold kernels [in, out]; `keras_weights` copies ours into that layout (the only
place that reads our parameter names). Both run in float64. Compared on (a) a regular grid with
ties, (b) a bag under 256 instances, (c) a bag over 256 instances, (d) exactly 256: the bag
probability and logit, the `NeighborAggregator` scores (alpha) and the pooling attention k_alpha.

The authors' `np.argsort` uses numpy's default, unstable quicksort, whose order among equal
distances depends on the numpy build and CPU (x86-simd-sort on AVX2 / AVX-512). Ours breaks ties
in tile order (camil.py's docstring); the restatement takes `kind` as an argument: "stable" for
the whole-forward comparison, and the authors' default to check that their neighbours lie at
exactly the distances of ours on a grid full of ties.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.metrics import pairwise_distances
from sklearn.preprocessing import normalize

from wsi_mil.models import create_model
from wsi_mil.models.camil import tile_neighbours


@pytest.fixture(autouse=True)
def one_thread():
    """Float64 forwards with 256 landmarks: one thread is faster on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the authors' code, restated
def authors_neighbours(coords: np.ndarray, kind: str | None = None) -> np.ndarray:
    """compute_feats.py: np.argsort(pairwise_distances(wsi_coords, metric='euclidean', n_jobs=1),
    axis=1)[:, :16]; `kind=None` is their call (numpy's default sort)."""
    d = pairwise_distances(coords, metric="euclidean", n_jobs=1)
    order = np.argsort(d, axis=1) if kind is None else np.argsort(d, axis=1, kind=kind)
    return order[:, :16]


def authors_adjacency(images: np.ndarray, neighbor_indices: np.ndarray) -> np.ndarray:
    """compute_feats.py `generate_values_resnet` (the cosine distances) and the batch generator's
    sparse adjacency, as a dense N x N array."""
    rows = np.asarray([[enum] * len(item) for enum, item in enumerate(neighbor_indices)]).ravel()
    columns = neighbor_indices.ravel()
    values = []
    for row, column in zip(rows, columns):
        m1 = np.expand_dims(images[int(row)], axis=0)
        m2 = np.expand_dims(images[int(column)], axis=0)
        values.append(cdist(m1.reshape(1, -1), m2.reshape(1, -1), "cosine")[0][0])
    values = np.reshape(values, (images.shape[0], neighbor_indices.shape[1]))
    # camelyon_batch_generator.py __data_generation
    values = np.nan_to_num(values)
    idx = neighbor_indices[:, :8]
    rows = np.asarray([[enum] * len(item) for enum, item in enumerate(idx)]).ravel()
    columns = idx.ravel()
    similarities = np.exp(-normalize(values[:, 1:], norm="l2"))
    values = np.concatenate((np.max(similarities, axis=1).reshape(-1, 1), similarities), axis=1)
    values = values[:, :8].ravel()
    adj = np.zeros((len(images), len(images)))
    adj[rows, columns] = values  # tf.sparse.SparseTensor(indices=(rows, columns), values)
    return adj


def authors_pinv(x: torch.Tensor, iteration: int = 6) -> torch.Tensor:
    """nystromformer/utils.py MoorePenrosePseudoinverse.call."""
    abs_inputs = x.abs()
    cols = abs_inputs.sum(-1)
    rows = abs_inputs.sum(-2)
    z = x.transpose(-1, -2) / (cols.max() * rows.max())
    identity = torch.eye(z.shape[-1], dtype=x.dtype)[None]
    for _ in range(iteration):
        inputs_bbm_z = x @ z
        inner = inputs_bbm_z @ (15 * identity - (inputs_bbm_z @ (7 * identity - inputs_bbm_z)))
        z = 0.25 * z @ (13 * identity - inner)
    return z


def keras_conv2d_same(x: torch.Tensor, kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """tf.keras.layers.Conv2D(use_bias=False, groups, padding="same"), channels-last
    x [b, H, W, C], kernel [kh, 1, C / groups, filters]: a cross-correlation over H, zero-padded
    (kh - 1) // 2 above and below; output channel o reads input group o // (filters / groups)."""
    kh, _, cin_g, filters = kernel.shape
    b, height, width, c = x.shape
    top = (kh - 1) // 2
    xp = F.pad(x, (0, 0, 0, 0, top, kh - 1 - top))
    out_g = filters // groups
    k = kernel[:, 0].reshape(kh, cin_g, groups, out_g)  # [kh, c_in local, group, c_out local]
    out = torch.zeros(b, height, width, groups, out_g, dtype=x.dtype)
    for i in range(kh):
        window = xp[:, i : i + height].reshape(b, height, width, groups, cin_g)
        out += torch.einsum("bhwgc,cgo->bhwgo", window, k[i])
    return out.reshape(b, height, width, filters)


def authors_nystrom(
    inputs: torch.Tensor, w: dict, heads=8, dim_head=64, m=256, iters=6, exact_short=False
) -> torch.Tensor:
    """nystromformer/nystrom_attention.py NystromAttention.call (mask None, dropout 0.0).
    `exact_short=True` is our deliberate change, not theirs: n <= m tokens take exact softmax
    attention, unpadded (camil.py's docstring)."""
    n = inputs.shape[1]
    if exact_short and n <= m:
        q, k, v = torch.split(inputs @ w["to_qkv"], heads * dim_head, dim=-1)
        q, k, v = (t.reshape(1, n, heads, dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
        out = torch.softmax(q * dim_head**-0.5 @ k.transpose(-1, -2), dim=-1) @ v
        out = out + keras_conv2d_same(v, w["res_conv"], groups=heads)
        return out.permute(0, 2, 1, 3).reshape(1, n, heads * dim_head) @ w["to_out"] + w["to_out_bias"]
    remainder = n % m
    padding = m - (n % m)
    if remainder > 0:
        inputs = F.pad(inputs, (0, 0, padding, 0))  # tf.pad [[0, 0], [padding, 0], [0, 0]]
    q, k, v = torch.split(inputs @ w["to_qkv"], heads * dim_head, dim=-1)  # Dense, use_bias=False
    b, total = inputs.shape[:2]
    q, k, v = (t.reshape(b, total, heads, dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
    q = q * dim_head**-0.5
    # tfa AdaptiveAveragePooling2D((heads, m)) on [b, h, n, d]: tf.split into equal parts, mean
    q_landmarks = q.reshape(b, heads, m, total // m, dim_head).mean(3)
    k_landmarks = k.reshape(b, heads, m, total // m, dim_head).mean(3)
    sim1 = q @ k_landmarks.transpose(-1, -2)
    sim2 = q_landmarks @ k_landmarks.transpose(-1, -2)
    sim3 = q_landmarks @ k.transpose(-1, -2)
    attn1, attn2, attn3 = (torch.softmax(t, dim=-1) for t in (sim1, sim2, sim3))
    attn2_inv = authors_pinv(attn2, iters)
    out = (attn1 @ attn2_inv) @ (attn3 @ v)
    out = out + keras_conv2d_same(v, w["res_conv"], groups=heads)
    out = out.permute(0, 2, 1, 3).reshape(b, total, heads * dim_head)
    out = out @ w["to_out"] + w["to_out_bias"]
    return out[:, -n:]


def authors_camil(dense: torch.Tensor, adj: torch.Tensor, w: dict, subtyping=False, exact_short=False):
    """models/camil.py: xo, alpha = encoder([bag, adj]); k_alpha = attcls(xo);
    out = class_fc(multiply([k_alpha, xo])). Returns (out, pre-activation, alpha, k_alpha)."""
    # custom_layers.py encoder.call
    encoder_output = authors_nystrom(dense.unsqueeze(0), w, exact_short=exact_short)
    xg = encoder_output.squeeze(0)
    encoder_output = xg + dense
    # CustomAttention(weight_params_dim=256)
    q = encoder_output @ w["wq"]
    k = encoder_output @ w["wk"]
    dk = torch.tensor(float(k.shape[-1]), dtype=dense.dtype)
    attention_matrix = (q @ k.T) / torch.sqrt(dk)
    # NeighborAggregator: sparse adjacency * attention, reduce_sum over axis 1, softmax
    alpha = (adj * attention_matrix).sum(1)
    norm_alpha = torch.softmax(alpha, dim=-1)
    value = dense @ w["wv"] + w["wv_bias"]  # Dense(512)
    xl = norm_alpha[:, None] * value  # multiply([norm_alpha, value]): (N,) expanded to (N, 1)
    wei = torch.sigmoid(-xl)
    squared_wei = wei**2
    xo = (xl * 2 * squared_wei) + 2 * encoder_output * (1 - squared_wei)
    # MILAttentionLayer(weight_params_dim=128, use_gated=True)
    instance = torch.tanh(xo @ w["v"]) * torch.sigmoid(xo @ w["u"])
    k_alpha = torch.softmax(instance @ w["w"], dim=0)  # [N, 1]
    attn_output = k_alpha * xo
    # Last_Sigmoid(pooling_mode="sum")
    x = attn_output.sum(0, keepdim=True) @ w["fc"] + w["fc_bias"]
    out = torch.softmax(x, dim=-1) if subtyping else torch.sigmoid(x)
    return out[0], x[0], alpha, k_alpha[:, 0]


# ---------------------------------------------------------------- our weights, Keras layout
def keras_weights_of(g) -> dict:
    """Our NystromAttention's weights as their TF layer holds them."""
    return {
        "to_qkv": g.to_qkv.weight.T,
        "to_out": g.to_out[0].weight.T,
        "to_out_bias": g.to_out[0].bias,
        "res_conv": g.res_conv.weight.permute(2, 3, 1, 0),  # torch [out, in/g, kh, 1] -> [kh, 1, in/g, out]
    }


def keras_weights(model) -> dict:
    return {
        **keras_weights_of(model.global_attn),
        "wq": model.wq.weight.T,
        "wk": model.wk.weight.T,
        "wv": model.wv.weight.T,
        "wv_bias": model.wv.bias,
        "v": model.pool.a[0].weight.T,
        "u": model.pool.b[0].weight.T,
        "w": model.pool.w.weight.T,
        "fc": model.classifier.weight.T,
        "fc_bias": model.classifier.bias,
    }


def grid(rows: int, cols: int, step: int = 256, holes=()) -> np.ndarray:
    """Tile coordinates in the order a patcher writes them: row by row (y outer, x inner)."""
    coords = np.array([(x * step, y * step) for y in range(rows) for x in range(cols)], dtype=np.int64)
    return np.delete(coords, list(holes), axis=0)


def ring(r: int) -> np.ndarray:
    """The centre and every integer point at distance exactly r from it (60 for r = 325)."""
    a = np.arange(-r, r + 1)
    a, b = np.meshgrid(a, a)
    on = a * a + b * b == r * r
    return np.concatenate([[(0, 0)], np.stack([a[on], b[on]], 1)])


BAGS = {
    "grid_with_ties": lambda: grid(14, 14, holes=(3, 50, 51, 120)),  # 192 tiles, regular grid
    "under_256": lambda: np.random.default_rng(1).integers(0, 60_000, (100, 2)),
    "over_256": lambda: grid(15, 21),  # 315 tiles: padded to 512, two tokens per landmark
    "exactly_256": lambda: grid(16, 16),  # no padding: remainder 0
}


def compare(coords: np.ndarray, n_classes: int = 2, seed: int = 0, kind: str | None = "stable", **kwargs):
    """Our CAMIL (`kwargs` for create_model) and the restatement with its weights, on one bag."""
    torch.manual_seed(seed)
    model = create_model("camil", 512, n_classes, **kwargs).double().eval()
    feats = torch.randn(len(coords), 512, dtype=torch.float64)
    feats[:, :64] += 2.0 * torch.randn(1, 64, dtype=torch.float64)  # correlated tiles: cosine distances < 1
    adj = torch.as_tensor(authors_adjacency(feats.numpy(), authors_neighbours(coords, kind)))
    with torch.no_grad():
        ours = model(feats, torch.as_tensor(coords))
        theirs = authors_camil(
            feats,
            adj,
            keras_weights(model),
            subtyping=n_classes > 2,
            exact_short=model.global_attn.exact_short,
        )
    return ours, *theirs


def differences(ours, out, pre, alpha, k_alpha) -> dict:
    return {
        "logit": (ours.logits[1] - ours.logits[0] - pre[0]).abs().item(),
        "probability": (torch.softmax(ours.logits, 0)[1] - out[0]).abs().item(),
        "alpha": (ours.extras["neighbour_scores"] - alpha).abs().max().item(),
        "k_alpha": (ours.instance_scores - k_alpha).abs().max().item(),
    }


@pytest.mark.parametrize("bag", list(BAGS))
def test_camil_with_their_padding_is_the_authors_whole_slide_model(bag):
    """`exact_short=False`: every bag takes their padded Nystrom path."""
    ours, out, pre, alpha, k_alpha = compare(BAGS[bag](), exact_short=False)
    diffs = differences(ours, out, pre, alpha, k_alpha)
    assert max(diffs.values()) < 1e-9, diffs
    # the comparison has something to compare: attention is not uniform, logits are not tiny
    assert k_alpha.max() > 1.5 / len(k_alpha) and alpha.std() > 1e-3 and pre.abs().item() > 1e-3


def test_camil_default_is_the_authors_model_but_for_its_documented_attention_on_short_bags():
    """Our defaults on the grid with ties (192 tiles): the restatement with `exact_short` as our
    default sets it (a deliberate difference, camil.py) and the ties in tile order."""
    ours, out, pre, alpha, k_alpha = compare(BAGS["grid_with_ties"]())
    diffs = differences(ours, out, pre, alpha, k_alpha)
    assert max(diffs.values()) < 1e-9, diffs


def test_camil_subtyping_head_is_the_authors_softmax():
    """`--subtyping --n_classes 3`: Last_Sigmoid(output_dim=3) with a softmax; ours: 3 logits."""
    ours, out, pre, alpha, k_alpha = compare(BAGS["under_256"](), n_classes=3)
    torch.testing.assert_close(torch.softmax(ours.logits, 0), out, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.logits - ours.logits.mean(), pre - pre.mean(), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.instance_scores, k_alpha, atol=1e-12, rtol=0)


def test_camil_neighbours_on_a_grid_differ_from_the_authors_only_among_equal_distances():
    """With numpy's default argsort (theirs), the tiles kept (8) and L2-normalised together (16)
    lie at exactly the distances of ours; only which of several equidistant tiles is taken may
    differ (their order depends on the numpy build, see camil.py)."""
    coords = BAGS["grid_with_ties"]()
    d = pairwise_distances(coords, metric="euclidean", n_jobs=1)
    theirs = authors_neighbours(coords)
    ours = tile_neighbours(torch.as_tensor(coords)).numpy()
    take = np.take_along_axis
    for cut in (8, 16):
        np.testing.assert_array_equal(
            np.sort(take(d, ours[:, :cut], 1), 1), np.sort(take(d, theirs[:, :cut], 1), 1)
        )
    # the grid has ties at both cuts: 4 diagonal neighbours for 3 places in the first 8
    assert (take(d, ours, 1)[:, 7] == take(d, ours, 1)[:, 8]).mean() > 0.5


@pytest.mark.parametrize(
    "name,coords",
    [
        ("grid", grid(14, 14, holes=(3, 50, 51, 120))),
        ("grid_unit_step", grid(9, 7, step=1)),
        ("random_float", np.random.default_rng(0).random((300, 2)) * 1e4),
        ("duplicates", np.concatenate([grid(5, 5), grid(5, 5)[:7]])),
        # 60 lattice points at distance 325 from the centre: the KD-tree's candidates must widen
        ("ring", ring(325)),
        ("tiny", grid(1, 5)),
    ],
)
def test_tile_neighbours_are_a_stable_argsort_of_the_distances(name, coords):
    expected = authors_neighbours(coords, kind="stable")
    got = tile_neighbours(torch.as_tensor(coords)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_one_token_closed_form_is_the_padded_nystrom_forward():
    """`instance_logits` (each patch a bag of one) runs the padded one-token Nystrom attention in
    closed form (2 x 2 matrices); it equals the padded 256-token forward, token by token."""
    from wsi_mil.models.nystrom import NystromAttention

    torch.manual_seed(0)
    attn = NystromAttention(512, 8, 64, 256, dropout=0.0, residual="heads", exact_short=False)
    attn = attn.double().eval()
    x = 3 * torch.randn(2, 512, dtype=torch.float64)
    with torch.no_grad():
        batched = attn.forward_single(x)
        one_by_one = torch.cat([attn(x[i : i + 1, None])[:, 0] for i in range(len(x))])
        restated = torch.cat(
            [authors_nystrom(x[i : i + 1, None], keras_weights_of(attn))[:, 0] for i in range(len(x))]
        )
    torch.testing.assert_close(batched, one_by_one, atol=1e-10, rtol=0)
    torch.testing.assert_close(batched, restated, atol=1e-10, rtol=0)
