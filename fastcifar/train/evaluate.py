"""Evaluation: loss, accuracy and predictions of a model over a loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcifar.train.device import autocast


@dataclass
class EvalResult:
    loss: float
    acc: float  # fraction 0..1
    probs: torch.Tensor  # float32 (N, classes) softmax probabilities, on the CPU
    labels: torch.Tensor  # int64 (N,), on the CPU


@torch.no_grad()
def evaluate(model, loader, amp: str, device: torch.device, tta: bool = False) -> EvalResult:
    """Evaluate in eval mode; with `tta`, average the logits of each image and its mirror."""
    was_training = model.training
    model.eval()
    probs, labels, loss_sum = [], [], torch.zeros((), device=device)
    for x, y in loader:
        with autocast(amp, device):
            logits = model(x)
            if tta:
                logits = (logits + model(x.flip(-1))) / 2
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1))  # kept on the device: no sync per batch
        labels.append(y)
    model.train(was_training)
    probs_all, labels_all = torch.cat(probs).cpu(), torch.cat(labels).cpu()  # host sync
    n = len(labels_all)
    acc = (probs_all.argmax(1) == labels_all).float().mean().item()
    return EvalResult(loss_sum.item() / n, acc, probs_all, labels_all)
