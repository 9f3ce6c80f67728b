"""`fastcifar analyze` and `compare`: finished run directories, one at a time or side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastcifar.cli.arguments import RUN_DATA_HELP, figure_path
from fastcifar.errors import UserError


def register(commands) -> None:
    from fastcifar.tables import table_path

    an = commands.add_parser("analyze", help="error analysis of a run: figures and an HTML report")
    an.add_argument("run", type=Path, help="a run directory")
    an.add_argument("--data", help=RUN_DATA_HELP)
    an.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                    help="attach the report to the run's MLflow run, when it was tracked")  # fmt: skip
    an.set_defaults(handler=analyze)

    co = commands.add_parser("compare", help="runs side by side: final metrics and overlaid curves")
    co.add_argument("runs", type=Path, nargs="+",
                    help="run directories or folders of runs; or accuracy results files "
                         "(.json, from `fastcifar bench accuracy`), pooled per arch and recipe")  # fmt: skip
    co.add_argument(
        "--out", type=figure_path, default=Path("compare.png"), help="curves figure (PNG)"
    )
    co.add_argument("--table", type=table_path,  # a wrong suffix fails before the work
                    help="also write the table here (.csv or .md)")  # fmt: skip
    co.add_argument("--pool-seeds", action="store_true",
                    help="one row per setting: runs differing only in --seed pooled (mean, "
                         "std, 95%% CI of test accuracy), their mean curves drawn")  # fmt: skip
    co.set_defaults(handler=side_by_side)


def analyze(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastcifar.analyze import analyze_run

    console = Console()
    out, result = analyze_run(args.run, args.data, track=args.track, log=console.print)
    table = Table(title=f"{args.run.name}: test accuracy {result['accuracy']:.2%}")
    for column in ("class", "precision", "recall", "F1", "errors"):
        table.add_column(column, justify="right")
    for name, v in result["per_class"].items():
        table.add_row(
            name, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["errors"])
        )
    console.print(table)
    pairs = ", ".join(
        f"{p['true']}->{p['predicted']} {p['count']}" for p in result["confused_pairs"]
    )
    console.print(f"most confused: {pairs}", highlight=False)
    console.print(f"report: {out / 'index.html'}", highlight=False)
    return 0


def side_by_side(args) -> int:
    from fastcifar import compare
    from fastcifar.display import table_console
    from fastcifar.tables import write_table

    console = table_console()

    def log(text):
        console.print(text, style="dim")

    results_files = [path.suffix == ".json" for path in args.runs]
    if any(results_files) and not all(results_files):
        raise UserError("compare takes run directories or results files (.json), not both")
    if any(results_files):  # records: the seeds are pooled whatever --pool-seeds says
        rows, columns = compare.compare_records(args.runs), compare.POOLED_COLUMNS
        console.print(_pooled_table(rows, "recorded results, pooled over seeds (vs best: the "
                                          "best recipe of the same arch)"))  # fmt: skip
    elif args.pool_seeds:
        rows, columns = compare.compare_settings(args.runs, args.out, log), compare.POOLED_COLUMNS
        console.print(_pooled_table(rows))
    else:
        rows, columns = compare.compare_runs(args.runs, args.out, log), compare.COMPARE_COLUMNS
        console.print(_runs_table(rows))
    if not any(results_files):
        print(f"curves: {args.out}")
    if args.table:
        write_table(rows, list(columns), args.table)
        print(f"table: {args.table}")
    return 0


def _runs_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="runs")
    table.add_column("run", no_wrap=True)
    for column in ("state", "epochs", "best epoch", "val acc", "test acc", "seconds"):
        table.add_column(column, justify="right")
    for r in rows:
        planned = r["planned_epochs"]
        table.add_row(r["run"], r["state"], f"{r['epochs']}/{planned}" if planned else str(r["epochs"]),
                      str(r["best_epoch"]), _percent(r["val_acc"]), _percent(r["test_acc"]),
                      f"{r['seconds']:.0f}")  # fmt: skip
    return table


def _pooled_table(
    rows: list[dict],
    title: str = "settings, pooled over seeds (test accuracy of each best-val epoch)",
):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("settings")
    for column in ("runs", "test acc", "95% CI", "vs best (points)", "p (Welch)", "ensemble",
                   "val acc", "seconds"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in rows:
        spread = f" ± {_percent(r['test_acc_std'])}" if r["runs"] > 1 else ""
        low, high = r["test_acc_ci95_low"], r["test_acc_ci95_high"]
        table.add_row(r["settings"], str(r["runs"]), _percent(r["test_acc_mean"]) + spread,
                      f"{100 * low:.2f}-{100 * high:.2f}%" if low is not None else "-",
                      _against_best(r), f"{r['p_vs_best']:.3f}" if r["p_vs_best"] is not None else "-",
                      _percent(r["ensemble_test_acc"]), _percent(r["val_acc_mean"]), f"{r['seconds_mean']:.0f}")  # fmt: skip
    return table


def _against_best(row: dict) -> str:
    low, high = row["vs_best_ci95_low"], row["vs_best_ci95_high"]
    interval = f" [{100 * low:+.2f},{100 * high:+.2f}]" if low is not None else ""
    return f"{100 * row['vs_best']:+.2f}{interval}"


def _percent(fraction: float | None) -> str:
    return f"{fraction:.2%}" if fraction is not None else "-"
