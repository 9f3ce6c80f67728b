"""Accuracy results: records built from finished run directories, and their statistics.

A record is derived from a run's own files (config.json, env.json, metrics.jsonl,
summary.json), never typed in, so a committed result always points back to a run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fastcifar.config import TrainConfig
from fastcifar.data.cache import entry_source, is_entry
from fastcifar.errors import UserError
from fastcifar.recipes import named_recipe
from fastcifar.train.rundir import read_metrics

# Test accuracy the paper reports per arch: its own networks (sections 2 and 4), the best
# Table 1 row of each conv4 variant that converged, and the figures it quotes for the two
# designs it cites (section 4.3: ref. [2] 86%, ref. [3] 81%).
PAPER_ACCURACY = {
    "lenet": 0.62,
    "conv3": 0.73,
    "conv5": 0.85,
    "cerberus": 0.821,
    "conv4_leaky": 0.7569,
    "conv4_leaky_dropout": 0.6770,
    "wide4": 0.86,
    "sinha14": 0.81,
}
LEVELS = (0.6, 0.7, 0.8, 0.85, 0.9)
# The config fields that make a recipe: a run recorded under a recipe's name must match
# them. Paths, seeds, loaders and speed switches may differ between runs of one recipe.
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov",
                 "weight_decay", "schedule", "warmup_epochs", "step_epochs", "gamma",
                 "label_smoothing", "dropout", "activation", "patience", "crop_pad", "flip",
                 "cutout", "val", "subset", "split_seed")  # fmt: skip


def recipe_differences(config: dict, recipe: str, device: str) -> list[str]:
    """Where a run's config departs from recipe `recipe` of its arch on `device`, as
    "field value (recipe: value)" strings; empty when it follows the recipe."""
    want = TrainConfig.from_dict(named_recipe(config["arch"], recipe, device)).to_dict()
    return [f"{field} {config.get(field)} (recipe: {want[field]})"
            for field in RECIPE_FIELDS if config.get(field) != want[field]]  # fmt: skip


def run_record(run: Path, recipe: str) -> dict:
    """One accuracy record from a finished run directory."""
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    try:
        config = json.loads((run / "config.json").read_text())
        env = json.loads((run / "env.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{run} is not a finished run: {Path(exc.filename).name} missing") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the run files of {run}: {exc}") from None
    differences = recipe_differences(config, recipe, env["device"])
    if differences:
        raise UserError(f"{run} was not trained with the {recipe} recipe of {config['arch']}: "
                        + ", ".join(differences))  # fmt: skip
    rows = read_metrics(run)
    levels = {str(level): level for level in LEVELS}
    if config["arch"] in PAPER_ACCURACY:
        levels["paper"] = PAPER_ACCURACY[config["arch"]]
    elapsed, reached = 0.0, {}
    for row in rows:  # time to each accuracy level: epoch and training seconds
        elapsed += row["seconds"]
        for name, level in levels.items():
            if row["test_acc"] >= level and name not in reached:
                reached[name] = {"epoch": row["epoch"], "train_seconds": round(elapsed, 1)}
    return {
        "arch": config["arch"],
        "recipe": recipe,
        "seed": config["seed"],
        "test_acc": summary["best"]["test_acc"],
        "best_epoch": summary["best"]["epoch"],
        "epochs_run": summary["epochs_run"],
        "seconds": summary["seconds"],
        "images_per_sec": summary["images_per_sec"],
        "reached": reached,
        "amp": config["amp"],
        "batch_size": config["batch_size"],
        "data": data_name(summary.get("data_source") or ""),
        "device": env["device"],
        "device_name": env["device_name"],
        "torch": env["torch"],
        "native_layers": env.get("native_layers"),  # absent from runs before it was recorded
        "run": run.name,
    }


# What each kind of results file holds: its list, and the fields every entry of it needs.
RESULT_FIELDS = {
    "side_by_side": (
        "results",
        ("arch", "fastcifar_images_per_sec", "baseline_images_per_sec", "speedup"),
    ),
    "accuracy": (
        "records",
        ("arch", "recipe", "seed", "test_acc", "seconds"),
    ),
}


def read_results(path: Path) -> tuple[list[dict], list[dict]]:
    """(throughput entries, accuracy records) of one results file, each with its machine;
    ([], []) for a JSON file of another kind."""
    kind, machine, items = _parse_kind(read_json(path), path)
    tagged = [{**item, "machine": machine} for item in items]
    return (tagged, []) if kind == "side_by_side" else ([], tagged)


def read_accuracy_file(path: Path) -> tuple[str, list[dict], list[str]]:
    """(machine, records, commands) of an accuracy results file, the records as written
    and the commands that wrote them, oldest first; any other file is refused."""
    data = read_json(path)
    kind, machine, items = _parse_kind(data, path)
    if kind != "accuracy":
        raise UserError(f"{path} is not an accuracy results file")
    if not all("run" in item for item in items):  # a new record replaces its run's old one
        raise UserError(f"{path}: a record without run")
    commands = data.get("commands", [data["command"]] if "command" in data else [])
    if not (isinstance(commands, list) and all(isinstance(c, str) for c in commands)):
        raise UserError(f"{path}: commands is not a list of command lines")
    return machine, items, commands


def read_json(path: Path):
    """A JSON file's contents; a missing, unreadable or invalid file is a one-line error."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def _parse_kind(data, path: Path) -> tuple[str | None, str | None, list[dict]]:
    """(kind, machine, entries) of a results file's contents `data`; (None, None, []) for
    JSON of no kind fastcifar writes."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in RESULT_FIELDS:
        return None, None, []
    key, fields = RESULT_FIELDS[kind]
    items = data.get(key)
    if not isinstance(data.get("machine"), str) or not isinstance(items, list):
        raise UserError(f"{path} is not a fastcifar {kind} results file: no machine or {key}")
    for item in items:
        missing = [f for f in fields if f not in item] if isinstance(item, dict) else fields
        if missing:
            raise UserError(f"{path}: a {key[:-1]} without {', '.join(missing)}")
    return kind, data["machine"], items


def data_name(source: str) -> str:
    """A data source's file name; for a cache entry, that of the source it was decoded from."""
    path = Path(source)
    if is_entry(path) and (original := entry_source(path)):
        path = Path(original)
    return path.name


def accuracy_stats(values: list[float]) -> dict:
    """Mean, standard deviation, min and a 95% confidence interval (Student t)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else None
    return {"runs": n, "mean": mean, "std": std, "min": min(values),
            "ci95": [mean - half, mean + half] if half is not None else None}  # fmt: skip
