"""Optimiser, schedule, gradient clipping and initialisation from a model's `Recipe`."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..models import model_class
from ..models.recipe import SHARED, SMALL_COHORT_BAGS, Recipe


def resolve_recipe(model_name: str, cfg: TrainConfig, n_bags: int | None = None) -> Recipe:
    """The model's registered recipe (or the shared one), with the fields `cfg` sets; its
    small-cohort variant when the run has fewer than SMALL_COHORT_BAGS labelled bags."""
    base = SHARED if cfg.recipe == "shared" else model_class(model_name).recipe
    if base.small_cohort and cfg.small_cohort and n_bags is not None and n_bags < SMALL_COHORT_BAGS:
        base = base.small_cohort
    return base.override(
        optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        grad_clip=cfg.grad_clip,
    )  # fmt: skip


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., NeurIPS 2019) around an inner optimiser: every `k` steps the
    slow weights move `alpha` of the way to the fast ones and the fast ones restart there.
    TransMIL trains with Lookahead(RAdam) (timm's `lookahead_radam`, k 6, alpha 0.5)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        self.inner, self.k, self.alpha, self.steps = inner, k, alpha, 0
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = inner.state
        self.slow = [[p.detach().clone() for p in g["params"]] for g in inner.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for group, slow in zip(self.inner.param_groups, self.slow):
                for p, s in zip(group["params"], slow):
                    s.add_(p - s, alpha=self.alpha)
                    p.copy_(s)
        return loss


def build_optimizer(model: nn.Module, recipe: Recipe, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser. `fused=True`: Adam, AdamW and SGD in torch's fused form (one
    vectorised kernel for all parameters; the same update up to float rounding, not bit for
    bit) where the parameters' device has it; RAdam (Lookahead) has none and keeps its loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    r = recipe
    fuse = {"fused": True} if fused and _fusable(params) else {}
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay, **fuse)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay, **fuse)
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, **fuse)
    if r.optimizer == "radam_lookahead":
        return Lookahead(torch.optim.RAdam(params, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay))
    raise ValueError(f"unknown optimizer {r.optimizer!r}; choose adam, adamw, sgd or radam_lookahead")


def _fusable(params: list[torch.Tensor]) -> bool:
    """Torch's fused optimisers take floating-point parameters on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class Schedule:
    """The recipe's learning-rate schedule, stepped once per epoch (`step(val_loss)`)."""

    def __init__(self, opt: torch.optim.Optimizer, recipe: Recipe, epochs: int):
        r, inner = recipe, getattr(opt, "inner", opt)
        self.kind, self.sched = r.schedule, None
        if r.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, max(1, epochs), r.cosine_min_lr)
        elif r.schedule == "step":
            at = sorted({max(1, round(f * epochs)) for f in r.step_at})
            self.sched = torch.optim.lr_scheduler.MultiStepLR(inner, at, r.step_gamma)
        elif r.schedule == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                inner, "min", factor=r.plateau_factor, patience=r.plateau_patience
            )
        elif r.schedule != "none":
            raise ValueError(f"unknown schedule {r.schedule!r}; choose none, cosine, step or plateau")

    def step(self, val_loss: float) -> None:
        if self.sched is None:
            return
        if self.kind == "plateau":
            self.sched.step(val_loss)
        else:
            self.sched.step()


def apply_init(model: nn.Module, recipe: Recipe) -> None:
    """dsmil-wsi's `apply_sparse_init`: orthogonal Linear/Conv weights, zero biases."""
    if recipe.init == "default":
        return
    if recipe.init != "orthogonal":
        raise ValueError(f"unknown init {recipe.init!r}; choose default or orthogonal")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
