"""`fastcifar analyze RUN`: figures, tables and an HTML report from a run directory. The
report folder is built aside and renamed into place."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path

from fastcifar.analysis import analyze_predictions, misclassified
from fastcifar.atomic import replace_folder
from fastcifar.data.sources import CLASSES
from fastcifar.errors import UserError
from fastcifar.train.rundir import read_json, read_metrics, read_predictions, run_data


def analyze_run(run: Path, data: str | None = None, top_pairs: int = 4, examples: int = 16,
                track: bool = True, log=print) -> tuple[Path, dict]:  # fmt: skip
    """Write `run/analysis/` (PNG figures, analysis.json, index.html) and, when the run was
    tracked, attach it to its MLflow run; returns the folder and the analysis as a dict."""
    from fastcifar import figures
    from fastcifar.data.dataset import resolve_arrays

    rows = read_metrics(run)
    probs, labels = read_predictions(run)
    a = analyze_predictions(probs, labels, top_pairs=top_pairs)
    arrays, _ = resolve_arrays(data or run_data(run), download=False, log=log)
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
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if track:
        from fastcifar.track import log_folder_to_run

        log_folder_to_run(run, out, "analysis", log=log)
    return out, result


def _best_epoch(run: Path):
    return read_json(run / "summary.json").get("best", {}).get("epoch")


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
