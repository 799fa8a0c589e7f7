"""DTFD-MIL (wsi_mil/models/dtfd.py, trained as wsi_mil/training/fit.py trains it) against its
authors' code, restated below from hrzhang1123/DTFD-MIL at commit
10964f4dcc27c65ce110a0e9a3b9240bff58da8a, not from our module:

- the modules: Model/network.py `Classifier_1fc`, `residual_block`, `DimReduction`;
  Model/Attention.py `Attention_Gated`, `Attention_with_Classifier`; utils.py `get_cam_1d`;
- one training slide: Main_DTFD_MIL.py `train_attention_preFeature_DTFD`, the body of the slide
  loop (L300-366): pseudo-bags by `np.array_split` of a shuffled index, tier 1 per pseudo-bag,
  AFS / MaxS / MaxMinS distillation, tier-1 loss, `loss0.backward(retain_graph=True)`, the three
  tier-1 clips, `optimizer0.step()`, then tier 2 on the (not detached) distilled features,
  `loss1.backward()`, its clip and `optimizer1.step()`; the optimisers as `main` builds them
  (L104-105: two Adams, lr 1e-4, weight_decay 1e-4; clipping 5; numGroup 4, total_instance 4);
- one evaluation slide: `test_attention_DTFD_preFeat_MultipleMean` (L183-246,
  num_MeanInference 1).

`random.shuffle(feat_index)` is replaced by the permutation our model drew (read from its
`_split`), so both split alike; `.to(device)` is dropped; sizes are arguments.

On current PyTorch the authors' step raises "one of the variables needed for gradient computation
has been modified by an inplace operation" (optimizer0.step() changes tier-1 weights the retained
graph still needs for loss1's backward); the PyTorch they used let optimisers write `p.data`
unchecked. `allow_mutation_on_saved_tensors` lets it run: the retained graph keeps the weights as
they were. What loss1's backward leaves in the tier-1 gradients is never used (optimizer1 holds
tier 2 only; optimizer0.zero_grad() clears them at the next slide), which is why ours detaches
the tier-2 input, sums the losses and makes one backward with one Adam (Adam is per parameter,
so one optimiser over both tiers steps each parameter as two do).

Compared: the tier-1 and tier-2 losses, every parameter after each of several steps, and the
eval forward (bag logits, pseudo-bag logits, instance scores). The authors' code reports no
instance score; ours is the tier-1 attention of the instance in its pseudo-bag times the tier-2
attention of that pseudo-bag's distilled feature(s), both read here from the authors' modules.
"""

import numpy as np
import pytest
import torch
from torch import nn

from wsi_mil.models.dtfd import DTFDMIL
from wsi_mil.training.optim import build_optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than contended ones on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The authors' code, restated (hrzhang1123/DTFD-MIL 10964f4). Names are theirs.
# ---------------------------------------------------------------------------------------------


class Classifier_1fc(nn.Module):  # Model/network.py
    def __init__(self, n_channels, n_classes, droprate=0.0):
        super().__init__()
        self.fc = nn.Linear(n_channels, n_classes)
        self.droprate = droprate
        if self.droprate != 0.0:
            self.dropout = torch.nn.Dropout(p=self.droprate)

    def forward(self, x):
        if self.droprate != 0.0:
            x = self.dropout(x)
        x = self.fc(x)
        return x


class residual_block(nn.Module):  # Model/network.py
    def __init__(self, nChn=512):
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(nChn, nChn, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(nChn, nChn, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        tt = self.block(x)
        x = x + tt
        return x


class DimReduction(nn.Module):  # Model/network.py
    def __init__(self, n_channels, m_dim=512, numLayer_Res=0):
        super().__init__()
        self.fc1 = nn.Linear(n_channels, m_dim, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.numRes = numLayer_Res

        self.resBlocks = []
        for _ in range(numLayer_Res):
            self.resBlocks.append(residual_block(m_dim))
        self.resBlocks = nn.Sequential(*self.resBlocks)

    def forward(self, x):
        x = self.fc1(x)
        x = self.relu1(x)
        if self.numRes > 0:
            x = self.resBlocks(x)
        return x


class Attention_Gated(nn.Module):  # Model/Attention.py
    def __init__(self, L=512, D=128, K=1):
        super().__init__()
        self.L = L
        self.D = D
        self.K = K
        self.attention_V = nn.Sequential(nn.Linear(self.L, self.D), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(self.L, self.D), nn.Sigmoid())
        self.attention_weights = nn.Linear(self.D, self.K)

    def forward(self, x, isNorm=True):
        A_V = self.attention_V(x)  # NxD
        A_U = self.attention_U(x)  # NxD
        A = self.attention_weights(A_V * A_U)  # NxK
        A = torch.transpose(A, 1, 0)  # KxN
        if isNorm:
            A = torch.softmax(A, dim=1)  # softmax over N
        return A  ### K x N


class Attention_with_Classifier(nn.Module):  # Model/Attention.py
    def __init__(self, L=512, D=128, K=1, num_cls=2, droprate=0):
        super().__init__()
        self.attention = Attention_Gated(L, D, K)
        self.classifier = Classifier_1fc(L, num_cls, droprate)

    def forward(self, x):  ## x: N x L
        AA = self.attention(x)  ## K x N
        afeat = torch.mm(AA, x)  ## K x L
        pred = self.classifier(afeat)  ## K x num_cls
        return pred


def get_cam_1d(classifier, features):  # utils.py
    tweight = list(classifier.parameters())[-2]
    cam_maps = torch.einsum("bgf,cf->bcg", [features, tweight])
    return cam_maps


def authors_train_slide(
    tfeat_tensor, tslideLabel, feat_index, classifier, dimReduction, attention, UClassifier, optimizer0,
    optimizer1, ce_cri, numGroup=4, total_instance=4, distill="AFS", grad_clipping=5.0,
):  # fmt: skip
    """Main_DTFD_MIL.py L300-366 for one slide; returns the losses and the pre-clip gradient norms
    (the values `clip_grad_norm_` returns, which theirs ignores)."""
    instance_per_group = total_instance // numGroup
    slide_pseudo_feat = []
    slide_sub_preds = []
    slide_sub_labels = []

    index_chunk_list = np.array_split(np.array(feat_index), numGroup)
    index_chunk_list = [sst.tolist() for sst in index_chunk_list]

    for tindex in index_chunk_list:
        slide_sub_labels.append(tslideLabel)
        subFeat_tensor = torch.index_select(tfeat_tensor, dim=0, index=torch.LongTensor(tindex))
        tmidFeat = dimReduction(subFeat_tensor)
        tAA = attention(tmidFeat).squeeze(0)
        tattFeats = torch.einsum("ns,n->ns", tmidFeat, tAA)  ### n x fs
        tattFeat_tensor = torch.sum(tattFeats, dim=0).unsqueeze(0)  ## 1 x fs
        tPredict = classifier(tattFeat_tensor)  ### 1 x 2
        slide_sub_preds.append(tPredict)

        patch_pred_logits = get_cam_1d(classifier, tattFeats.unsqueeze(0)).squeeze(0)  ###  cls x n
        patch_pred_logits = torch.transpose(patch_pred_logits, 0, 1)  ## n x cls
        patch_pred_softmax = torch.softmax(patch_pred_logits, dim=1)  ## n x cls

        _, sort_idx = torch.sort(patch_pred_softmax[:, -1], descending=True)
        topk_idx_max = sort_idx[:instance_per_group].long()
        topk_idx_min = sort_idx[-instance_per_group:].long()
        topk_idx = torch.cat([topk_idx_max, topk_idx_min], dim=0)

        MaxMin_inst_feat = tmidFeat.index_select(dim=0, index=topk_idx)
        max_inst_feat = tmidFeat.index_select(dim=0, index=topk_idx_max)
        af_inst_feat = tattFeat_tensor

        if distill == "MaxMinS":
            slide_pseudo_feat.append(MaxMin_inst_feat)
        elif distill == "MaxS":
            slide_pseudo_feat.append(max_inst_feat)
        elif distill == "AFS":
            slide_pseudo_feat.append(af_inst_feat)

    slide_pseudo_feat = torch.cat(slide_pseudo_feat, dim=0)  ### numGroup x fs

    ## optimization for the first tier
    slide_sub_preds = torch.cat(slide_sub_preds, dim=0)  ### numGroup x fs
    slide_sub_labels = torch.cat(slide_sub_labels, dim=0)  ### numGroup
    loss0 = ce_cri(slide_sub_preds, slide_sub_labels).mean()
    optimizer0.zero_grad()
    loss0.backward(retain_graph=True)
    norms = [
        torch.nn.utils.clip_grad_norm_(dimReduction.parameters(), grad_clipping),
        torch.nn.utils.clip_grad_norm_(attention.parameters(), grad_clipping),
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), grad_clipping),
    ]
    optimizer0.step()

    ## optimization for the second tier
    gSlidePred = UClassifier(slide_pseudo_feat)
    loss1 = ce_cri(gSlidePred, tslideLabel).mean()
    optimizer1.zero_grad()
    loss1.backward()
    norms.append(torch.nn.utils.clip_grad_norm_(UClassifier.parameters(), grad_clipping))
    optimizer1.step()
    return loss0, loss1, [float(n) for n in norms]


@torch.no_grad()
def authors_eval_slide(
    tfeat, feat_index, classifier, dimReduction, attention, UClassifier, numGroup=4, total_instance=4,
    distill="AFS",
):  # fmt: skip
    """Main_DTFD_MIL.py L183-246 for one slide (num_MeanInference 1); returns the tier-2 logits,
    the pseudo-bag logits, each chunk's indices and attention, and the distilled features."""
    instance_per_group = total_instance // numGroup
    midFeat = dimReduction(tfeat)
    AA = attention(midFeat, isNorm=False).squeeze(0)  ## N

    index_chunk_list = np.array_split(np.array(feat_index), numGroup)
    index_chunk_list = [sst.tolist() for sst in index_chunk_list]

    slide_d_feat = []
    slide_sub_preds = []
    chunk_attention = []  # (not theirs) each chunk's tAA, for the instance scores

    for tindex in index_chunk_list:
        idx_tensor = torch.LongTensor(tindex)
        tmidFeat = midFeat.index_select(dim=0, index=idx_tensor)

        tAA = AA.index_select(dim=0, index=idx_tensor)
        tAA = torch.softmax(tAA, dim=0)
        chunk_attention.append(tAA)
        tattFeats = torch.einsum("ns,n->ns", tmidFeat, tAA)  ### n x fs
        tattFeat_tensor = torch.sum(tattFeats, dim=0).unsqueeze(0)  ## 1 x fs

        tPredict = classifier(tattFeat_tensor)  ### 1 x 2
        slide_sub_preds.append(tPredict)

        patch_pred_logits = get_cam_1d(classifier, tattFeats.unsqueeze(0)).squeeze(0)  ###  cls x n
        patch_pred_logits = torch.transpose(patch_pred_logits, 0, 1)  ## n x cls
        patch_pred_softmax = torch.softmax(patch_pred_logits, dim=1)  ## n x cls

        _, sort_idx = torch.sort(patch_pred_softmax[:, -1], descending=True)

        if distill == "MaxMinS":
            topk_idx_max = sort_idx[:instance_per_group].long()
            topk_idx_min = sort_idx[-instance_per_group:].long()
            topk_idx = torch.cat([topk_idx_max, topk_idx_min], dim=0)
            d_inst_feat = tmidFeat.index_select(dim=0, index=topk_idx)
            slide_d_feat.append(d_inst_feat)
        elif distill == "MaxS":
            topk_idx_max = sort_idx[:instance_per_group].long()
            topk_idx = topk_idx_max
            d_inst_feat = tmidFeat.index_select(dim=0, index=topk_idx)
            slide_d_feat.append(d_inst_feat)
        elif distill == "AFS":
            slide_d_feat.append(tattFeat_tensor)

    slide_d_feat = torch.cat(slide_d_feat, dim=0)
    slide_sub_preds = torch.cat(slide_sub_preds, dim=0)
    gSlidePred = UClassifier(slide_d_feat)
    return gSlidePred, slide_sub_preds, index_chunk_list, chunk_attention, slide_d_feat


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

IN_DIM, M_DIM, ATT_DIM, N_CLS, NUM_GROUP = 32, 48, 16, 2, 4
LR, WD, CLIP = 1e-4, 1e-4, 5.0  # Main_DTFD_MIL.py's defaults
# Tolerances on differences relative to max(1, |the authors' value|). Measured: losses <= 3e-7,
# parameters <= 4e-8 after three steps (an Adam step moves each by ~lr = 1e-4), eval outputs
# <= 2e-6 (float32 rounding on bags of features up to ~40).
ATOL = 1e-5
PARAM_ATOL = 1e-6


def gap(ours, theirs) -> float:
    ours, theirs = torch.as_tensor(ours).detach(), torch.as_tensor(theirs).detach()
    return ((ours - theirs).abs() / theirs.abs().clamp_min(1)).max().item()


def authors_modules(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {  # main(), L69-72
        "classifier": Classifier_1fc(M_DIM, N_CLS, 0.0),
        "attention": Attention_Gated(M_DIM, ATT_DIM),
        "dimReduction": DimReduction(IN_DIM, M_DIM, numLayer_Res=0),
        "UClassifier": Attention_with_Classifier(L=M_DIM, D=ATT_DIM, num_cls=N_CLS, droprate=0),
    }


def ours_from(mods: dict, distill: str) -> DTFDMIL:
    """Ours with the authors' weights, loaded strictly."""
    ours = DTFDMIL(IN_DIM, N_CLS, hidden=M_DIM, attn_dim=ATT_DIM, n_groups=NUM_GROUP, distill=distill)
    att, u = mods["attention"], mods["UClassifier"]
    pairs = {
        "reduce.0": mods["dimReduction"].fc1,
        "attention.a.0": att.attention_V[0],
        "attention.b.0": att.attention_U[0],
        "attention.w": att.attention_weights,
        "classifier.1": mods["classifier"].fc,
        "attention2.a.0": u.attention.attention_V[0],
        "attention2.b.0": u.attention.attention_U[0],
        "attention2.w": u.attention.attention_weights,
        "classifier2": u.classifier.fc,
    }
    state = {
        f"{ours_name}.{k}": v.detach().clone()
        for ours_name, m in pairs.items()
        for k, v in m.state_dict().items()
    }
    ours.load_state_dict(state, strict=True)
    return ours, pairs


def bags(seed: int = 2):
    """Four bags, sizes that split unevenly into 4, both labels, magnitudes that push some
    modules' gradient norms past the clip."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, y, scale in [(13, 1, 1.0), (10, 0, 40.0), (9, 1, 8.0), (16, 0, 2.0)]:
        x = scale * (torch.randn(n, IN_DIM, generator=g) + 0.3)
        out.append((x, torch.tensor(y)))
    return out


def recording_split(model: DTFDMIL) -> list:
    """Wrap the model's `_split` (unchanged) and keep the groups it returns."""
    seen, split = [], model._split

    def spy(features):
        groups = split(features)
        seen.append(groups)
        return groups

    model._split = spy
    return seen


def run_training(distill: str, n_steps: int = 3) -> dict:
    mods = authors_modules()
    ours, pairs = ours_from(mods, distill)
    seen = recording_split(ours)
    # theirs: main(), L97-105
    trainable_parameters = []
    trainable_parameters += list(mods["classifier"].parameters())
    trainable_parameters += list(mods["attention"].parameters())
    trainable_parameters += list(mods["dimReduction"].parameters())
    optimizer_adam0 = torch.optim.Adam(trainable_parameters, lr=LR, weight_decay=WD)
    optimizer_adam1 = torch.optim.Adam(mods["UClassifier"].parameters(), lr=LR, weight_decay=WD)
    ce_cri = torch.nn.CrossEntropyLoss(reduction="none")
    # ours: fit.py's optimiser from the model's recipe
    recipe = DTFDMIL.recipe
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay, recipe.grad_clip) == ("adam", LR, WD, CLIP)
    assert tuple(recipe.betas) == (0.9, 0.999)  # torch.optim.Adam's default, which theirs uses
    opt = build_optimizer(ours, recipe)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    for m in mods.values():
        m.train()
    ours.train()

    diffs = {"loss0": 0.0, "loss1": 0.0, "loss": 0.0, "params": 0.0}
    clipped = 0
    torch.manual_seed(5)
    for x, y in bags()[:n_steps]:
        # ours: fit.py's training step, line for line
        out = ours(x, None)
        loss = ours.loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            for group in ours.clip_groups():
                torch.nn.utils.clip_grad_norm_(group, recipe.grad_clip)
        opt.step()
        ours.on_train_step(out, y)
        feat_index = torch.cat(seen[-1]).tolist()  # the permutation ours drew
        assert len(seen[-1]) == NUM_GROUP, f"{len(x)} instances made {len(seen[-1])} pseudo-bags"
        # theirs, on the same split
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            loss0, loss1, norms = authors_train_slide(
                x, y.view(1), feat_index, mods["classifier"], mods["dimReduction"], mods["attention"],
                mods["UClassifier"], optimizer_adam0, optimizer_adam1, ce_cri, NUM_GROUP, 4, distill, CLIP,
            )  # fmt: skip
        clipped += sum(n > CLIP for n in norms)
        ours_loss0 = torch.nn.functional.cross_entropy(out.extras["sub_logits"], y.view(1).expand(NUM_GROUP))
        ours_loss1 = torch.nn.functional.cross_entropy(out.logits.unsqueeze(0), y.view(1))
        diffs["loss0"] = max(diffs["loss0"], gap(ours_loss0, loss0))
        diffs["loss1"] = max(diffs["loss1"], gap(ours_loss1, loss1))
        diffs["loss"] = max(diffs["loss"], gap(loss, loss0 + loss1))  # what ours minimises
        for name, module in pairs.items():
            for k, v in module.named_parameters():
                diffs["params"] = max(diffs["params"], gap(ours.get_parameter(f"{name}.{k}"), v))
    moved = max((ours.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 100 * PARAM_ATOL  # the steps move the weights far past the tolerance
    assert clipped >= 2  # clipping acts (so per-module clipping is part of what is compared)
    return diffs


@pytest.mark.parametrize("distill", ["AFS", "MaxMinS"])
def test_dtfd_training_steps_match_authors_two_optimiser_retain_graph_scheme(distill):
    """Tier-1 and tier-2 losses and every parameter after each of three Adam steps (lr 1e-4,
    weight decay 1e-4, per-module clipping at 5 acting on some steps) equal the authors'."""
    diffs = run_training(distill)
    assert max(diffs["loss0"], diffs["loss1"], diffs["loss"]) < ATOL and diffs["params"] < PARAM_ATOL, diffs


def test_authors_step_needs_the_saved_weights_ours_does_not():
    """Why ours does not run the authors' step literally: on current PyTorch it raises."""
    mods = authors_modules()
    opt0 = torch.optim.Adam(
        [p for k in ("classifier", "attention", "dimReduction") for p in mods[k].parameters()], lr=LR
    )
    opt1 = torch.optim.Adam(mods["UClassifier"].parameters(), lr=LR)
    x, y = bags()[0]
    with pytest.raises(RuntimeError, match="inplace"):
        authors_train_slide(
            x, y.view(1), list(range(len(x))), mods["classifier"], mods["dimReduction"], mods["attention"],
            mods["UClassifier"], opt0, opt1, torch.nn.CrossEntropyLoss(reduction="none"),
        )  # fmt: skip


@pytest.mark.parametrize("distill", ["AFS", "MaxMinS", "MaxS"])
def test_dtfd_eval_forward_matches_authors(distill):
    """Eval on the split ours makes (seeded, canonical order): bag logits, pseudo-bag logits and
    instance scores (tier-1 attention x the pseudo-bag's tier-2 attention) equal the authors'."""
    mods = authors_modules()
    ours, _ = ours_from(mods, distill)
    for m in mods.values():
        m.eval()
    ours.eval()
    diffs = {"logits": 0.0, "sub_logits": 0.0, "instance_scores": 0.0}
    for x, _ in bags(seed=3):
        feat_index = torch.cat(ours._split(x)).tolist()
        with torch.no_grad():
            out = ours(x)
        logits, sub_logits, chunks, chunk_att, d_feat = authors_eval_slide(
            x, feat_index, mods["classifier"], mods["dimReduction"], mods["attention"], mods["UClassifier"],
            NUM_GROUP, 4, distill,
        )  # fmt: skip
        with torch.no_grad():
            tier2 = mods["UClassifier"].attention(d_feat)[0]  # K=1 x (groups x picks)
        per_chunk = tier2.view(NUM_GROUP, -1).sum(1)
        scores = torch.empty(len(x))
        for idx, a, w in zip(chunks, chunk_att, per_chunk):
            scores[idx] = a * w
        torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
        for key, a, b in [
            ("logits", out.logits, logits[0]),
            ("sub_logits", out.extras["sub_logits"], sub_logits),
            ("instance_scores", out.instance_scores, scores),
        ]:
            diffs[key] = max(diffs[key], gap(a, b))
    assert all(v < ATOL for v in diffs.values()), diffs
