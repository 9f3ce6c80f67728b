"""The validation split held out of the training set."""

from __future__ import annotations

import numpy as np

from fastcifar.errors import UserError


def validation_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices): `n_val` images held out, balanced over classes.

    Each class gives n_val // n_classes images (the first n_val % n_classes classes one
    more), drawn with a generator seeded by `seed`. Both index arrays are sorted.
    """
    if n_val < 0 or n_val >= len(labels):
        raise UserError(
            f"--val must be in 0..{len(labels) - 1} (the data has {len(labels)} training "
            f"images), not {n_val}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    val = []
    for i, cls in enumerate(classes):
        members = np.flatnonzero(labels == cls)
        take = n_val // len(classes) + (1 if i < n_val % len(classes) else 0)
        if take > len(members):
            raise UserError(f"--val {n_val} asks for more images of class {cls} than exist")
        val.append(rng.choice(members, size=take, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx
