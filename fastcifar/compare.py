"""`fastcifar compare RUN...`: runs side by side (final metrics, overlaid curves), or
pooled over seeds: one row per setting, with the mean, spread and 95% confidence
interval of its runs' test accuracy, how far it lies from the best setting (Welch's
t-test), and what its seeds give as one ensemble."""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar.errors import UserError
from fastcifar.results import accuracy_stats, data_name, read_results
from fastcifar.train.build import (
    WINOGRAD_F4_INPUT_GRAD,
    WINOGRAD_F4_WEIGHT_GRAD,
    WINOGRAD_LAYER,
    WINOGRAD_WEIGHT_GRAD,
)
from fastcifar.train.rundir import is_training, read_json, read_metrics, read_predictions, run_data

# The columns of a compare row, as `compare --table` writes them.
COMPARE_COLUMNS = ("run", "state", "epochs", "planned_epochs", "best_epoch", "val_acc", "test_acc",
                   "seconds")  # fmt: skip
POOLED_COLUMNS = ("settings", "runs", "seeds", "test_acc_mean", "test_acc_std", "test_acc_ci95_low",
                  "test_acc_ci95_high", "vs_best", "vs_best_ci95_low", "vs_best_ci95_high",
                  "p_vs_best", "ensemble_test_acc", "val_acc_mean", "seconds_mean")  # fmt: skip

# Config fields that leave a run's result where it was: runs differing only in these
# (and in the seed) are one setting. The data counts by its file name.
NOT_SETTINGS = {"out", "seed", "data", "download", "track", "tracking_uri", "threads", "native",
                "prefetch"}  # fmt: skip
CURVE_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


def compare_runs(paths: list[Path], out: Path, log=print) -> list[dict]:
    """Final metrics of each run, and their curves overlaid in `out` (PNG). A path that is
    a folder of runs (a sweep's, `runs/`) stands for every run in it."""
    runs = _read_runs(paths, log)
    _curves({r.row["run"]: r.rows for r in runs}, out)
    return [r.row for r in runs]


def compare_settings(paths: list[Path], out: Path, log=print) -> list[dict]:
    """One row per setting: the runs (finished or early-stopped) whose configs differ only
    in their seed and in fields that do not change results, pooled; their mean curves
    overlaid in `out` (PNG)."""
    groups: dict[str, list[_Run]] = {}
    for r in _read_runs(paths, log):
        if r.row["state"] not in ("finished", "early stop"):
            log(f"{r.path}: {r.row['state']}, left out of the pooled rows")
            continue
        groups.setdefault(json.dumps(r.settings, sort_keys=True), []).append(r)
    if not groups:
        raise UserError("no finished run to pool")
    labels = _setting_labels([members[0].settings for members in groups.values()])
    rows, curves, samples = [], {}, []
    for label, members in zip(labels, groups.values(), strict=True):
        samples.append([m.best["test_acc"] for m in members])
        vals = [m.best["val_acc"] for m in members if m.best.get("val_acc") is not None]
        rows.append(_pooled_row(
            label, samples[-1], [m.seed for m in members if m.seed is not None],
            [m.row["seconds"] for m in members],
            ensemble=ensemble_accuracy([m.path for m in members]),
            val_acc_mean=statistics.fmean(vals) if vals else None,
        ))  # fmt: skip
        runs = f"{len(members)} runs" if len(members) > 1 else "1 run"
        curves[f"{label} ({runs})"] = _mean_curve([m.rows for m in members])
    for row, against in zip(rows, against_best(samples), strict=True):
        row.update(against)
    _curves(curves, out)
    return rows


def compare_records(paths: list[Path]) -> list[dict]:
    """One row per arch and recipe of recorded accuracy results (`fastcifar bench accuracy`
    files), pooled over their seeds: `compare_settings` for runs whose folders were not
    kept, without curves or ensembles. Each row is set against the best recipe of its own
    arch on its own machine."""
    records = [r for path in paths for r in read_results(path)[1]]
    if not records:
        raise UserError(f"no accuracy records in {', '.join(map(str, paths))}")
    several_machines = len({r["machine"] for r in records}) > 1
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["machine"], r["arch"], r["recipe"])):
        groups.setdefault((r["machine"], r["arch"], r["recipe"]), []).append(r)
    rows, samples = [], []
    for (machine, arch, recipe), members in groups.items():
        samples.append([m["test_acc"] for m in members])
        label = f"{arch}, recipe={recipe}" + (f" ({machine})" if several_machines else "")
        rows.append(_pooled_row(label, samples[-1], [m["seed"] for m in members],
                                [m["seconds"]["total"] for m in members]))  # fmt: skip
    keys = [key[:2] for key in groups]  # (machine, arch) of each row
    for machine_arch in set(keys):
        same = [i for i, key in enumerate(keys) if key == machine_arch]
        for i, against in zip(same, against_best([samples[i] for i in same]), strict=True):
            rows[i].update(against)
    return rows


def _pooled_row(
    label: str,
    accuracies: list[float],
    seeds: list[int],
    seconds: list[float],
    ensemble: float | None = None,
    val_acc_mean: float | None = None,
) -> dict:
    """A pooled row (POOLED_COLUMNS but the vs-best ones) from its runs' test accuracies."""
    stats = accuracy_stats(accuracies)
    low, high = stats["ci95"] or (None, None)
    return {
        "settings": label,
        "runs": len(accuracies),
        "seeds": " ".join(str(s) for s in sorted(seeds)),
        "test_acc_mean": round(stats["mean"], 4),
        "test_acc_std": round(stats["std"], 4) if len(accuracies) > 1 else None,
        "test_acc_ci95_low": _rounded(low, 4),
        "test_acc_ci95_high": _rounded(high, 4),
        "ensemble_test_acc": _rounded(ensemble, 4),
        "val_acc_mean": _rounded(val_acc_mean, 4),
        "seconds_mean": round(statistics.fmean(seconds), 1),
    }


def ensemble_accuracy(runs: list[Path]) -> float | None:
    """Test accuracy of the runs' softmax outputs averaged (each run's best epoch, from
    predictions.npz): what the seeds give as one ensemble. None for a single run, a run
    without predictions, or runs tested on other images."""
    if len(runs) < 2 or not all((run / "predictions.npz").exists() for run in runs):
        return None
    outputs = [read_predictions(run) for run in runs]
    labels = outputs[0][1]
    if any(not np.array_equal(y, labels) for _, y in outputs):
        return None
    mean = np.mean([probs.astype(np.float64) for probs, _ in outputs], axis=0)
    return float((mean.argmax(axis=1) == labels).mean())


def against_best(samples: list[list[float]]) -> list[dict]:
    """For each sample of test accuracies, its mean's difference from the sample with the
    highest mean, with the 95% confidence interval of that difference and the two-sided
    p-value of Welch's t-test (unequal variances); both need two runs or more a side, and
    some spread on one side at least."""
    from scipy import stats

    best = max(samples, key=statistics.fmean)
    best_mean = statistics.fmean(best)
    rows = []
    for sample in samples:
        row = {"vs_best": round(statistics.fmean(sample) - best_mean, 4),
               "vs_best_ci95_low": None, "vs_best_ci95_high": None, "p_vs_best": None}  # fmt: skip
        paired = sample is not best and len(sample) > 1 and len(best) > 1
        if paired and max(statistics.stdev(sample), statistics.stdev(best)) > 0:
            with warnings.catch_warnings():  # one side without spread (equal seeds) is fine
                warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
                test = stats.ttest_ind(sample, best, equal_var=False)
            low, high = test.confidence_interval(0.95)
            row.update(vs_best_ci95_low=round(float(low), 4),
                       vs_best_ci95_high=round(float(high), 4),
                       p_vs_best=round(float(test.pvalue), 4))  # fmt: skip
        rows.append(row)
    return rows


@dataclass
class _Run:
    row: dict  # the compare row
    rows: list[dict]  # metrics.jsonl
    best: dict  # the best-validation epoch's metrics, unrounded
    settings: dict  # what makes it the same experiment as another run
    seed: int | None
    path: Path


def _read_runs(paths: list[Path], log) -> list[_Run]:
    """Each run `paths` name. A run named itself that cannot be read stops the comparison;
    one found in a folder of runs is left out, with a note, and the others compared."""
    runs = []
    for run, label in _named(expand_runs(paths, log)):
        try:
            runs.append(_read_run(run, label))
        except UserError as exc:
            if run in paths:
                raise
            log(f"{exc}; left out")
    if not runs:
        raise UserError(f"no run to compare in {', '.join(map(str, paths))}")
    return runs


def _read_run(run: Path, label: str) -> _Run:
    rows = read_metrics(run)
    if not rows:
        raise UserError(f"{run} has no finished epoch")
    summary = read_json(run / "summary.json")
    config = read_json(run / "config.json")
    best = summary.get("best") or max(rows, key=lambda r: r.get("val_acc") or r["train_acc"])
    row = {
        "run": label,
        "epochs": len(rows),
        "planned_epochs": config.get("epochs"),
        "state": run_state(run, summary),
        "best_epoch": best["epoch"],
        "val_acc": _rounded(best.get("val_acc"), 4),  # 10,000 test images: 1e-4 steps
        "test_acc": _rounded(best["test_acc"], 4),
        "seconds": round(wall_seconds(summary, rows), 1),
    }
    settings = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    data = run_data(run)
    settings["data"] = data_name(data) if data else None
    if "winograd" in config:
        keys = (
            "winograd",
            "winograd_weight_grad",
            "winograd_grad_tile",
            "winograd_input_grad_tile",
        )
        settings |= dict(zip(keys, winograd_ran(config, run), strict=True))
    return _Run(row, rows, best, settings, config.get("seed"), run)


def winograd_ran(config: dict, run: Path) -> tuple[str, str, int, int]:
    """Whether the run's 3x3 convolutions ran as Winograd, and whether their weight
    gradient did too, each "on" or "off", that gradient's tile (2 or 4) and the bf16 input
    gradient's, from the layers its env.json records (`auto` and an unset tile decide by
    the CPU and the precision); a run from before they were recorded gives its flags (one
    from before the weight gradient's flag, "off"; from before a tile's, 2)."""
    layers = read_json(run / "env.json").get("native_layers")
    if layers is None:
        flags = config["winograd"], config.get("winograd_weight_grad", "off")
        return *flags, config.get("winograd_grad_tile") or 2, 2
    winograd = [name for name in layers if name.startswith(WINOGRAD_LAYER)]
    grad = any(WINOGRAD_WEIGHT_GRAD in name for name in winograd)
    tile = 4 if any(WINOGRAD_F4_WEIGHT_GRAD in name for name in winograd) else 2
    input_tile = 4 if any(WINOGRAD_F4_INPUT_GRAD in name for name in winograd) else 2
    return ("on" if winograd else "off"), ("on" if grad else "off"), tile, input_tile


def expand_runs(paths: list[Path], log=print) -> list[Path]:
    """The run directories `paths` name: a run itself, or each run anywhere below a folder
    (a sweep's runs are in its `trials/`). A run in a folder that has not finished an
    epoch yet is left out, with a note."""
    runs = []
    for path in paths:
        inner = sorted(p.parent for p in path.rglob("config.json") if p.parent != path)
        if (path / "metrics.jsonl").exists() or not inner:
            runs.append(path)  # read_metrics says what is wrong with a path that is no run
            continue
        for run in inner:
            if (run / "metrics.jsonl").exists():
                runs.append(run)
            else:
                log(f"{run}: no finished epoch yet, left out")
    return runs


def wall_seconds(summary: dict, rows: list[dict]) -> float:
    """The run's wall time: the summary's, else up to its last epoch (runs from before
    the rows kept it: their epochs' training seconds)."""
    if "seconds" in summary:
        return summary["seconds"]["total"]
    return rows[-1].get("wall_seconds", sum(r["seconds"] for r in rows))


def run_state(run: Path, summary: dict) -> str:
    """training (a process holds the run now), finished, early stop, or unfinished
    (interrupted: `--resume` goes on)."""
    if is_training(run):
        return "training"
    if not summary:
        return "unfinished"
    return "early stop" if summary.get("stopped") else "finished"


def _named(runs: list[Path]) -> list[tuple[Path, str]]:
    """Each run with its folder name, or its whole path where two runs share a name."""
    names = [run.name for run in runs]
    return [(run, run.name if names.count(run.name) == 1 else str(run)) for run in runs]


def _setting_labels(settings: list[dict]) -> list[str]:
    """Each setting named by its arch and the fields in which it differs from the other
    settings of that arch (the fields an arch's recipe sets follow from the arch)."""
    labels = []
    for s in settings:
        same_arch = [o for o in settings if o.get("arch") == s.get("arch")]
        keys = sorted(k for k in s if k != "arch" and any(o.get(k) != s[k] for o in same_arch))
        labels.append(", ".join([str(s.get("arch")), *(f"{k}={s[k]}" for k in keys)]))
    return labels


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
    """Epoch by epoch, each metric's mean over the runs, as far as every run went, and
    with two runs or more its standard deviation (`<metric>_std`, the figure's band)."""
    curve = []
    for epoch_rows in zip(*runs, strict=False):
        row = {"epoch": epoch_rows[0]["epoch"]}
        for field in CURVE_FIELDS:
            values = [r.get(field) for r in epoch_rows]
            row[field] = statistics.fmean(values) if None not in values else None
            if row[field] is not None and len(values) > 1:
                row[f"{field}_std"] = statistics.stdev(values)
        curve.append(row)
    return curve


def _curves(curves: dict[str, list[dict]], out: Path) -> None:
    from fastcifar import figures

    out.parent.mkdir(parents=True, exist_ok=True)
    figures.training_curves(curves, out)  # written atomically


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
