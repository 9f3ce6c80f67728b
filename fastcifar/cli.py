"""The `fastcifar` command line: train, evaluate, sweep, analyse and benchmark CIFAR-10 CNNs.

User mistakes end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from fastcifar.config import DEVICES, TrainConfig, parse_setting, read_config, read_run_config
from fastcifar.errors import NothingToResume, UserError

RESUME_OVERRIDES = {"data", "epochs", "device", "threads"}


def _field_help() -> dict[str, str]:
    """Each config field's help text: its comment in config.py (one place for units)."""
    source = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE))


def _parser_for(type_name: str):
    base = type_name.replace(" | None", "")
    return {"int": int, "float": float, "str": str}[base]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags stay absent so recipes can fill them."""
    helps = _field_help()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        text = helps.get(field.name, "")
        if field.name == "amp":
            parser.add_argument(
                "--amp", nargs="?", const="auto", choices=["auto", "bf16", "fp16", "none"],
                default=argparse.SUPPRESS,
                help="autocast dtype; bare --amp (auto) means bf16 where the device computes in"
                " bf16 (a GPU, a CPU with AVX512-BF16 or AMX), else fp32",
            )  # fmt: skip
            parser.add_argument(
                "--no-amp", dest="amp", action="store_const", const="none",
                default=argparse.SUPPRESS, help="train in fp32",
            )  # fmt: skip
        elif field.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            parser.add_argument(
                flag, type=_parser_for(field.type), default=argparse.SUPPRESS, help=text,
                metavar=field.name.upper(),
            )  # fmt: skip
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="TOML config file, or a run directory: that run's settings")  # fmt: skip
    parser.add_argument(
        "--resume", type=Path, default=argparse.SUPPRESS, help="continue the run in this directory"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as TOML (a --config file) and exit without training",
    )


def resolve_train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """Layer defaults, the arch's device recipe, --config, then flags (later wins)."""
    from fastcifar.models import list_models
    from fastcifar.recipes import recipe
    from fastcifar.train.device import SLOW_BF16, fastest_amp, resolve_device

    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "handler", "parser", "config", "resume", "quiet", "print_config")
    }
    resume = getattr(args, "resume", None)
    if resume is not None:
        extra = set(flags) - RESUME_OVERRIDES
        if extra:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(extra))
            raise UserError(f"--resume continues the saved config; it cannot change {names}")
        saved = resume / "config.json"
        if not saved.is_file():
            raise UserError(f"nothing to resume: {saved} not found")
        return TrainConfig.from_dict({**read_run_config(saved), **flags}), resume
    file_values = read_config(args.config) if getattr(args, "config", None) else {}
    arch = flags.get("arch") or file_values.get("arch") or TrainConfig.arch
    if arch not in list_models():
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(list_models())}")
    device = resolve_device(flags.get("device") or file_values.get("device") or "auto")
    if flags.get("amp") == "auto":
        flags["amp"] = fastest_amp(device)
        if flags["amp"] == "none":
            print(f"fastcifar: {SLOW_BF16}; --amp trains in fp32", file=sys.stderr)
    values = {**recipe(arch, device.type), **file_values, **flags, "arch": arch}
    return TrainConfig.from_dict(values), None


def cmd_train(args) -> int:
    from fastcifar.display import TrainingDisplay
    from fastcifar.train.engine import fit

    cfg, resume = resolve_train_config(args)
    if args.print_config:  # with --resume: the run's settings, not its place (as --config RUN)
        print((cfg if resume is None else cfg.replace(out=None)).to_toml(), end="")
        return 0
    fit(cfg, TrainingDisplay(quiet=args.quiet), resume=resume)
    return 0


def cmd_eval(args) -> int:
    from rich.console import Console

    from fastcifar.inference import eval_checkpoint

    console = Console()
    result = eval_checkpoint(args.checkpoint, args.data, args.tta, args.device, log=console.print)
    tta = " (flip TTA)" if args.tta else ""
    console.print(
        f"test accuracy{tta}: {result.acc:.2%}  loss {result.loss:.4f}  ({len(result.labels)} images)"
    )
    return 0


def cmd_predict(args) -> int:
    from fastcifar.inference import image_files, predict_images

    images = image_files(args.images)
    for image, (name, prob) in zip(
        images, predict_images(args.checkpoint, images, args.device), strict=True
    ):
        print(f"{image}\t{name}\t{prob:.4f}")
    return 0


def cmd_summary(args) -> int:
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


def cmd_list(args) -> int:
    from fastcifar.models import create_model, list_models
    from fastcifar.summary import count_mult_adds

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no architecture matches {args.pattern!r}; see fastcifar list")
    for name in names:
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        mult_adds = count_mult_adds(model) / 1e6
        print(f"{name:<22} {params:>12,} params {mult_adds:>9.2f} M mult-adds")
    return 0


def cmd_bench_throughput(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastcifar.bench import as_dict, compare_throughput
    from fastcifar.data.dataset import resolve_arrays

    if any(key == "arch" for key, _ in args.set):
        raise UserError("--set arch=...: name the architectures with --arch")
    console = Console(width=None if sys.stdout.isatty() else 120)  # ten columns fit a log
    arrays, _ = resolve_arrays(args.data, download=False, log=console.print)
    overrides = dict(args.set) or None
    against = {"tutorial": "baseline", "default": "default"}[args.against]  # bench variants
    base = "fastcifar default" if against == "default" else "tutorial baseline"
    ours = "with " + " ".join(f"{k}={v}" for k, v in args.set) if overrides else "fastcifar"
    table = Table(title="images/s, median of windows (evaluation: eval batches, loader included)")
    for column in ("arch", "batch", "amp", base, ours, "speedup", "% of peak",
                   "eval: " + base, "eval: " + ours, "eval speedup"):  # fmt: skip
        table.add_column(column, justify="right")
    results = []
    for arch in args.arch:
        console.print(f"measuring {arch} ...", highlight=False)
        r = compare_throughput(arch, arrays.train_images, arrays.train_labels, args.batch_size,
                               args.steps, args.windows, overrides=overrides, against=against)  # fmt: skip
        results.append(as_dict(r))
        table.add_row(arch, str(r.batch_size), r.amp, f"{r.baseline_images_per_sec:,.0f}",
                      f"{r.fastcifar_images_per_sec:,.0f}", f"{r.speedup:.2f}x",
                      f"{r.percent_of_peak:.1f}", f"{r.baseline_eval_images_per_sec:,.0f}",
                      f"{r.fastcifar_eval_images_per_sec:,.0f}", f"{r.eval_speedup:.2f}x")  # fmt: skip
    console.print(table)
    if args.json:
        import shlex
        import time

        from fastcifar.atomic import write_json_atomic
        from fastcifar.train.device import device_name, resolve_device

        write_json_atomic(args.json, {
            "kind": "side_by_side",
            "machine": device_name(resolve_device("auto")),
            "date": time.strftime("%Y-%m-%d"),
            "command": "fastcifar " + shlex.join(sys.argv[1:]),
            "results": results,
        })  # fmt: skip
    else:
        print(json.dumps(results))
    return 0


def cmd_bench_accuracy(args) -> int:
    import shlex
    import sys
    import time

    from fastcifar.atomic import write_json_atomic
    from fastcifar.results import accuracy_stats, run_record
    from fastcifar.train.device import device_name, resolve_device

    runs = list(args.collect or [])
    if not runs:
        from fastcifar.display import TrainingDisplay
        from fastcifar.recipes import paper_config
        from fastcifar.train.engine import fit

        configs = {
            arch: paper_config(arch) if args.recipe == "paper" else None for arch in args.arch
        }
        for arch in args.arch:
            for seed in range(args.seeds):
                out = args.runs / f"{arch}-{args.recipe}-s{seed}"
                # a run left by an earlier, interrupted call goes on; a finished one stays
                flags = ["--resume", str(out)] if (out / "last.pt").exists() else [
                    "--arch", arch, "--seed", str(seed), "--out", str(out),
                    *(["--config", str(configs[arch])] if configs[arch] else []),
                ]  # fmt: skip
                if args.data:
                    flags += ["--data", args.data]
                cfg, resume = resolve_train_config(build_parser().parse_args(["train", *flags]))
                try:
                    fit(cfg, TrainingDisplay(), resume=resume)
                except NothingToResume as exc:
                    print(f"fastcifar: {exc}", file=sys.stderr)
                runs.append(out)
    records = [run_record(run, args.recipe) for run in runs]
    previous = []
    if args.out.exists():
        previous = [r for r in json.loads(args.out.read_text())["records"]
                    if (r["run"], r["recipe"]) not in {(x["run"], x["recipe"]) for x in records}]  # fmt: skip
    write_json_atomic(args.out, {
        "kind": "accuracy",
        "machine": device_name(resolve_device("auto")),
        "updated": time.strftime("%Y-%m-%d"),
        "command": "fastcifar " + shlex.join(sys.argv[1:]),
        "records": previous + records,
    })  # fmt: skip
    for arch in sorted({r["arch"] for r in records}):
        stats = accuracy_stats([r["test_acc"] for r in records if r["arch"] == arch])
        print(f"{arch}: {100 * stats['mean']:.2f}% over {stats['runs']} run(s)")
    return 0


def cmd_report(args) -> int:
    from fastcifar.report import load_results, markdown, scatter, table_rows, write_readme_section

    throughput, accuracy = load_results(args.results)
    tables = table_rows(throughput, accuracy)
    if not tables:
        raise UserError(f"no results in {args.results}")
    text = markdown(tables)
    figure = scatter(tables, args.figure)
    text += f"\n![throughput against accuracy]({figure.as_posix()})\n"
    if args.readme:
        write_readme_section(args.readme, text)
    print(text)
    return 0


def cmd_analyze(args) -> int:
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


def cmd_compare(args) -> int:
    from rich.console import Console

    from fastcifar import compare
    from fastcifar.tables import write_table

    console = Console(width=None if sys.stdout.isatty() else 120)  # run names fit a log

    def log(text):
        console.print(text, style="dim")

    if args.pool_seeds:
        rows, columns = compare.compare_settings(args.runs, args.out, log), compare.POOLED_COLUMNS
        console.print(_pooled_table(rows))
    else:
        rows, columns = compare.compare_runs(args.runs, args.out, log), compare.COMPARE_COLUMNS
        console.print(_runs_table(rows))
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


def _pooled_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="settings, pooled over seeds (test accuracy of each best-val epoch)")
    table.add_column("settings")
    for column in ("runs", "test acc", "95% CI", "val acc", "seconds"):
        table.add_column(column, justify="right")
    for r in rows:
        spread = f" ± {_percent(r['test_acc_std'])}" if r["runs"] > 1 else ""
        low, high = r["test_acc_ci95_low"], r["test_acc_ci95_high"]
        table.add_row(r["settings"], str(r["runs"]), _percent(r["test_acc_mean"]) + spread,
                      f"{_percent(low)} to {_percent(high)}" if low is not None else "-",
                      _percent(r["val_acc_mean"]), f"{r['seconds_mean']:.0f}")  # fmt: skip
    return table


def _percent(fraction: float | None) -> str:
    return f"{fraction:.2%}" if fraction is not None else "-"


def cmd_sweep(args) -> int:
    from fastcifar import sweep

    if args.worker_of:  # one worker process, started by the sweep command
        spec = sweep.read_sweep(args.file)
        worker = int(os.environ.get("FASTCIFAR_SWEEP_WORKER", "0"))
        sweep.run_worker(
            spec, args.worker_of, args.out, args.data, args.track, worker, args.heartbeat
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = sweep.run_sweep(
        args.file, storage=args.storage, workers=args.workers, resume=args.resume, out=args.out,
        data=args.data, track=args.track, tracking_uri=args.tracking_uri, heartbeat=args.heartbeat,
        log=console.print,
    )  # fmt: skip
    table = Table(title=f"sweep {args.file.stem}")
    for column in sweep.RESULT_COLUMNS:
        table.add_column(column.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in sweep.RESULT_COLUMNS))
    console.print(table)
    return 0


def cmd_profile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fastcifar.data.dataset import resolve_arrays
    from fastcifar.profile import profile_training

    console = Console()
    arrays, _ = resolve_arrays(args.data, download=False, log=console.print)
    rows = profile_training(args.arch, arrays.train_images[:8192], arrays.train_labels[:8192],
                            steps=args.steps, batch_size=args.batch_size, variant=args.variant,
                            trace=args.trace)  # fmt: skip
    table = Table(
        title=f"{args.arch}: top kernels over {args.steps} training steps ({args.variant})"
    )
    for column in ("kernel", "share", "calls", "time (ms)", "TFLOP/s"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in rows:
        tflops = f"{r['tflops']:.3f}" if r["tflops"] else "-"
        table.add_row(
            r["name"][:60], f"{r['share']:.1%}", str(r["calls"]), f"{r['ms']:.1f}", tflops
        )
    console.print(table)
    console.print(
        f"Chrome trace: {args.trace} (open in chrome://tracing or ui.perfetto.dev)", highlight=False
    )
    return 0


def cmd_doctor(args) -> int:
    from fastcifar.accelerators import report

    for name, ok, detail in report():
        print(f"{name:<10} {'yes' if ok else 'no ':<4} {detail}")
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """A usage mistake (a missing value, an unknown choice) ends like any other user
    error, in one line, not in a usage dump."""

    def error(self, message):
        command = self.prog.removeprefix("fastcifar").strip()
        where = f"{command}: " if command else ""
        raise UserError(f"{where}{self._plain(message)} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """Unknown options are reported by the (sub)command they were given to, with the
        nearest option it has."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            owner = getattr(parsed, "parser", self)
            owner.error(f"unrecognized arguments: {' '.join(unknown)}{owner._nearest(unknown)}")
        return parsed

    def _nearest(self, unknown: list[str]) -> str:
        names = [o[2:] for o in self._option_string_actions if o.startswith("--")]
        for word in unknown:
            if word.startswith("--"):
                near = difflib.get_close_matches(word[2:].split("=")[0], names, n=1)
                if near:
                    return f"; did you mean --{near[0]}?"
        return ""

    def _plain(self, message: str) -> str:
        """Says what to type instead: a missing command lists the choices, a mistyped
        one names the nearest."""
        for action in self._subparsers._group_actions if self._subparsers else ():
            if message.endswith(f"required: {action.dest}"):
                return f"no {action.dest} given; choose one of: {', '.join(action.choices)}"
            typo = re.search(r"invalid choice: '([^']*)'", message)
            near = typo and difflib.get_close_matches(typo[1], list(action.choices), n=1)
            if near:
                return f"unknown {action.dest} '{typo[1]}'; did you mean '{near[0]}'?"
        return message


def setting(text: str) -> tuple[str, object]:
    """`--set KEY=VALUE`, a usage error when KEY or VALUE does not fit the config."""
    try:
        return parse_setting(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fastcifar.bench import VARIANTS
    from fastcifar.tables import table_path

    parser = OneLineErrors(prog="fastcifar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)

    ev = sub.add_parser("eval", help="test accuracy of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help="a .pt file or a run directory (uses best.pt)")
    ev.add_argument("--data", help="CIFAR-10 source (default: the one the run trained on)")
    ev.add_argument("--tta", action="store_true", help="average with horizontally flipped images")
    ev.add_argument("--device", default="auto", choices=DEVICES,
                    help="auto: CUDA when present")  # fmt: skip
    ev.set_defaults(handler=cmd_eval)

    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("checkpoint", type=Path, help="a .pt file or a run directory (uses best.pt)")
    pr.add_argument(
        "images", type=Path, nargs="+", help="image files, or folders to search for them"
    )
    pr.add_argument("--device", default="auto", choices=DEVICES,
                    help="auto: CUDA when present")  # fmt: skip
    pr.set_defaults(handler=cmd_predict)

    sm = sub.add_parser("summary", help="per-layer table: output shapes, parameters, mult-adds")
    sm.add_argument("--arch", required=True, help="architecture (`fastcifar list`)")
    sm.set_defaults(handler=cmd_summary)

    bench = sub.add_parser("bench", help="measurements").add_subparsers(
        dest="measurement", required=True
    )
    tp = bench.add_parser(
        "throughput", help="fastcifar against the tutorial pipeline, side by side"
    )
    tp.add_argument("--arch", nargs="+", default=["lenet", "cerberus"],
                    help="architectures, one after another (default: lenet cerberus)")  # fmt: skip
    tp.add_argument("--data", help="CIFAR-10 source (default: $FASTCIFAR_DATA, then the cache)")
    tp.add_argument("--batch-size", type=positive_int, help="default: the arch's recipe")
    tp.add_argument(
        "--steps",
        type=positive_int,
        default=20,
        help="training steps per timed window (an evaluation window sees as many images)",
    )
    tp.add_argument(
        "--windows", type=positive_int, default=3, help="alternating timed windows per side"
    )
    tp.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                    help="a config value on fastcifar's side, e.g. channels_last=false or "
                    "compile_mode=reduce-overhead (repeatable)")  # fmt: skip
    tp.add_argument("--against", choices=("tutorial", "default"), default="tutorial",
                    help="the other side: the tutorial pipeline, or fastcifar's default for "
                    "the device (to measure one setting's effect)")  # fmt: skip
    tp.add_argument("--json", type=Path, help="write the results here")
    tp.set_defaults(handler=cmd_bench_throughput)
    ac = bench.add_parser("accuracy", help="train recipes to completion and record test accuracy")
    ac.add_argument("--arch", nargs="+", default=["lenet", "conv3", "conv5", "cerberus"],
                    help="architectures (default: lenet conv3 conv5 cerberus)")  # fmt: skip
    ac.add_argument("--recipe", choices=["default", "paper"], default="default",
                    help="the arch's default recipe, or the paper's own (configs/paper/)")  # fmt: skip
    ac.add_argument("--seeds", type=positive_int, default=1, help="runs per arch, seeds 0..N-1")
    ac.add_argument("--data", help="CIFAR-10 source (default: $FASTCIFAR_DATA, then the cache)")
    ac.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the runs go")
    ac.add_argument("--collect", type=Path, nargs="+", help="record these finished runs instead")
    ac.add_argument("--out", type=Path, required=True, help="results JSON (records are merged)")
    ac.set_defaults(handler=cmd_bench_accuracy)

    rp = sub.add_parser("report", help="Markdown table and figure from benchmarks/results")
    rp.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                    help="folder of result JSON files (default: benchmarks/results)")  # fmt: skip
    rp.add_argument("--figure", type=Path,
                    default=Path("benchmarks/results/throughput-vs-accuracy.png"),
                    help="throughput-against-accuracy scatter (PNG)")  # fmt: skip
    rp.add_argument("--readme", type=Path, help="rewrite this file's report section")
    rp.set_defaults(handler=cmd_report)

    sw = sub.add_parser("sweep", help="grid or TPE search over train options (Optuna)")
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
    sw.set_defaults(handler=cmd_sweep)

    an = sub.add_parser("analyze", help="error analysis of a run: figures and an HTML report")
    an.add_argument("run", type=Path, help="a run directory")
    an.add_argument("--data", help="CIFAR-10 source (default: the one the run trained on)")
    an.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                    help="attach the report to the run's MLflow run, when it was tracked")  # fmt: skip
    an.set_defaults(handler=cmd_analyze)

    co = sub.add_parser("compare", help="runs side by side: final metrics and overlaid curves")
    co.add_argument("runs", type=Path, nargs="+")
    co.add_argument("--out", type=Path, default=Path("compare.png"), help="curves figure (PNG)")
    co.add_argument("--table", type=table_path,  # a wrong suffix fails before the work
                    help="also write the table here (.csv or .md)")  # fmt: skip
    co.add_argument("--pool-seeds", action="store_true",
                    help="one row per setting: runs differing only in --seed pooled (mean, "
                         "std, 95%% CI of test accuracy), their mean curves drawn")  # fmt: skip
    co.set_defaults(handler=cmd_compare)

    pf = sub.add_parser(
        "profile", help="training steps under torch.profiler: top kernels, Chrome trace"
    )
    pf.add_argument("--arch", required=True, help="architecture (`fastcifar list`)")
    pf.add_argument("--steps", type=positive_int, default=5,
                    help="training steps profiled, after two warm-up steps (default: 5)")  # fmt: skip
    pf.add_argument("--batch-size", type=positive_int, help="default: the arch's recipe")
    pf.add_argument("--variant", default="default", choices=list(VARIANTS),
                    help="the pipeline: fastcifar's default, the tutorial baseline, or one "
                         "optimisation alone (default: default)")  # fmt: skip
    pf.add_argument("--data", help="CIFAR-10 source (default: $FASTCIFAR_DATA, then the cache)")
    pf.add_argument("--trace", type=Path, default=Path("profile-trace.json"),
                    help="Chrome trace file, for chrome://tracing or Perfetto "
                         "(default: profile-trace.json)")  # fmt: skip
    pf.set_defaults(handler=cmd_profile)

    dr = sub.add_parser(
        "doctor", help="which CUDA, native, DALI and Triton paths work here, and why"
    )
    dr.set_defaults(handler=cmd_doctor)

    ls = sub.add_parser("list", help="registered architectures")
    ls.add_argument("pattern", nargs="?", default="*")
    ls.set_defaults(handler=cmd_list)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser is stored in the arguments it parses, so that an
    unknown option is reported by the command it was given to."""
    parser.set_defaults(parser=parser)
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for child in action.choices.values():
            _remember_parsers(child)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A SIGTERM (a job scheduler, `kill`) ends a command as Ctrl-C does: a training run
    keeps its last finished epoch's checkpoint and its MLflow run is marked KILLED."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        with sigterm_as_interrupt():
            args = build_parser().parse_args(argv)
            return args.handler(args)
    except UserError as exc:
        print(f"fastcifar: error: {exc}", file=sys.stderr)
        return 2
    except NothingToResume as exc:
        print(f"fastcifar: {exc}", file=sys.stderr)
        return 0
    except BrokenPipeError:  # `fastcifar ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush stays quiet
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except OSError as exc:  # a path that cannot be read or written, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fastcifar: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastcifar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
