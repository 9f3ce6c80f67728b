"""`fastcifar sweep`: a grid or TPE search over train options, as an Optuna study."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastcifar.cli.arguments import positive_int
from fastcifar.interrupts import stop_with_parent


def register(commands) -> None:
    sw = commands.add_parser("sweep", help="grid or TPE search over train options (Optuna)")
    sw.add_argument("file", type=Path, help="sweep file (TOML) with a [search] table")
    sw.add_argument("--storage", help="Optuna storage URL (default: sqlite in the sweep folder)")
    sw.add_argument(
        "--workers", type=positive_int, default=1, help="worker processes on this machine"
    )
    sw.add_argument("--resume", action="store_true", help="continue an existing study")
    sw.add_argument("--out", type=Path, help="sweep folder (default: sweeps/<file name>)")
    sw.add_argument("--data", help="CIFAR-10 source for every trial")
    sw.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                    help="MLflow tracking (a parent run and one child run per trial)")  # fmt: skip
    sw.add_argument("--tracking-uri", help="MLflow tracking URI")
    sw.add_argument("--heartbeat", type=positive_int, default=10, help="worker heartbeat, seconds")
    sw.add_argument("--worker-of", help=argparse.SUPPRESS)
    sw.set_defaults(handler=run)


def run(args) -> int:
    from fastcifar import sweep
    from fastcifar.sweep_results import result_columns, trial_line
    from fastcifar.sweep_spec import read_sweep

    if args.worker_of:  # one worker process, started by the sweep command
        spec = read_sweep(args.file, os.environ.get(sweep.SPEC_TEXT_ENV))
        worker = int(os.environ.get("FASTCIFAR_SWEEP_WORKER", "0"))
        try:
            if "FASTCIFAR_SWEEP_PARENT" in os.environ:
                stop_with_parent(int(os.environ["FASTCIFAR_SWEEP_PARENT"]))
            sweep.run_worker(
                spec, args.worker_of, args.out, args.data, args.track, worker, args.heartbeat
            )
        except KeyboardInterrupt:  # stopped by the sweep command, which tells the user
            return 130
        return 0
    from rich.table import Table

    from fastcifar.display import table_console

    console = table_console()
    spec = read_sweep(args.file)  # read once: an edit during the sweep changes nothing
    rows = sweep.run_sweep(
        spec, storage=args.storage, workers=args.workers, resume=args.resume, out=args.out,
        data=args.data, track=args.track, tracking_uri=args.tracking_uri, heartbeat=args.heartbeat,
        log=console.print,
    )  # fmt: skip
    columns = result_columns(spec)
    table = Table(title=f"sweep {args.file.stem}")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)
    if "seed" in spec.axes:
        out = args.out or Path("sweeps") / spec.name
        console.print(f"`fastcifar compare {out} --pool-seeds` pools each point's seeds",
                      highlight=False, soft_wrap=True)  # a command to copy: never wrapped  # fmt: skip
    failed = [row for row in rows if row["state"] == "failed"]
    for row in failed:
        print(f"fastcifar: error: {trial_line(row, spec)}", file=sys.stderr)
    return 1 if failed else 0
