"""A sweep file, read and checked (`read_sweep`, `SweepSpec`), and how a choice travels
through Optuna, which takes only scalars (`encode_choice`, `decode_choice`,
`point_key`).

A sweep file is TOML. Its `[search]` table names the space: a list is an axis, a scalar
is fixed, and an axis of tables sets several options together (the paper's "SGD with
momentum 0.5"). An optional `[sampler]` table picks `type = "grid"` (default) or
`"tpe"` with a `trials` budget, a `seed`, and `prune` (median pruning on val accuracy).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from fastcifar.config import MAX_SEED, TrainConfig, load_toml, read_text
from fastcifar.errors import UserError

CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
SWEEP_ONLY = {"out", "resume"}  # per-trial values the sweep owns


@dataclass(frozen=True)
class SweepSpec:
    name: str
    axes: dict[str, list]  # axis name -> choices (scalars, or dicts of options)
    fixed: dict
    sampler: str  # grid | tpe
    trials: int | None  # tpe budget
    seed: int
    prune: bool
    path: Path  # the sweep file
    text: str  # its contents as read when the sweep began, which every worker parses

    def grid(self) -> list[dict]:
        """Every combination's options, in file order."""
        names = list(self.axes)
        return [
            self.options(dict(zip(names, combo, strict=True)))
            for combo in product(*self.axes.values())
        ]

    def planned(self) -> int:
        """How many trials the sweep runs: every grid point, or the TPE budget."""
        return len(self.grid()) if self.sampler == "grid" else self.trials

    def options(self, choice: dict) -> dict:
        """Config options for one choice per axis: fixed values, then each axis' value."""
        values = dict(self.fixed)
        for name, value in choice.items():
            values.update(value if isinstance(value, dict) else {name: value})
        return values


def read_sweep(path: Path, text: str | None = None) -> SweepSpec:
    """The sweep file at `path`, or `text` read from it earlier (a worker parses the text
    its sweep read, so that an edit of the file during a sweep changes nothing in it)."""
    text = read_text(path, "sweep file") if text is None else text
    raw = load_toml(path, "sweep file", text)
    unknown_tables = set(raw) - {"search", "sampler"}
    if unknown_tables or "search" not in raw:
        raise UserError(
            f"{path}: a sweep file has a [search] table and an optional [sampler] table"
        )
    axes, fixed = {}, {}
    for key, value in raw["search"].items():
        name = key.replace("-", "_")
        if isinstance(value, list):
            if not value:
                raise UserError(f"{path}: axis {key!r} is empty")
            if all(isinstance(v, dict) for v in value):
                value = [{k.replace("-", "_"): v for k, v in d.items()} for d in value]
                keys = {k for d in value for k in d}
            else:
                keys = {name}
            axes[name] = value
        else:
            fixed[name] = value
            keys = {name}
        bad = (keys - CONFIG_FIELDS) | (keys & SWEEP_ONLY)
        if bad:
            raise UserError(f"{path}: unknown or sweep-owned option(s) {', '.join(sorted(bad))}")
    sampler = {k.replace("-", "_"): v for k, v in raw.get("sampler", {}).items()}
    unknown = set(sampler) - {"type", "trials", "seed", "prune"}
    if unknown:
        raise UserError(f"{path}: unknown [sampler] keys {', '.join(sorted(unknown))}")
    kind = sampler.get("type", "grid")
    if kind not in ("grid", "tpe"):
        raise UserError(f"{path}: sampler type must be 'grid' or 'tpe', not {kind!r}")
    trials = sampler.get("trials")
    if kind == "tpe" and (not isinstance(trials, int) or trials <= 0):
        raise UserError(f"{path}: a tpe sampler needs a positive 'trials' budget")
    seed, prune = sampler.get("seed", 0), sampler.get("prune", True)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise UserError(
            f"{path}: the sampler's seed must be an integer in 0..{MAX_SEED}, not {seed!r}"
        )
    if not isinstance(prune, bool):
        raise UserError(f"{path}: the sampler's prune must be true or false, not {prune!r}")
    spec = SweepSpec(path.stem, axes, fixed, kind, trials, seed, prune, path, text)
    for options in spec.grid():  # every point must be a valid training config
        _check(options, path)
    return spec


def _check(options: dict, path: Path) -> None:
    try:
        TrainConfig.from_dict({"arch": "lenet", **options})
    except UserError as exc:
        raise UserError(f"{path}: {exc} (in {json.dumps(options)})") from None
    from fastcifar.models import check_arch

    try:
        check_arch(options.get("arch", "lenet"))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def encode_choice(value) -> str | int | float | bool:
    """Optuna choices must be scalars: tables travel as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def decode_choice(value):
    if isinstance(value, str) and value.startswith("{"):
        return json.loads(value)
    return value


def point_key(params: dict) -> str:
    """A grid point's identity across trials: its Optuna params as sorted JSON text."""
    return json.dumps(params, sort_keys=True)
