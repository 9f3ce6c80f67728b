"""Result tables as CSV or Markdown text (sweeps' results, `fastcifar compare --table`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fastcifar.atomic import write_text_atomic
from fastcifar.errors import UserError


def as_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def as_markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


FORMATS = {".csv": as_csv, ".md": as_markdown}


def table_path(text: str) -> Path:
    """A table file's path, checked before any work: its suffix names the format."""
    path = Path(text)
    if path.suffix not in FORMATS:
        raise UserError(f"{path}: a table is written as .csv or .md")
    return path


def write_table(rows: list[dict], columns: list[str], path: Path) -> None:
    """CSV or Markdown by the file's suffix, written atomically."""
    write_text_atomic(path, FORMATS[table_path(str(path)).suffix](rows, columns))


def _cell(value) -> str:
    return "" if value is None else str(value)
