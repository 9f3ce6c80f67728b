"""What a training run shows: a rich progress bar per epoch, a row per finished epoch, and
the final summary. Everything prints through one rich Console."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

EPOCH_COLUMNS = [  # (metrics key, header, width, format)
    ("epoch", "epoch", 5, "d"),
    ("train_loss", "train loss", 10, ".4f"),
    ("train_acc", "train acc", 9, ".2%"),
    ("val_acc", "val acc", 8, ".2%"),
    ("test_acc", "test acc", 8, ".2%"),
    ("lr", "lr", 9, ".2e"),
    ("images_per_sec", "img/s", 8, ".0f"),
    ("seconds", "s", 7, ".1f"),
]


def table_console() -> Console:
    """A console for tables on standard output: the terminal's width, or where the output
    goes to a file or a pipe (a log), wide enough that rows are not wrapped or cut."""
    return Console(width=None if sys.stdout.isatty() else 160)


class TrainingDisplay:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None
        self.header_shown = False

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.quiet or not self.console.is_terminal:
            return  # a live bar only on a terminal; logs get the epoch rows
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.0f} img/s  loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, rate=0.0, loss=float("nan"))

    @property
    def live(self) -> bool:
        """Whether a progress bar is showing: only then is the running loss worth a sync."""
        return self.progress is not None

    def advance(self, steps_done: int, loss: float, rate: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=steps_done, loss=loss, rate=rate)

    def end_epoch(self, row: dict, improved: bool) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.quiet:
            return
        if not self.header_shown:
            header = " ".join(f"{title:>{width}}" for _, title, width, _ in EPOCH_COLUMNS)
            self.console.print(f"[bold]{header}[/bold]", highlight=False)
            self.header_shown = True
        cells = [
            f"{row[key]:>{width}{fmt}}" if row.get(key) is not None else f"{'-':>{width}}"
            for key, _, width, fmt in EPOCH_COLUMNS
        ]
        mark = " [green]*[/green]" if improved else ""
        self.console.print(" ".join(cells) + mark, highlight=False)

    def summary(self, summary: dict) -> None:
        if self.quiet:
            return
        table = Table(title=f"fastcifar train: {summary['arch']}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        best = summary["best"]
        table.add_row("run directory", summary["run_dir"])
        table.add_row("epochs run", f"{summary['epochs_run']} (best {best['epoch']})")
        if best.get("val_acc") is not None:
            table.add_row("best val accuracy", f"{best['val_acc']:.2%}")
        table.add_row("test accuracy (best)", f"{best['test_acc']:.2%}")
        t = summary["seconds"]
        table.add_row(
            "wall time",
            f"{t['total']:.1f} s  (data {t['data']:.1f}, warm-up {t['warmup']:.1f}, "
            f"train {t['train']:.1f}, eval {t['eval']:.1f})",
        )
        table.add_row("train images/s", f"{summary['images_per_sec']:.0f}")
        if summary.get("stopped"):
            table.add_row("stopped", summary["stopped"])
        self.console.print(table)
