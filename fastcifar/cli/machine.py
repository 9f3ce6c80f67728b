"""`fastcifar list`, `summary` and `doctor`: the architectures, and what this machine can run."""

from __future__ import annotations

import fnmatch

from fastcifar.cli.arguments import arch_name
from fastcifar.errors import UserError


def register(commands) -> None:
    sm = commands.add_parser(
        "summary", help="per-layer table: output shapes, parameters, mult-adds"
    )
    sm.add_argument("--arch", required=True, type=arch_name, help="architecture (`fastcifar list`)")
    sm.set_defaults(handler=summary)

    dr = commands.add_parser(
        "doctor", help="which CUDA, native, DALI and Triton paths work here, and why"
    )
    dr.set_defaults(handler=doctor)

    ls = commands.add_parser("list", help="registered architectures")
    ls.add_argument("pattern", nargs="?", default="*")
    ls.set_defaults(handler=list_architectures)


def summary(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastcifar.models import create_model
    from fastcifar.summary import summarize

    s = summarize(create_model(args.arch))
    table = Table(title=f"{args.arch}", show_footer=False)
    for name, justify in [("Layer (type)", "left"), ("Output Shape", "left"), ("Param #", "right"),
                          ("Mult-adds", "right")]:  # fmt: skip
        table.add_column(name, justify=justify)
    for row in s.layers:
        shape = "[" + ", ".join(str(d) for d in row.output_shape) + "]"
        table.add_row(
            row.name, shape, f"{row.params:,}" if row.params else "--", f"{row.mult_adds:,}"
        )
    console = Console()
    console.print(table)
    console.print(f"Total params: {s.total_params:,}")
    console.print(f"Trainable params: {s.trainable_params:,}")
    console.print(f"Non-trainable params: {s.total_params - s.trainable_params:,}")
    console.print(f"Total mult-adds (M): {s.mult_adds / 1e6:.2f}")
    return 0


def list_architectures(args) -> int:
    from fastcifar.catalog import catalog

    counts = catalog()
    names = sorted(name for name in counts if fnmatch.fnmatch(name, args.pattern))
    if not names:
        raise UserError(f"no architecture matches {args.pattern!r}; see fastcifar list")
    for name in names:
        params, mult_adds = counts[name]["params"], counts[name]["mult_adds"] / 1e6
        print(f"{name:<22} {params:>12,} params {mult_adds:>9.2f} M mult-adds")
    return 0


def doctor(args) -> int:
    from fastcifar.accelerators import report

    for name, ok, detail in report():
        print(f"{name:<10} {'yes' if ok else 'no ':<4} {detail}")
    return 0
