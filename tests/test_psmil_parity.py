"""PSMIL (wsi_mil/models/psmil.py) against its authors' code, restated below from
LMBDA-design/PSAMIL at commit 93b763de99aef5e3afb938a648be4e8b29c0c9fc, not from our module:

- `AuthorsPSAMIL`: model/PSAMIL.py, `PSAMIL.__init__` (L282-343: fbank, ps_attention, linear,
  output) and `PSAMIL.forward` without the contrastive term, pooling "psa" (L345-393, 482-483): P without
  gradient, attention the mean of softmax(P w) and softmax(onehot(argmax P) w), and the "label"
  prototype update (gamma 0.001), our default update.
- `AuthorsPSMIL`: model/PSMIL.py, `PSMIL.__init__` / `forward` (L106-198), the model
  traincancer.py trains on WSI features: attention softmax(P w) and the "confident" update
  (gamma 0.01), our `prototype_update="confident"`.
The label is passed as the authors' training scripts pass it: PSAMIL's main.py (L156-164) a [1]
long tensor from the DataLoader, traincancer.py (L62-67) a [1, ks] one-hot.

Sizes are arguments, `.cuda()` is dropped, the unused pooling branches and modules are left out
(they hold no state the psa path reads), and `stem` is the authors' frozen Backbone (identity on
WSI features in PSMIL.py; a given module here, to check the update acts on the embeddings).
Training follows traincancer.py `train` (L54-81): NLLLoss on the log-softmax output, SGD(lr 1e-3,
momentum 0.9, weight_decay 1e-4), one bag per step; the prototypes move inside the authors'
forward, before the step, from that forward's embeddings, and ours in `on_train_step`, after the
step, from the same forward's embeddings: the same values.

The authors' weights are loaded into ours strictly; then, bag by bag, the log-probabilities, the
attention, the loss, the prototypes after each update and the parameters after each step are
compared. Documented differences (psmil.py's docstring), which the comparison steps around:
- the start (first bag; see `run_pair`): theirs starts the columns at the first bag's raw mean
  embedding before pooling it, ours at the normalised mean after its step;
- ours has a classifier bias, the authors' `self.linear` has none: the bias is loaded as zero
  and frozen;
- ours never moves the prototypes in eval (the authors' forward does, with the true label);
- PSAMIL.py's no-contrastive psa branch takes the selected instances with
  `nonzero().squeeze()`, which for exactly one selected instance indexes a single row, whose
  `mean(dim=0)` is then a scalar that moves every coordinate of the column alike; ours (and the
  same function's contrastive branch, L533, a boolean mask) moves it to that instance. The
  bags below never select exactly one instance (asserted), so both read the same.
"""

import sys

import pytest
import torch
from torch import nn

from wsi_mil.models.psmil import PSMIL


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than contended ones on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The authors' code, restated (LMBDA-design/PSAMIL 93b763d). Variable names are theirs.
# ---------------------------------------------------------------------------------------------


class AuthorsPSAMIL(nn.Module):
    """model/PSAMIL.py `PSAMIL`, need_cl=False, pooling "psa"."""

    def __init__(self, feat_dim, ks, stem=None):
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        for param in self.stem.parameters():
            param.requires_grad = False
        self.ks = ks
        self.firsttime = True
        self.fbank = nn.Parameter(data=torch.FloatTensor(feat_dim, self.ks), requires_grad=False)
        self.ps_attention = nn.Sequential(nn.Linear(self.ks, 1))
        self.linear = nn.Parameter(data=torch.FloatTensor(feat_dim, self.ks), requires_grad=True)
        nn.init.kaiming_uniform_(self.linear)
        self.output = nn.LogSoftmax(dim=1)  # [1,ks]

    def forward(self, x, y):
        fs = self.stem(x)  # [t,o]
        ins_probs = torch.softmax(torch.mm(fs, self.linear), dim=1)  # [t,ks]
        if self.firsttime:
            self.fbank.data = fs.mean(dim=0, keepdim=True).repeat(self.ks, 1).transpose(0, 1)
            self.firsttime = False

        with torch.no_grad():
            pred = torch.softmax(torch.mm(fs, self.fbank), dim=1)  # [t,ks]
            predicted_labels = torch.argmax(pred, dim=1)
            pred_one_hot = nn.functional.one_hot(predicted_labels, num_classes=pred.shape[1]).float()

        alpha = self.ps_attention(pred)  # [t,1]
        alpha1 = self.ps_attention(pred_one_hot)  # [t,1]
        alpha = torch.softmax(alpha.T, dim=1)  # [1,t]
        alpha1 = torch.softmax(alpha1.T, dim=1)  # [1,t]

        alpha = (alpha + alpha1) / 2

        F = torch.mm(alpha, fs)  # [1,o]
        selected_samples = predicted_labels == y

        if torch.any(selected_samples):
            selected_indices = torch.nonzero(selected_samples).squeeze()
            critical_fs = fs[selected_indices]
            criticalF = torch.mean(critical_fs, dim=0, keepdim=True)
        else:
            criticalF = F

        if y >= 0:
            newf = nn.functional.normalize((0.999 * self.fbank[:, y]) + (0.001 * criticalF.t()), dim=0)
            self.fbank[:, y] = newf

        if torch.isnan(self.fbank).any():
            print("Tensor Fbank contains NaN values")
            sys.exit()
        Y_logit = torch.matmul(F, self.linear)  # [1,ks]
        Y_prob = self.output(Y_logit)  # [1,ks]

        Y_hat = torch.argmax(Y_prob, dim=1).squeeze()
        return Y_prob, Y_hat.unsqueeze(0), alpha, ins_probs, F


class AuthorsPSMIL(nn.Module):
    """model/PSMIL.py `PSMIL` (ks = 2; y one-hot, as traincancer.py passes it)."""

    def __init__(self, feat_dim, ks=2, stem=None):
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        for param in self.stem.parameters():
            param.requires_grad = False
        self.ks = ks
        self.firsttime = True
        self.fbank = nn.Parameter(data=torch.FloatTensor(feat_dim, self.ks), requires_grad=False)
        self.ps_attention = nn.Sequential(nn.Linear(self.ks, 1))
        self.linear = nn.Parameter(data=torch.FloatTensor(feat_dim, self.ks), requires_grad=True)
        nn.init.kaiming_uniform_(self.linear)
        self.output = nn.LogSoftmax(dim=1)  # [1,ks]

    def forward(self, x, y):
        fs = self.stem(x)  # [t,o]
        ins_probs = torch.softmax(torch.mm(fs, self.linear), dim=1)  # [t,ks]

        if self.firsttime:
            self.fbank.data = fs.mean(dim=0, keepdim=True).repeat(self.ks, 1).transpose(0, 1)
            self.firsttime = False

        with torch.no_grad():
            pred = torch.softmax(torch.mm(fs, self.fbank), dim=1)  # [t,ks]
            predicted_labels = torch.argmax(pred, dim=1)  # noqa: F841 (theirs, unused)

        alpha = self.ps_attention(pred)  # [t,1]

        alpha = torch.softmax(alpha.T, dim=1)  # [1,t]

        F = torch.mm(alpha, fs)  # [1,o]

        if torch.sum(y) >= 0:
            y = torch.argmax(y.squeeze())
            selected_samples = torch.argmax(pred[:, y])

            criticalF = fs[selected_samples]  # [o]
            newfy = nn.functional.normalize((0.99 * self.fbank[:, y]) + (0.01 * criticalF), dim=0)
            if torch.isnan(newfy).any():
                newfy = torch.mean(fs, dim=0)
            self.fbank[:, y] = newfy

            if torch.isnan(self.fbank).any():
                print("Tensor Fbank contains NaN values")
                sys.exit()

        Y_logit = torch.matmul(F, self.linear)  # [1,ks]
        Y_prob = self.output(Y_logit)  # [1,ks]

        Y_hat = torch.argmax(Y_prob, dim=1).squeeze()
        return Y_prob, Y_hat.unsqueeze(0), alpha, ins_probs, F


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

IN_DIM, HIDDEN, K = 32, 24, 2
# On differences relative to max(1, |the authors' value|). Measured <= 6e-7 (float32 rounding of
# logits up to ~50: the authors' kaiming-uniform `linear` is large); prototypes move by >= 1e-3.
ATOL = 1e-5


def gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = torch.as_tensor(ours).detach(), torch.as_tensor(theirs).detach()
    return ((ours - theirs).abs() / theirs.abs().clamp_min(1)).max().item()


def make_pair(update: str, hidden: int, seed: int = 0):
    """The authors' model (random weights as they initialise them) and ours in their setting,
    the authors' weights loaded into ours strictly."""
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Linear(IN_DIM, hidden), nn.ReLU()) if hidden else None
    dim = hidden or IN_DIM
    if update == "label":  # PSAMIL.py's psa
        theirs = AuthorsPSAMIL(dim, K, stem)
        ours = PSMIL(IN_DIM, K, hidden=hidden, hard_mix=True, detach_probs=True, attn_scale=1.0)
    else:  # PSMIL.py
        theirs = AuthorsPSMIL(dim, K, stem)
        ours = PSMIL(
            IN_DIM, K, hidden=hidden, prototype_update="confident", gamma=0.01, detach_probs=True,
            attn_scale=1.0,
        )  # fmt: skip
    with torch.no_grad():  # their kaiming-uniform `linear` (bound 1.7) saturates the softmax
        theirs.linear.mul_(0.05)  # on these bags; smaller weights keep the steps informative
    state = {
        # fbank is uninitialised memory until the first bag sets it: keep ours, unused until then
        "pool.prototypes": ours.pool.prototypes.clone(),
        "pool.initialised": torch.tensor(False),
        "pool.w.weight": theirs.ps_attention[0].weight.detach().clone(),
        "pool.w.bias": theirs.ps_attention[0].bias.detach().clone(),
        "classifier.weight": theirs.linear.detach().T.clone(),
        "classifier.bias": torch.zeros(K),  # theirs has none (documented)
    }
    if hidden:
        state["fc.0.weight"] = stem[0].weight.detach().clone()
        state["fc.0.bias"] = stem[0].bias.detach().clone()
    ours.load_state_dict(state, strict=True)
    ours.classifier.bias.requires_grad_(False)
    if hidden:  # the authors' stem is frozen
        ours.fc.requires_grad_(False)
    return theirs, ours


def bags(seed: int = 1, n_bags: int = 8):
    """Bags of 5-15 instances, a label-1 direction added to a few instances of label-1 bags,
    scaled so the prototypes move by more than rounding."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(IN_DIM, generator=g)
    out = []
    for i in range(n_bags):
        n = int(torch.randint(5, 16, (1,), generator=g))
        x = torch.randn(n, IN_DIM, generator=g) + 0.5
        y = i % 2 if i else 1  # the first bag is positive: nothing is assigned to 1 yet
        if y:
            x[: max(2, n // 4)] += 2 * direction
        out.append((3 * x, torch.tensor(y)))
    return out


def sgd(params):  # traincancer.py L275
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)


def run_pair(update: str, hidden: int, n_bags: int = 8) -> dict:
    """Train both bag by bag; the largest difference seen in each compared quantity."""
    theirs, ours = make_pair(update, hidden)
    theirs.train(), ours.train()
    opt_t = sgd([p for p in theirs.parameters() if p.requires_grad])
    opt_o = sgd([p for p in ours.parameters() if p.requires_grad])
    criterion = torch.nn.NLLLoss()
    diffs = {"log_probs": 0.0, "attention": 0.0, "loss": 0.0, "prototypes": 0.0, "params": 0.0}
    moved, fallbacks = 0.0, 0
    w0 = theirs.ps_attention[0].weight.detach().clone(), theirs.linear.detach().clone()
    for i, (x, y) in enumerate(bags(n_bags=n_bags)):
        q_before = ours.pool.prototypes.clone()
        if update == "label":
            y_in = y.view(1)  # main.py L156-164: the DataLoader's [1] long label
            with torch.no_grad():  # the precondition of the module docstring's last point
                fs = theirs.stem(x)
                fbank = theirs.fbank if not theirs.firsttime else fs.mean(0, keepdim=True).T.repeat(1, K)
                n_sel = int((torch.softmax(fs @ fbank, dim=1).argmax(1) == y).sum())
            assert n_sel != 1
            fallbacks += i > 0 and n_sel == 0
        else:
            y_in = nn.functional.one_hot(y, K).float().unsqueeze(0)  # traincancer.py's one-hot label
        if i == 0:
            # The start, a documented difference: theirs starts every column at the first bag's
            # mean embedding inside the forward (PSAMIL.py L359 / PSMIL.py L164), before pooling
            # that bag (so it pools with uniform P), and leaves each column unnormalised until
            # its first update; ours starts them, normalised, after the first bag's step (that
            # bag pools with the random initial prototypes, and a label column with no instance
            # moves toward that pooling). The first bag is run without a step, the start pinned,
            # and ours then takes the authors' prototypes: every later bag is compared.
            with torch.no_grad():
                theirs(x, y_in)
                ours.on_train_step(ours(x), y)
                mean = ours.fc(x).mean(0)
            other = 1 - int(y)
            torch.testing.assert_close(theirs.fbank[:, other], mean)
            torch.testing.assert_close(ours.pool.prototypes[:, other], nn.functional.normalize(mean, dim=0))
            assert mean.norm() > 2  # so the pinned difference is a real one
            ours.pool.prototypes.copy_(theirs.fbank)
            continue
        # theirs: traincancer.py train(), the update inside forward
        opt_t.zero_grad()
        Y_prob, _, alpha, _, _ = theirs(x, y_in)
        loss_t = criterion(Y_prob.view(1, -1), y.view(1))
        loss_t.backward()
        opt_t.step()
        # ours: fit.py's step (no clipping in this recipe), the update after the step
        out = ours(x)
        loss_o = ours.loss(out, y)
        opt_o.zero_grad(set_to_none=True)
        loss_o.backward()
        opt_o.step()
        ours.on_train_step(out, y)

        diffs["log_probs"] = max(diffs["log_probs"], gap(out.logits.log_softmax(-1), Y_prob[0]))
        diffs["attention"] = max(diffs["attention"], gap(out.instance_scores, alpha[0]))
        diffs["loss"] = max(diffs["loss"], gap(loss_o, loss_t))
        params = [
            (ours.pool.w.weight, theirs.ps_attention[0].weight),
            (ours.pool.w.bias, theirs.ps_attention[0].bias),
            (ours.classifier.weight, theirs.linear.T),
        ]
        diffs["params"] = max(diffs["params"], max(gap(a, b) for a, b in params))
        diffs["prototypes"] = max(diffs["prototypes"], gap(ours.pool.prototypes, theirs.fbank))
        moved = max(moved, (ours.pool.prototypes - q_before).abs().max().item())
    assert moved > 100 * ATOL  # the prototypes move by far more than the tolerance
    assert update != "label" or fallbacks > 0  # a compared bag moves its column to the bag feature
    # and so do the weights (the attention's little: its gradient passes the pooling)
    assert (theirs.linear - w0[1]).abs().max() > 100 * ATOL
    assert (theirs.ps_attention[0].weight - w0[0]).abs().max() > ATOL
    return diffs


@pytest.mark.parametrize("hidden", [0, HIDDEN], ids=["no_projection", "projection"])
@pytest.mark.parametrize("update", ["label", "confident"])
def test_psmil_matches_authors_forward_prototype_update_and_step(update, hidden):
    """Log-probabilities, psa / PSMIL.py attention, NLL loss, prototypes after every update and
    parameters after every SGD step agree with the authors' code over seven bags of both labels
    after a shared start (for "label", with bags whose label gets no instance: the update falls
    back to the bag feature)."""
    diffs = run_pair(update, hidden)
    assert all(v < ATOL for v in diffs.values()), diffs


def test_psmil_eval_forward_matches_and_never_moves_the_prototypes():
    """After training, eval outputs agree with the authors' forward; theirs moves fbank with the
    true label even then (a label leak), ours leaves the prototypes as they are (documented)."""
    theirs, ours = make_pair("label", 0)
    theirs.train(), ours.train()
    for x, y in bags(n_bags=4):
        with torch.no_grad():
            theirs(x, y.view(1))
            ours.on_train_step(ours(x), y)
            ours.pool.prototypes.copy_(theirs.fbank)  # the start differs (run_pair)
    theirs.eval(), ours.eval()
    x, y = bags(seed=2, n_bags=1)[0]
    q = ours.pool.prototypes.clone()
    with torch.no_grad():
        out = ours(x)
        Y_prob, _, alpha, _, _ = theirs(x, y.view(1))
        ours.on_train_step(out, y)
    assert gap(out.logits.log_softmax(-1), Y_prob[0]) < ATOL
    assert gap(out.instance_scores, alpha[0]) < ATOL
    torch.testing.assert_close(ours.pool.prototypes, q, rtol=0, atol=0)
    assert (theirs.fbank[:, int(y)] - q[:, int(y)]).abs().max().item() > 100 * ATOL


def test_psmil_label_update_with_no_instance_of_the_label_moves_to_the_bag_feature():
    """A label no instance is assigned to moves its column toward the attention-pooled bag feature
    (PSAMIL.py's `criticalF = F`), here with attention far from uniform so that the bag feature is
    not the plain mean."""
    theirs, ours = make_pair("label", 0)
    theirs.train(), ours.train()
    x = bags(n_bags=1)[0][0] / 4  # softer P
    mean = x.mean(0)
    q = nn.functional.normalize(torch.stack([mean, -mean], 1), dim=0)  # P_i1 = sigmoid(-2 h_i q_0)
    with torch.no_grad():
        theirs.fbank.copy_(q)
        theirs.firsttime = False
        theirs.ps_attention[0].weight.copy_(torch.tensor([[40.0, -40.0]]))
        ours.load_state_dict(
            {**ours.state_dict(), "pool.prototypes": q, "pool.initialised": torch.tensor(True),
             "pool.w.weight": theirs.ps_attention[0].weight.clone()}, strict=True,
        )  # fmt: skip
        p = torch.softmax(x @ q, dim=1)
        assert (p.argmax(1) == 0).all() and p[:, 1].std() > 0.01  # none of class 1; P varies
        Y_prob, _, alpha, _, F = theirs(x, torch.tensor([1]))
        out = ours(x)
        ours.on_train_step(out, torch.tensor(1))
    assert (F[0] - mean).norm() > 1  # the bag feature is not the plain mean
    diffs = {
        "attention": gap(out.instance_scores, alpha[0]),
        "prototypes": gap(ours.pool.prototypes, theirs.fbank),
    }
    assert all(v < ATOL for v in diffs.values()), diffs
    assert (ours.pool.prototypes[:, 1] - q[:, 1]).abs().max() > 10 * ATOL


def authors_alignment(preds: torch.Tensor, log_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PSAMIL main.py (93b763d) L233-256: `preds` [views, t, ks], the classifier's instance
    probabilities of each view (model/PSAMIL.py L545: softmax(features @ linear)). With
    `log_input` the cross-entropy gets log(preds[i]) instead of preds[i] (ours; theirs feeds the
    probabilities to CrossEntropyLoss as if they were logits)."""
    ins_loss = torch.nn.CrossEntropyLoss()
    log_preds = torch.log(preds + 1e-9)
    mean_log_preds = torch.mean(log_preds, dim=0)
    geom_mean_probs = torch.exp(mean_log_preds)
    estimated_probs = geom_mean_probs / (torch.sum(geom_mean_probs, dim=1, keepdim=True) + 1e-9)
    estimated_labels = torch.argmax(estimated_probs, dim=1)
    total_loss = 0
    for i in range(preds.shape[0]):
        total_loss += ins_loss(torch.log(preds[i]) if log_input else preds[i], estimated_labels)
    return total_loss / preds.shape[0], estimated_labels


def test_alignment_loss_is_the_authors_on_the_classifiers_view_probabilities():
    """The optional alignment term: the authors' pseudo-label and mean over views of each
    view's cross-entropy (with the log of the probabilities, the documented difference), on
    the classifier's probabilities of every view, weighted by the authors' ramp
    min(0.01 epoch, 0.1) (main.py L144-147) at align_lambda 0.01, align_tau 10."""
    from wsi_mil.models.psmil import alignment_loss

    torch.manual_seed(0)
    preds = torch.softmax(3 * torch.randn(3, 40, 2), -1)
    theirs, labels = authors_alignment(preds, log_input=True)
    torch.testing.assert_close(alignment_loss(list(preds)), theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.stack([torch.log(p) for p in preds]).sum(0).argmax(-1), labels)
    raw, _ = authors_alignment(preds, log_input=False)
    assert abs(raw.item() - theirs.item()) > 0.05  # the difference is real, and documented

    model = PSMIL(16, 2, hidden=0, align_lambda=0.01, align_tau=10, view_dropout=0.0, view_noise=0.0)
    x = torch.randn(30, 16)
    p = torch.softmax(model.classifier(x), -1)  # hidden=0: the embedding is the input
    for epoch in (0, 3, 10, 15):
        model.set_epoch(epoch)
        aux = model.train()(x).aux_loss
        expected = min(0.01 * epoch, 0.1) * authors_alignment(torch.stack([p] * 3), log_input=True)[0]
        if epoch == 0:
            assert aux is None
        else:
            torch.testing.assert_close(aux, expected, rtol=1e-5, atol=1e-7)
