"""A sweep's result table: a row per grid point with the paper's columns (model,
duration, lr, optimiser, accuracy, epochs needed) and the sweep's other axes, as the log
shows each trial and as results.csv and results.md hold them."""

from __future__ import annotations

from pathlib import Path

from fastcifar.config import TrainConfig
from fastcifar.sweep_spec import SweepSpec, decode_choice, point_key

RESULT_COLUMNS = (
    "trial",
    "model",
    "duration",
    "lr",
    "optimizer",
    "accuracy",
    "epochs_needed",
    "state",
)
PAPER_AXES = ("arch", "lr", "optimizer")  # the axes the paper's columns already show


def results(study, spec: SweepSpec) -> list[dict]:
    """One row per grid point (the latest finished trial of each): the paper's columns, and
    after the optimiser one column per other axis (a seed axis, say), in file order."""
    latest: dict[str, object] = {}
    rank = {"FAIL": -1, "PRUNED": 0, "COMPLETE": 1}  # completed beats pruned beats failed
    for trial in study.trials:
        if trial.state.name not in rank or trial.user_attrs.get("duplicate"):
            continue
        if trial.state.name == "FAIL" and "error" not in trial.user_attrs:
            continue  # a dead worker's trial: retried, not a result
        key = point_key(trial.params)
        if key not in latest or rank[trial.state.name] >= rank[latest[key].state.name]:
            latest[key] = trial
    rows = []
    for trial in sorted(latest.values(), key=lambda t: t.number):
        choice = {name: decode_choice(value) for name, value in trial.params.items()}
        options = spec.options(choice)
        # studies from before the "trained" record show the sweep file's options only
        trained = trial.user_attrs.get("trained") or options
        optimizer = trained.get("optimizer", "")
        if optimizer == "sgd" and "momentum" in trained:
            optimizer = f"sgd m={trained['momentum']}"
        duration = trial.user_attrs.get("duration_s")
        rows.append({
            "trial": trial.number,
            "model": options.get("arch", TrainConfig.arch),
            "duration": _minutes(duration) if duration is not None else "",
            "lr": trained.get("lr", ""),
            "optimizer": optimizer,
            **{name: _shown(choice.get(name, "")) for name in _other_axes(spec)},
            "accuracy": f"{trial.user_attrs['test_acc']:.2%}" if "test_acc" in trial.user_attrs else "",
            "epochs_needed": trial.user_attrs.get("epochs_needed", ""),
            "state": "failed" if trial.state.name == "FAIL" else trial.state.name.lower(),
            "val_acc": trial.value,
            "error": trial.user_attrs.get("error", ""),
        })  # fmt: skip
    return rows


def trial_line(row: dict, spec: SweepSpec) -> str:
    """A finished trial as the sweep's log shows it: the paper's columns and every other axis."""
    axes = "".join(f", {name} {row[name]}" for name in _other_axes(spec))
    if row["state"] == "failed":
        return (f"trial {row['trial']} failed: {row['model']}, lr {row['lr']}, "
                f"{row['optimizer']}{axes}: {row['error']}")  # fmt: skip
    return (f"trial {row['trial']} {row['state']}: {row['model']}, lr {row['lr']}, "
            f"{row['optimizer']}{axes}: {row['accuracy']} test at epoch {row['epochs_needed']}, "
            f"{row['duration']}")  # fmt: skip


def result_columns(spec: SweepSpec) -> list[str]:
    """The result table's columns: the paper's, with the sweep's other axes."""
    at = RESULT_COLUMNS.index("optimizer") + 1
    return [*RESULT_COLUMNS[:at], *_other_axes(spec), *RESULT_COLUMNS[at:]]


def _other_axes(spec: SweepSpec) -> list[str]:
    return [name for name in spec.axes if name not in PAPER_AXES]


def _shown(value) -> str:
    """An axis value as the table shows it: a table of options as `key=value ...`."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def write_results(rows: list[dict], spec: SweepSpec, out: Path) -> None:
    from fastcifar.tables import write_table

    columns = result_columns(spec)
    write_table(rows, [*columns, "val_acc", "error"], out / "results.csv")
    write_table(rows, columns, out / "results.md")
