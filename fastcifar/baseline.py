"""The peer baseline: the usual tutorial pipeline, kept here so benchmarks measure it.

A torchvision-style CIFAR10 dataset (a PIL image per sample), a DataLoader with
per-image RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize, and an
eager fp32 NCHW model trained with plain SGD steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fastcifar.data.augment import MEAN, STD


class TutorialCIFAR10(Dataset):
    """What torchvision.datasets.CIFAR10.__getitem__ does: PIL image, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def tutorial_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def tutorial_eval_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def tutorial_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int = 0,
                    train: bool = True):  # fmt: skip
    """The tutorial's DataLoader, per-image transforms in `workers` processes: for
    training shuffled and augmented, for evaluation in order and only normalised."""
    transform = tutorial_transform() if train else tutorial_eval_transform()
    dataset = TutorialCIFAR10(np.asarray(images), np.asarray(labels), transform)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=workers, drop_last=train,
        persistent_workers=workers > 0,
    )  # fmt: skip


def tutorial_step(model: torch.nn.Module, x, y, optimizer) -> torch.Tensor:
    """The tutorial's training step: eager fp32, no autocast, NCHW."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
