import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from wsi_mil.models import create_model, list_models
from wsi_mil.models.psmil import PSMIL, alignment_loss

D = 32
ALL = list_models()


@pytest.fixture(autouse=True)
def one_thread():
    """Fixed thread count: parallel reductions sum in a thread-dependent order, which made the
    toy-problem fits differ between a lone run and a full run on idle cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_bags(n_bags=24, n=30, dim=D, seed=0):
    """Bags whose label is set by a few key instances shifted along one direction."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    bags = []
    for i in range(n_bags):
        x = torch.randn(n, dim, generator=g)
        y = i % 2
        if y:
            k = torch.randint(1, 4, (1,), generator=g).item()
            x[:k] += 4 * direction
        coords = (
            torch.stack(torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij"), -1).reshape(-1, 2)[
                :n
            ]
            * 256
        )
        bags.append((x, coords, torch.tensor(y)))
    return bags


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 7, 5000])
def test_shapes_and_finite_gradients(name, n):
    torch.manual_seed(0)
    model = create_model(name, D, 2)
    x = torch.randn(n, D)
    coords = torch.randint(0, 100_000, (n, 2))
    out = model(x, coords)
    assert out.logits.shape == (2,)
    assert out.instance_scores.shape == (n,)
    loss = model.loss(out, torch.tensor(1))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ALL)
def test_eval_is_deterministic(name):
    torch.manual_seed(0)
    model = create_model(name, D, 3).eval()
    x, coords = torch.randn(50, D), torch.randint(0, 5000, (50, 2))
    with torch.no_grad():
        a, b = model(x, coords), model(x, coords)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.instance_scores, b.instance_scores)


@pytest.mark.parametrize("name", ALL)
def test_training_on_two_threads_is_reproducible(name):
    """Same seed and bags on two intra-op threads: the same weights, so a crossval rerun
    reproduces its epochs (CAMIL's neighbour gather once summed its gradients in a
    thread-dependent order)."""
    torch.set_num_threads(2)  # the autouse fixture restores the count

    def train():
        torch.manual_seed(0)
        model = create_model(name, D, 2)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for x, coords, y in toy_bags(16):
            loss = model.loss(model(x, coords), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(), train())


@pytest.mark.parametrize("name", ["abmil", "dsmil", "psmil", "dtfd"])
def test_permutation_invariance(name):
    torch.manual_seed(0)
    model = create_model(name, D, 2).eval()
    x = torch.randn(40, D)
    perm = torch.randperm(40)
    with torch.no_grad():
        a, b = model(x), model(x[perm])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.instance_scores[perm], b.instance_scores, rtol=1e-5, atol=1e-6)


def fit_toy(model, epochs: int = 15, bags=None, scored=None, shuffle_seed: int | None = None) -> float:
    """Train on `bags` (default: the toy bags; Adam 1e-3, one bag per step, in a seeded shuffled
    order when `shuffle_seed` is given); returns the AUC on `scored` (default: the training
    bags; threshold-free: the pipeline picks each model's threshold on validation, and DSMIL's
    binary BCE form is not centred on p = 0.5)."""
    bags = toy_bags() if bags is None else bags
    scored = bags if scored is None else scored
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for epoch in range(epochs):
        model.train()
        model.set_epoch(epoch)
        for i in order.permutation(len(bags)) if order is not None else range(len(bags)):
            x, c, y = bags[i]
            out = model(x, c)
            loss = model.loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.on_train_step(out, y)
    model.eval()
    with torch.no_grad():
        p = [torch.softmax(model(x, c).logits, -1)[1].item() for x, c, _ in scored]
    return float(roc_auc_score([int(y) for *_, y in scored], p))


@pytest.mark.parametrize("name", ALL + ["abmil_prob"])
def test_fits_key_instance_toy_problem(name):
    torch.manual_seed(0)
    model = create_model("abmil", D, 2, pooling="prob") if name == "abmil_prob" else create_model(name, D, 2)
    auc = fit_toy(model)
    assert auc >= 0.98, auc


def test_psmil_prototypes_move_toward_class_means_in_training_only():
    torch.manual_seed(0)
    model = PSMIL(D, 2, gamma=0.05)
    bags = toy_bags(n_bags=16)
    q0 = model.pool.prototypes.clone()
    model.train()
    for x, c, y in bags:
        out = model(x, c)
        model.on_train_step(out, y)
    q1 = model.pool.prototypes.clone()
    assert not torch.allclose(q0, q1)
    torch.testing.assert_close(q1.norm(dim=0), torch.ones(2))
    # each prototype is closer to the mean embedding of the instances assigned to it
    with torch.no_grad():
        h = torch.cat([model.fc(x) for x, _, _ in bags])
        assign = model.pool.probabilities(h).argmax(1)
        for j in range(2):
            if (assign == j).any():
                mean = torch.nn.functional.normalize(h[assign == j].mean(0), dim=0)
                assert mean @ q1[:, j] > mean @ q0[:, j]
    model.eval()
    for x, c, y in bags:
        out = model(x, c)
        model.on_train_step(out, y)
    torch.testing.assert_close(model.pool.prototypes, q1)


def key_attention_auc(model, bags, seed: int) -> float:
    """AUC of the attention for the toy's key instances (shifted > 2 along its direction), over
    the positive bags."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    model.eval()
    with torch.no_grad():
        pos = [(model(x, c).instance_scores, (x @ direction) > 2) for x, c, y in bags if int(y)]
    return roc_auc_score(torch.cat([k for _, k in pos]).numpy(), torch.cat([a for a, _ in pos]).numpy())


@pytest.mark.parametrize("seed", [4, 7, 9])
def test_psmil_attention_starts_toward_the_positive_class_and_finds_the_key_instances(seed):
    """With torch's random start of w, the sign of w1 - w0 (which class's probability draws
    attention) is a coin toss, and 15 toy epochs leave it inverted on these three seeds (key
    AUC 0.07 / 0.25 / 0.26; the demo: 3 of 5 fold models). Starting toward class 1 they find
    the key instances."""
    torch.manual_seed(seed)
    bags = toy_bags(seed=seed)
    model = create_model("psmil", D, 2)
    assert fit_toy(model, epochs=15, bags=bags) > 0.95
    assert key_attention_auc(model, bags, seed) > 0.9


def test_psmil_attention_class_comes_from_the_class_names():
    assert PSMIL.kwargs_for_classes(["normal", "tumor"]) == {"attention_class": 1}
    assert PSMIL.kwargs_for_classes(["metastasis", "normal"]) == {"attention_class": 0}
    assert PSMIL.kwargs_for_classes(["LUAD", "LUSC"]) == {}
    w = create_model("psmil", D, 2, attention_class=0).pool.w.weight.detach().ravel()
    assert w[0] > w[1]


def test_psmil_confident_update_moves_only_label_column():
    torch.manual_seed(0)
    model = PSMIL(D, 2, gamma=0.01, prototype_update="confident", prototype_init="random").train()
    q0 = model.pool.prototypes.clone()
    x = torch.randn(20, D)
    out = model(x)
    model.on_train_step(out, torch.tensor(1))
    q1 = model.pool.prototypes
    torch.testing.assert_close(q1[:, 0], q0[:, 0])
    assert not torch.allclose(q1[:, 1], q0[:, 1])


def test_alignment_loss_zero_when_views_agree_confidently_positive_otherwise():
    confident = torch.tensor([[1 - 1e-7, 1e-7], [1e-7, 1 - 1e-7]])
    assert alignment_loss([confident, confident]).item() < 1e-5
    unsure = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    disagree = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert alignment_loss([unsure, disagree]).item() > 0.1
    model = PSMIL(D, 2, align_lambda=0.1, align_tau=10).train()
    model.set_epoch(0)
    assert model(torch.randn(10, D)).aux_loss is None  # lambda * min(0, tau) = 0
    model.set_epoch(3)
    aux = model(torch.randn(10, D)).aux_loss
    assert aux is not None and aux.item() > 0
    model.eval()
    assert model(torch.randn(10, D)).aux_loss is None


def test_unknown_model_is_a_clear_error():
    from wsi_mil.errors import WsiMilError

    with pytest.raises(WsiMilError, match="unknown model"):
        create_model("clam_xl", D, 2)


def test_matches_torchmil_abmil_and_dsmil():
    tm = pytest.importorskip("torchmil.models")
    torch.manual_seed(0)
    x = torch.randn(1, 25, D)
    ours = create_model("abmil", D, 2).eval()
    theirs = tm.ABMIL(in_shape=(D,), att_dim=256, gated=True, feat_ext=ours.fc).eval()
    with torch.no_grad():
        theirs(torch.randn(1, 3, D))  # materialise lazy layers
        theirs.pool.fc1.module.weight.copy_(ours.pool.a[0].weight)
        theirs.pool.fc1.module.bias.copy_(ours.pool.a[0].bias)
        theirs.pool.fc_gated.module.weight.copy_(ours.pool.b[0].weight)
        theirs.pool.fc_gated.module.bias.copy_(ours.pool.b[0].bias)
        theirs.pool.fc2.weight.copy_(ours.pool.w.weight)
        ours.pool.w.bias.zero_()  # torchmil's scorer has no bias (softmax-invariant anyway)
        ours.classifier.weight[0].zero_()
        ours.classifier.bias[0].zero_()
        theirs.classifier.module.weight.copy_(ours.classifier.weight[1:])
        theirs.classifier.module.bias.copy_(ours.classifier.bias[1:])
        y_t, f_t = theirs(x, return_att=True)
        out = ours(x[0])
    torch.testing.assert_close(out.logits[1], y_t[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.instance_scores, torch.softmax(f_t[0], 0), atol=1e-5, rtol=1e-5)

    ours = create_model("dsmil", D, 2, binary=True).eval()  # the authors' one-output form
    theirs = tm.DSMIL(in_shape=(D,), att_dim=128, nonlinear_q=True, nonlinear_v=False).eval()
    with torch.no_grad():
        theirs.inst_classifier.load_state_dict(ours.instance_classifier.state_dict())
        theirs.q_nn.load_state_dict(ours.q.state_dict())
        theirs.bag_classifier.weight.copy_(ours.fcc.weight.view(1, D))
        theirs.bag_classifier.bias.copy_(ours.fcc.bias)
        y_t, a_t, inst_t = theirs(x, return_att=True, return_inst_pred=True)
        out = ours(x[0])
    torch.testing.assert_close(out.logits[1] - out.logits[0], y_t[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(out.logits, 0)[1], torch.sigmoid(y_t[0]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.extras["attention"][:, 0], a_t[0].view(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.extras["max_logits"][0], inst_t[0].max(), atol=1e-5, rtol=1e-5)


def test_dtfd_makes_exactly_n_groups_pseudo_bags_as_array_split():
    """The authors split with np.array_split: 9 instances in 4 groups give 4 pseudo-bags
    (3, 2, 2, 2); torch.chunk would give 3."""
    from wsi_mil.models import create_model

    model = create_model("dtfd", 8, 2, n_groups=4).eval()
    groups = model._split(torch.randn(9, 8))
    assert [len(g) for g in groups] == [3, 2, 2, 2]
    assert sorted(torch.cat(groups).tolist()) == list(range(9))
    assert len(model._split(torch.randn(2, 8))) == 2


def camil_bag(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # distinct pairwise distances, so every nearest-neighbour order is unambiguous
    coords = torch.randperm(10_000, generator=g)[: 2 * n].view(n, 2).double() * 1.0 + torch.rand(
        n, 2, generator=g
    )
    return torch.randn(n, 512, generator=g), coords


def test_camil_neighbour_softmax_matches_torchmil():
    """torchmil's CAMILSelfAttention with our q/k weights and our graph as its adjacency gives
    our neighbour-summed attention (torchmil's values differ: from T, see camil.py)."""
    tm = pytest.importorskip("torchmil.models.camil")
    from wsi_mil.models.camil import camil_graph

    torch.manual_seed(0)
    x, coords = camil_bag()
    model = create_model("camil", 512, 2).eval()
    theirs = tm.CAMILSelfAttention(512, att_dim=256).eval()
    with torch.no_grad():
        t = x + model.global_attn(x.unsqueeze(0))[0]
        theirs.qk_nn.weight.copy_(torch.cat([model.wq.weight, model.wk.weight]))
        theirs.v_nn.weight.copy_(torch.eye(512))
        nbr, w = camil_graph(x, coords, 8)
        adj = torch.zeros(40, 40).scatter_(1, nbr, w)
        local = theirs(t.unsqueeze(0), adj.unsqueeze(0))[0]  # softmax(w) * v with v = T
        ours = torch.softmax(model.neighbour_attention(t, nbr, w), 0).unsqueeze(1) * t
    torch.testing.assert_close(ours, local, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_sparse_inversion_runs_on_every_model(name):
    """Key-instance scores exist for every model: the inversion needs the bag's gradient."""
    from wsi_mil.localization.inversion import sparse_inversion

    torch.manual_seed(0)
    model = create_model(name, D, 2).eval()
    x, coords = torch.randn(30, D), torch.randint(0, 5000, (30, 2))
    res = sparse_inversion(model, x, coords, 1, steps=3)
    assert res.scores.shape == (30,) and torch.isfinite(res.scores).all() and res.scores.abs().sum() > 0
    assert (
        res.kept
        and 0 <= res.steps_kept <= 3
        and set(res.readings) == {"evidence", "inverted_attention", "survival", "change"}
    )


VARIANTS = [(n, {}) for n in ALL] + [
    ("dsmil", {"average": True}), ("dsmil", {"binary": True}), ("dsmil", {"binary": True, "average": True}),
    ("dtfd", {"distill": "MaxMinS"}), ("dtfd", {"distill": "MaxS"}), ("psmil", {"hard_mix": True}),
    ("abmil", {"pooling": "prob"}),
]  # fmt: skip


@pytest.mark.parametrize("name,kwargs", VARIANTS)
@pytest.mark.parametrize("n_classes", [2, 3])
def test_instance_logits_are_the_model_on_each_patch_as_a_bag_of_one(name, kwargs, n_classes):
    """The batched instance stream the heatmap's probabilities come from equals running the bag
    model once per patch on a one-instance bag (what `instance_logits` promises)."""
    from wsi_mil.models.base import single_instance_logits

    torch.manual_seed(1)
    model = create_model(name, D, n_classes, **kwargs).eval()
    x, coords = torch.randn(9, D), torch.randint(0, 5000, (9, 2))
    with torch.no_grad():
        batched = model.instance_logits(x, coords)
        one_by_one = single_instance_logits(model, x, coords)
    assert batched.shape == (9, n_classes)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and a one-patch bag's own logits are its instance logits
        torch.testing.assert_close(model(x[:1], coords[:1]).logits, batched[0], atol=1e-5, rtol=1e-5)


def test_transmil_ppeg_matches_torchmil():
    """TransMIL's PPEG (7x7 + 5x5 + 3x3 depthwise convolutions plus identity on the square
    grid, class token passed through) with copied weights equals torchmil's."""
    tm = pytest.importorskip("torchmil.models.transmil")
    from wsi_mil.models.transmil import PPEG

    torch.manual_seed(0)
    ours, theirs = PPEG(64), tm.PPEG(64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1 + 36, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 6), theirs(x, 6, 6), atol=1e-6, rtol=1e-5)


def test_transmil_nystrom_attention_matches_the_package_its_authors_import():
    """TransMIL imports `nystrom_attention.NystromAttention` (dim_head dim // 8, 8 heads, dim // 2
    landmarks, 6 pseudo-inverse steps, residual conv 33). With its weights copied ours equals it
    on sequences longer than the landmarks; on shorter ones ours is exact softmax attention (a
    deliberate difference, docs/methods.md), the package's an approximation of it."""
    pkg = pytest.importorskip("nystrom_attention")
    from wsi_mil.models.nystrom import NystromAttention

    torch.manual_seed(0)
    dim = 64
    ours = NystromAttention(dim, 8, dim // 8, dim // 2).eval()
    theirs = pkg.NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2,
                                  pinv_iterations=6, residual=True, dropout=0.1).eval()  # fmt: skip
    theirs.load_state_dict(ours.state_dict())  # the same parameter names: loaded strictly
    with torch.no_grad():
        for n in (33, 64 + 5, 200):  # longer than the 32 landmarks, padded or not
            x = torch.randn(1, n, dim)
            torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-4)
        short = torch.randn(1, 20, dim)
        q, k, v = ours._qkv(short)
        exact = torch.softmax(q * ours.scale @ k.transpose(-1, -2), -1) @ v + ours.res_conv(v)
        exact = ours.to_out(exact.transpose(1, 2).reshape(1, 20, -1))
        torch.testing.assert_close(ours(short), exact, atol=1e-5, rtol=1e-4)
        gap = (theirs(short) - exact).abs().max() / exact.abs().max()
        assert gap > 1e-3  # the package approximates even here: that is the difference kept
        # `weigh` (TransMIL's attention rollout): row weights times the attention matrix the
        # layer applies, the package's `return_attn` matrix on long sequences, head mean
        for n in (33, 64 + 5):
            x, r = torch.randn(1, n, dim), torch.rand(n)
            attn = theirs(x, return_attn=True)[1]  # [1, heads, n + pad, n + pad]
            pad = attn.shape[-1] - n
            want = (torch.nn.functional.pad(r, (pad, 0)) @ attn).mean(1)[0, pad:]
            torch.testing.assert_close(ours.weigh(x, r), want, atol=1e-5, rtol=1e-4)
        r = torch.rand(20)
        want = (r @ torch.softmax(q * ours.scale @ k.transpose(-1, -2), -1)).mean(1)[0]
        torch.testing.assert_close(ours.weigh(short, r), want)


def test_psmil_default_starts_at_the_first_bag_and_moves_only_the_label_column():
    """The authors' start (every column the first training bag's mean) and label update."""
    torch.manual_seed(0)
    model = PSMIL(D, 2).train()
    x = torch.randn(20, D)
    out = model(x)
    model.on_train_step(out, torch.tensor(1))
    q = model.pool.prototypes
    start = torch.nn.functional.normalize(out.extras["h"].mean(0), dim=0)
    torch.testing.assert_close(q[:, 0], start)  # column 0: initialised, not moved
    assert not torch.allclose(q[:, 1], start) and torch.allclose(q.norm(dim=0), torch.ones(2))
    model.eval()
    before = q.clone()
    model.on_train_step(model(torch.randn(20, D)), torch.tensor(0))
    torch.testing.assert_close(model.pool.prototypes, before)  # evaluation never moves Q


def test_psmil_authors_attention_mixes_soft_and_hard_assignments_without_gradient_through_p():
    """`hard_mix` + `detach_probs` + scale 1 is PSAMIL.py's psa pooling: the mean of softmax(P w)
    and softmax(onehot(argmax P) w), P computed without gradient."""
    torch.manual_seed(0)
    model = PSMIL(D, 2, hard_mix=True, detach_probs=True, attn_scale=1.0).train()
    x = torch.randn(20, D)
    model.on_train_step(model(x), torch.tensor(1))  # prototypes initialised and apart
    out = model(x)
    pool, h = model.pool, out.extras["h"]
    p = torch.softmax(h @ pool.prototypes, dim=-1)
    hard = torch.nn.functional.one_hot(p.argmax(-1), 2).float()
    expected = (torch.softmax(pool.w(p).squeeze(-1), 0) + torch.softmax(pool.w(hard).squeeze(-1), 0)) / 2
    torch.testing.assert_close(out.instance_scores, expected)
    out.instance_scores[0].backward()  # attention alone: reaches w, never the projection
    assert pool.w.weight.grad.abs().sum() > 0 and model.fc[0].weight.grad is None


def test_each_model_trains_with_its_registered_recipe_unless_overridden():
    from wsi_mil.config import TrainConfig
    from wsi_mil.training.optim import Lookahead, build_optimizer, resolve_recipe

    dsmil = resolve_recipe("dsmil", TrainConfig())
    assert (dsmil.lr, dsmil.weight_decay, dsmil.betas, dsmil.schedule) == (1e-4, 1e-3, (0.5, 0.9), "cosine")
    assert "dsmil-wsi" in dsmil.source
    assert resolve_recipe("dtfd", TrainConfig()).grad_clip == 5.0
    assert resolve_recipe("transmil", TrainConfig()).optimizer == "adam"  # measured deviation
    overridden = resolve_recipe("dsmil", TrainConfig(lr=1e-3, optimizer="radam_lookahead"))
    assert (overridden.lr, overridden.weight_decay) == (1e-3, 1e-3)  # only the fields set change
    opt = build_optimizer(create_model("transmil", D, 2), overridden)
    assert isinstance(opt, Lookahead) and isinstance(opt.inner, torch.optim.RAdam)
    shared = resolve_recipe("dsmil", TrainConfig(recipe="shared"))
    assert (shared.optimizer, shared.lr, shared.weight_decay) == ("adam", 2e-4, 1e-4)


def test_small_cohorts_get_a_models_small_cohort_recipe_and_the_user_still_wins():
    from wsi_mil.config import TrainConfig
    from wsi_mil.models.recipe import SMALL_COHORT_BAGS
    from wsi_mil.training.optim import resolve_recipe

    small = resolve_recipe("dsmil", TrainConfig(), n_bags=SMALL_COHORT_BAGS - 1)
    assert small.lr == 2e-3 and small.kwargs({}) == {"dropout_patch": 0.8}
    assert (small.optimizer, small.weight_decay) == ("adamw", 0.5)  # decoupled: no query collapse
    assert small.betas == (0.5, 0.9) and small.schedule == "cosine"  # the rest stays the authors'
    assert small.init == "default"  # measured against the authors' orthogonal (dsmil.py)
    for cfg, n in ((TrainConfig(), SMALL_COHORT_BAGS), (TrainConfig(small_cohort=False), 10)):
        authors = resolve_recipe("dsmil", cfg, n_bags=n)
        assert authors.lr == 1e-4 and authors.kwargs({}) == {} and authors.init == "orthogonal"
    user = resolve_recipe("dsmil", TrainConfig(lr=1e-3), n_bags=10)
    assert user.lr == 1e-3 and user.kwargs({"dropout_patch": 0.0}) == {"dropout_patch": 0.0}
    assert resolve_recipe("abmil", TrainConfig(), n_bags=10) == resolve_recipe("abmil", TrainConfig())


def test_dsmil_small_cohort_recipe_keeps_its_attention_on_digit_bags():
    """Real 8x8 digits (pixels in [0, 1]) in bags of 10-30, a bag positive with a nine: with
    Adam's coupled L2 (1e-3) at the small-cohort lr 2e-3 the query network shrank to zero
    within one epoch (weight norm 8 -> 0.06) and attention was the same on every instance; the
    recipe's decoupled decay keeps it."""
    from sklearn.datasets import load_digits

    from wsi_mil.config import TrainConfig
    from wsi_mil.training.optim import apply_init, build_optimizer, resolve_recipe

    digits = load_digits()
    x, nine = torch.tensor(digits.data / 16.0, dtype=torch.float32), digits.target == 9
    rng = np.random.default_rng(0)
    bags = []
    for i in range(60):
        n, k = int(rng.integers(10, 31)), int(rng.integers(1, 4)) * (i % 2)
        idx = np.concatenate([rng.choice(np.flatnonzero(nine), k), rng.choice(np.flatnonzero(~nine), n - k)])
        bags.append((x[idx], torch.tensor(i % 2)))
    recipe = resolve_recipe("dsmil", TrainConfig(), n_bags=len(bags))
    torch.manual_seed(0)
    model = create_model("dsmil", 64, 2, **recipe.kwargs({}))
    apply_init(model, recipe)
    opt = build_optimizer(model, recipe, fused=True)
    for _ in range(2):
        for i in rng.permutation(len(bags)):
            out = model(bags[i][0])
            loss = model.loss(out, bags[i][1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        spread = [model(b).instance_scores.std().item() for b, y in bags if y == 1]
    assert model.q[0].weight.norm() > 1.0 and min(spread) > 1e-3, (model.q[0].weight.norm(), min(spread))


def test_dsmil_average_is_the_mean_of_both_streams_probabilities():
    torch.manual_seed(0)
    model = create_model("dsmil", D, 2, average=True, binary=True).eval()
    x = torch.randn(30, D)
    with torch.no_grad():
        out = model(x)
    streams = torch.sigmoid(out.extras["max_logits"]) + torch.sigmoid(out.extras["outputs"])
    torch.testing.assert_close(torch.softmax(out.logits, -1)[1], streams[0] / 2)
    model = create_model("dsmil", D, 2, average=True).eval()  # two outputs: each averaged
    with torch.no_grad():
        out = model(x)
    streams = torch.sigmoid(out.extras["max_logits"]) + torch.sigmoid(out.extras["outputs"])
    torch.testing.assert_close(torch.sigmoid(out.logits), streams / 2)


def test_dsmil_patch_dropout_trains_on_a_random_subset_and_infers_on_the_whole_bag():
    """The authors' --dropout_patch: each training step sees (1 - p) of the bag; inference
    sees every instance, deterministically."""
    torch.manual_seed(0)
    model = create_model("dsmil", D, 2, dropout_patch=0.8)
    x = torch.randn(50, D)
    train_a, train_b = model.train()(x), model(x)
    assert len(train_a.instance_scores) == len(train_b.instance_scores) == int(50 * (1 - 0.8))  # as theirs
    assert not torch.equal(train_a.extras["outputs"], train_b.extras["outputs"])  # other subsets
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
    assert len(a.instance_scores) == 50
    torch.testing.assert_close(a.logits, b.logits)


def test_dtfd_clips_each_module_as_its_authors_do_not_one_global_norm():
    """Main_DTFD_MIL.py clips dimReduction, attention, classifier and the tier-2 attCls one by
    one (norm 5 each): the groups cover every parameter once, and each ends at norm <= 5 where
    one global clip would have left the four together at 5."""
    model = create_model("dtfd", D, 2)
    groups = model.clip_groups()
    ids = [id(p) for g in groups for p in g]
    assert len(groups) == 4 and sorted(ids) == sorted(id(p) for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    for g in groups:  # what training does with the recipe's grad_clip
        torch.nn.utils.clip_grad_norm_(g, 5.0)
    norms = [torch.norm(torch.stack([p.grad.norm() for p in g])) for g in groups]
    assert all(abs(float(n) - 5.0) < 1e-3 for n in norms)
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(total) == pytest.approx(10.0, rel=1e-3)  # sqrt(4) x 5
    assert len(create_model("abmil", D, 2).clip_groups()) == 1  # the default: one global norm


def test_camil_trains_without_weight_decay_as_its_authors_optimiser_does():
    """ICLR_CAMIL's Adam gets no decay and its custom train step never adds the layers' l2
    regularisers to the loss: the recipe must not decay either."""
    from wsi_mil.models.camil import CAMIL

    assert CAMIL.recipe.weight_decay == 0 and CAMIL.recipe.optimizer == "adam" and CAMIL.recipe.lr == 2e-4


def plain_toy(seed: int, n_bags: int, n: int = 60, n_key: int = 3, strength: float = 5.0):
    """bench/bench_plain_toy.py's bags (issue #29): training bags then test bags, one generator
    seeded apart from the model's seed (a generator seeded like `torch.manual_seed(seed)` draws a
    direction correlated with the default initialisation)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    coords = torch.stack([torch.arange(n) % 8, torch.arange(n) // 8], 1) * 256
    bags = []
    for i in range(n_bags):
        x = torch.randn(n, D, generator=g)
        if i % 2:
            x[torch.randperm(n, generator=g)[:n_key]] += strength * direction
        bags.append((x, coords, torch.tensor(i % 2)))
    return bags


def test_dsmil_generalises_on_the_plain_key_instance_toy(seed=5):
    """40 training bags of 60 Gaussian instances (3 keys), Adam 1e-3, 15 epochs, the model's
    own loss, scored on 100 unseen bags. DSMIL's one-output form fails this seed (test AUC
    0.50: its single attention column, queried by a critical instance from an instance
    classifier initialised away from the keys, memorises the training bags); the default
    two-output form reaches 0.94."""
    bags = plain_toy(seed, 140)
    torch.manual_seed(seed)
    model = create_model("dsmil", D, 2)
    assert fit_toy(model, 15, bags[:40], bags[40:], shuffle_seed=seed) >= 0.9


def test_patch_dropout_keeps_enough_of_a_small_bag():
    """dsmil-wsi's --dropout_patch keeps a random (1 - p) of the bag, but never fewer than
    DROP_KEEP_AT_LEAST instances (a digit bag of 10 at p 0.8 kept 2 and lost its one key in 4 of
    5 steps); whole slides are dropped as the authors drop them; evaluation sees the whole bag."""
    from wsi_mil.models.base import DROP_KEEP_AT_LEAST, drop_instances

    assert DROP_KEEP_AT_LEAST == 8
    # int(n * (1 - p)) as the authors' dropout_patches: 1 - 0.8 is 0.19999..., so 100 keeps 19
    for n, kept in ((5, 5), (10, 8), (40, 8), (100, 19), (5000, 999)):
        x = torch.arange(n, dtype=torch.float32)[:, None]
        out = drop_instances(x, 0.8, training=True)
        assert len(out) == kept and len(set(out[:, 0].tolist())) == kept  # distinct instances
    x = torch.randn(10, 3)
    assert drop_instances(x, 0.8, training=False) is x and drop_instances(x, 0.0, training=True) is x
