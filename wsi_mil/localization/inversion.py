"""Sparse network inversion for key-instance detection, keeping the bag's prediction.

Starting from the bag X0 and a target class y, minimise
    CE(model(X), y) + lambda ||X||_1
by proximal gradient (ISTA) steps X <- soft_threshold(X - eta grad, eta lambda), model frozen
in eval mode, the whole bag at once. Features are divided by their mean absolute value first,
so eta and lambda do not depend on the encoder's feature scale.

The inverted bag must keep the prediction (the poster inverts the bag towards the predicted
label *while keeping* it): a step is taken only when the bag it leads to still predicts y
(when the bag predicted y to begin with) or still gives y at least its starting probability
(when it did not: a heatmap of a class the slide is not called), and holds a non-zero
instance. The first step that would break this ends the inversion; `steps_kept` records how
many were taken. So the penalty removes what the model does not need for its prediction and
stops where removing more would change it.

Per-instance readings of the kept inversion (`readings`; `score=` picks the one returned):
- "inverted_attention" (default): the model's attention (its instance scores) on the inverted
  bag: where the model looks once the penalty has removed what it does not need;
- "evidence": -sum_t <grad_i CE(X_t), X0_i> over the kept steps, the evidence instance i's
  original features give for y along the inversion path (gradient x input integrated along
  the sparse path);
- "survival": the fraction of each instance's feature norm left at the last kept step (the
  poster's "what survives");
- "change": ||X_T,i - X0_i|| / ||X0_i|| with the sign flipped (instances left alone score high).
Defaults T 50, eta 0.1, lambda 1.6: the penalty, not T, ends the inversion (10-30 steps are
kept on the synthetic bags). The reading was chosen by key-instance AUC on fresh bags of four
cohorts (graded seed 2, tests seed 1, harder seed 1, digits seed 0), where inverted attention
led the kept readings (PSMIL 0.94 / 0.99 / 0.46 / 0.98; evidence 0.90 / 0.99 / - / 0.92;
survival 0.69 / 0.77 / - / 0.33); the held-out comparison is in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import HeatmapConfig
from ..models import MILModel

_H = HeatmapConfig()  # one home for the defaults: the heatmap config
DEFAULTS = {
    "steps": _H.inversion_steps,
    "lr": _H.inversion_lr,
    "lam": _H.inversion_lambda,
    "score": _H.inversion_score,
}
SCORES = ("inverted_attention", "evidence", "survival", "change")


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """The proximal operator of t ||x||_1: sign(x) max(|x| - t, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


@dataclass
class InversionResult:
    scores: torch.Tensor  # [N], the reading asked for
    target: int
    x: torch.Tensor  # [N, D] the inverted bag at the last kept step, in the input's units
    losses: list[float]
    steps_kept: int = 0  # ISTA steps taken before one would have broken the prediction
    kept: bool = True  # the inverted bag keeps the prediction (or the target's probability)
    prob: float = 0.0  # the inverted bag's probability of the target
    readings: dict[str, torch.Tensor] = field(default_factory=dict)


def sparse_inversion(
    model: MILModel,
    features: torch.Tensor,
    coords: torch.Tensor | None = None,
    target: int | None = None,
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    lam: float = DEFAULTS["lam"],
    score: str = DEFAULTS["score"],
) -> InversionResult:
    """ISTA on the bag towards `target` (default: the model's prediction), stopped before the
    step that would change the prediction or empty the bag."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x0 = features.detach().float()
        scale = x0.abs().mean().clamp_min(1e-8)
        z0 = x0 / scale
        with torch.no_grad():
            p0 = torch.softmax(model(x0, coords).logits.float(), -1)
        if target is None:
            target = int(p0.argmax())
        predicted = int(p0.argmax()) == target

        def keeps(logits: torch.Tensor) -> bool:
            p = torch.softmax(logits.detach().float(), -1)
            return int(p.argmax()) == target if predicted else bool(p[target] >= p0[target] - 1e-6)

        def forward(z: torch.Tensor):
            z = z.detach().requires_grad_(True)
            return z, model(z * scale, coords)

        y = torch.tensor([target], device=x0.device)
        z, out = forward(z0)
        evidence = torch.zeros(len(z0), device=z0.device)
        losses, kept_steps = [], 0
        for _ in range(steps):
            loss = F.cross_entropy(out.logits.unsqueeze(0), y)
            (grad,) = torch.autograd.grad(loss, z)
            losses.append(loss.item())
            with torch.no_grad():
                evidence -= (grad * z0).sum(1)
                z_next = soft_threshold(z - lr * grad, lr * lam)
            if not z_next.any():
                break  # the bag would be empty
            z_next, out_next = forward(z_next)
            if not keeps(out_next.logits):
                break  # the step would change the prediction
            z, out, kept_steps = z_next, out_next, kept_steps + 1
        z = z.detach()
        n0 = z0.norm(dim=1).clamp_min(1e-8)
        readings = {
            "evidence": evidence,
            "inverted_attention": out.instance_scores.detach().float(),
            "survival": z.norm(dim=1) / n0,
            "change": -(z - z0).norm(dim=1) / n0,
        }
        prob = float(torch.softmax(out.logits.detach().float(), -1)[target])
        return InversionResult(
            readings[score], target, z * scale, losses, kept_steps, keeps(out.logits), prob, readings
        )
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
