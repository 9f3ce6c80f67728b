"""Optimisers and learning-rate schedules, built from the config with torch.optim."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from fastcifar.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW. Weight decay skips biases and norm weights.
    With `fused_optimizer` a step is torch's fused implementation, one kernel a parameter
    group; otherwise torch picks (for-loop on the CPU, foreach on CUDA). On the CPU the
    fused step alone is 2x to 13x faster; whole training steps gained on a CPU with AMX,
    where it is the default (`recipes.AMX_CPU_RECIPES`), and not measurably on one with
    AVX512-BF16 alone (benchmarks/NOTES.md)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = True if cfg.fused_optimizer else None
    if cfg.optimizer == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov,
                               fused=fused)  # fmt: skip
    betas = (cfg.momentum if 0 < cfg.momentum < 1 else 0.9, 0.999)
    optimizer_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=cfg.lr, betas=betas, fused=fused)


class Schedule:
    """A per-step schedule (constant, step, cosine, onecycle, with optional warm-up) or a
    per-epoch reduce-on-plateau on validation accuracy, behind one interface."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        total = cfg.epochs * steps_per_epoch
        warmup = int(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule != "onecycle" else 0
        self.plateau = None
        if cfg.schedule == "plateau":
            self.plateau = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.gamma, patience=2
            )
            main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        elif cfg.schedule == "onecycle":
            # OneCycleLR divides by its rising phase's length, pct_start * total - 1 steps:
            # zero for a 4-step run (a small --subset), which then rises a little longer.
            rise = 0.25 if total != 4 else 0.3
            main = lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, total_steps=total, pct_start=rise,
                cycle_momentum=False, div_factor=10, final_div_factor=100,
            )  # fmt: skip
        elif cfg.schedule == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
        elif cfg.schedule == "step":
            main = lr_scheduler.StepLR(optimizer, cfg.step_epochs * steps_per_epoch, cfg.gamma)
        else:
            main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        if warmup:
            ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
            main = lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
        self.per_step = main

    def step(self) -> None:
        """After every optimiser step."""
        self.per_step.step()

    def end_epoch(self, val_acc: float | None) -> None:
        if self.plateau is not None and val_acc is not None:
            self.plateau.step(val_acc)

    def state_dict(self) -> dict:
        state = {"per_step": self.per_step.state_dict()}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
