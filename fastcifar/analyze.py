"""`fastcifar analyze RUN` and `fastcifar compare RUN...`: figures, tables and an HTML
report from a run directory. The report folder is built aside and renamed into place."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path

from fastcifar.analysis import analyze_predictions, misclassified
from fastcifar.data.sources import CLASSES
from fastcifar.errors import UserError
from fastcifar.train.rundir import is_training, read_metrics, read_predictions


def analyze_run(run: Path, data: str | None = None, top_pairs: int = 4, examples: int = 16,
                track: bool = True, log=print) -> tuple[Path, dict]:  # fmt: skip
    """Write `run/analysis/` (PNG figures, analysis.json, index.html) and, when the run was
    tracked, attach it to its MLflow run; returns the folder and the analysis as a dict."""
    from fastcifar import figures
    from fastcifar.data.dataset import resolve_arrays

    rows = read_metrics(run)
    probs, labels = read_predictions(run)
    a = analyze_predictions(probs, labels, top_pairs=top_pairs)
    arrays, _ = resolve_arrays(data or _run_data(run), download=False, log=log)
    if len(arrays.test_labels) != len(labels) or (arrays.test_labels != labels).any():
        raise UserError("the test set of --data does not match the run's predictions")

    out = run / "analysis"
    tmp = Path(tempfile.mkdtemp(prefix=".analysis-", dir=run))
    try:
        pictures = [
            ("Training curves", figures.training_curves({run.name: rows}, tmp / "curves.png")),
            ("Confusion matrix", figures.confusion_figure(a, CLASSES, tmp / "confusion.png")),
            ("Errors only", figures.confusion_without_diagonal_figure(a, CLASSES, tmp / "confusion_errors.png")),
            ("Errors per class", figures.per_class_errors_figure(a, CLASSES, tmp / "class_errors.png")),
        ]  # fmt: skip
        for true, pred, count in a.confused_pairs:
            picked = misclassified(probs, labels, true, pred, examples)
            name = f"pair_{CLASSES[true]}_as_{CLASSES[pred]}.png"
            path = figures.misclassified_grid(
                arrays.test_images, picked, CLASSES[true], CLASSES[pred], tmp / name
            )
            pictures.append(
                (f"{CLASSES[true]} predicted as {CLASSES[pred]} ({count} images)", path)
            )
        result = {"run": str(run), "best_epoch": _best_epoch(run), **a.to_dict(CLASSES)}
        (tmp / "analysis.json").write_text(json.dumps(result, indent=2))
        (tmp / "index.html").write_text(_html(run.name, result, pictures))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if track:
        from fastcifar.track import log_folder_to_run

        log_folder_to_run(run, out, "analysis", log=log)
    return out, result


def _run_data(run: Path) -> str | None:
    """The data a run trained on: its --data, else the source its summary recorded."""
    for name, key in (("config.json", "data"), ("summary.json", "data_source")):
        if value := _read_json(run / name).get(key):
            return value
    return None


def _best_epoch(run: Path):
    return _read_json(run / "summary.json").get("best", {}).get("epoch")


def _html(name: str, result: dict, pictures) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
        f"<td>{v['f1']:.3f}</td><td>{v['errors']}</td></tr>"
        for c, v in result["per_class"].items()
    )
    figures = "".join(
        f"<h2>{html.escape(title)}</h2><img src='{path.name}' alt='{html.escape(title)}'>"
        for title, path in pictures
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fastcifar: {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "img{max-width:100%}td,th{padding:2px 10px;text-align:right}</style></head><body>"
        f"<h1>Error analysis: {html.escape(name)}</h1>"
        f"<p>Test accuracy of the best epoch ({result['best_epoch']}): {result['accuracy']:.2%}</p>"
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>errors</th></tr>"
        f"{rows}</table>{figures}</body></html>"
    )


# The columns of a compare row, as `compare --table` writes them.
COMPARE_COLUMNS = ("run", "state", "epochs", "planned_epochs", "best_epoch", "val_acc", "test_acc",
                   "seconds")  # fmt: skip


def compare_runs(paths: list[Path], out: Path, log=print) -> list[dict]:
    """Final metrics of each run, and their curves overlaid in `out` (PNG). A path that is
    a folder of runs (a sweep's, `runs/`) stands for every run in it."""
    from fastcifar import figures

    runs = expand_runs(paths, log)
    labels = _labels(runs)
    table, curves = [], {}
    for run, label in zip(runs, labels, strict=True):
        rows = read_metrics(run)
        if not rows:
            raise UserError(f"{run} has no finished epoch")
        summary = _read_json(run / "summary.json")
        best = summary.get("best") or max(rows, key=lambda r: r.get("val_acc") or r["train_acc"])
        table.append({
            "run": label,
            "epochs": len(rows),
            "planned_epochs": _read_json(run / "config.json").get("epochs"),
            "state": run_state(run, summary),
            "best_epoch": best["epoch"],
            "val_acc": _rounded(best.get("val_acc"), 4),  # 10,000 test images: 1e-4 steps
            "test_acc": _rounded(best["test_acc"], 4),
            "seconds": round(wall_seconds(summary, rows), 1),
        })  # fmt: skip
        curves[label] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    figures.training_curves(curves, out)  # written atomically
    return table


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


def _labels(runs: list[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [run.name for run in runs]
    return [run.name if names.count(run.name) == 1 else str(run) for run in runs]


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _read_json(path: Path) -> dict:
    """A run file's JSON object; {} when the run has not written it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
