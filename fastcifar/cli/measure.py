"""`fastcifar bench`, `report` and `profile`: throughput side by side, recorded accuracy,
the README's table and figure, and where a training step's time goes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fastcifar.cli.arguments import (
    DATA_HELP,
    arch_name,
    figure_path,
    positive_int,
    recipe_label,
    results_file,
    setting,
)
from fastcifar.errors import NothingToResume, UserError


def register(commands) -> None:
    from fastcifar.ablations import VARIANTS

    bench = commands.add_parser("bench", help="measurements").add_subparsers(
        dest="measurement", required=True
    )
    tp = bench.add_parser(
        "throughput", help="fastcifar against the tutorial pipeline, side by side"
    )
    tp.add_argument("--arch", nargs="+", type=arch_name, default=["lenet", "cerberus"],
                    help="architectures, one after another (default: lenet cerberus)")  # fmt: skip
    tp.add_argument("--data", help=DATA_HELP)
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
    tp.add_argument("--json", type=results_file, help="write the results here")
    tp.set_defaults(handler=bench_throughput)

    ac = bench.add_parser("accuracy", help="train recipes to completion and record test accuracy")
    ac.add_argument("--arch", nargs="+", type=arch_name,
                    default=["lenet", "conv3", "conv5", "cerberus"],
                    help="architectures (default: lenet conv3 conv5 cerberus)")  # fmt: skip
    ac.add_argument("--recipe", choices=["default", "paper"], default="default",
                    help="the arch's default recipe, or the paper's own (configs/paper/)")  # fmt: skip
    ac.add_argument("--seeds", type=positive_int, default=1, help="runs per arch, seeds 0..N-1")
    ac.add_argument("--data", help=DATA_HELP)
    ac.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the runs go")
    ac.add_argument("--collect", type=Path, nargs="+", help="record these finished runs instead")
    ac.add_argument("--label", type=recipe_label,
                    help="record the runs under this name, the recipe's followed by a "
                    "suffix, e.g. default-direct: the same recipe with another speed switch, "
                    "kept out of the report's table (runs are still checked against --recipe)")  # fmt: skip
    ac.add_argument(
        "--out", type=results_file, required=True, help="results JSON (records are merged)"
    )
    ac.set_defaults(handler=bench_accuracy)

    rl = bench.add_parser("relabel", help="move recorded runs from one recipe label to another")
    rl.add_argument("file", type=results_file, help="accuracy results file (rewritten)")
    rl.add_argument("--from", dest="old", required=True, type=recipe_label,
                    help="the records' label now, e.g. default-winograd-wgrad")  # fmt: skip
    rl.add_argument("--to", dest="new", required=True, type=recipe_label,
                    help="their label after, of the same recipe, e.g. default")  # fmt: skip
    rl.add_argument("--arch", nargs="+", type=arch_name, help="only these (default: every arch)")
    rl.set_defaults(handler=bench_relabel)

    rp = commands.add_parser("report", help="Markdown table and figure from benchmarks/results")
    rp.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                    help="folder of result JSON files (default: benchmarks/results)")  # fmt: skip
    rp.add_argument("--figure", type=figure_path,
                    help="throughput-against-accuracy scatter (default: "
                         "throughput-vs-accuracy.png in the --results folder)")  # fmt: skip
    rp.add_argument("--readme", type=Path, help="rewrite this file's report section")
    rp.set_defaults(handler=report)

    pf = commands.add_parser(
        "profile", help="training steps under torch.profiler: top kernels, Chrome trace"
    )
    pf.add_argument("--arch", required=True, type=arch_name, help="architecture (`fastcifar list`)")
    pf.add_argument("--steps", type=positive_int, default=5,
                    help="training steps profiled, after two warm-up steps (default: 5)")  # fmt: skip
    pf.add_argument("--batch-size", type=positive_int, help="default: the arch's recipe")
    pf.add_argument("--variant", default="default", choices=list(VARIANTS),
                    help="the pipeline: fastcifar's default, the tutorial baseline, or one "
                         "optimisation alone (default: default)")  # fmt: skip
    pf.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                    help="a config value on top of the variant's, e.g. loader=dali or "
                    "fused=true (repeatable)")  # fmt: skip
    pf.add_argument("--host", type=positive_int, metavar="N",
                    help="also run as many steps under cProfile and show the N Python "
                    "functions with the most own time: where the host's time goes")  # fmt: skip
    pf.add_argument("--data", help=DATA_HELP)
    pf.add_argument("--trace", type=Path, default=Path("profile-trace.json"),
                    help="Chrome trace file, for chrome://tracing or Perfetto "
                         "(default: profile-trace.json)")  # fmt: skip
    pf.set_defaults(handler=profile)


def set_overrides(settings: list[tuple[str, object]]) -> dict | None:
    """`--set` values as config overrides (None for none); the architecture is --arch's."""
    if any(key == "arch" for key, _ in settings):
        raise UserError("--set arch=...: name the architectures with --arch")
    return dict(settings) or None


def bench_throughput(args) -> int:
    from rich.table import Table

    from fastcifar.bench import as_dict, compare_throughput
    from fastcifar.data.dataset import resolve_arrays
    from fastcifar.display import table_console

    overrides = set_overrides(args.set)
    console = table_console()
    arrays, _ = resolve_arrays(args.data, download=False, log=console.print)
    against = {"tutorial": "baseline", "default": "default"}[args.against]  # bench variants
    base = "fastcifar default" if against == "default" else "tutorial baseline"
    ours = "with " + " ".join(f"{k}={v}" for k, v in args.set) if overrides else "fastcifar"
    table = Table(title="images/s, median of windows (evaluation: eval batches, loader included)")
    for column in ("arch", "batch", "amp", base, ours, "speedup", "% of peak",
                   "eval: " + base, "eval: " + ours, "eval speedup"):  # fmt: skip
        table.add_column(column, justify="right")
    results = []
    try:
        for arch in args.arch:
            console.print(f"measuring {arch} ...", highlight=False)
            r = compare_throughput(arch, arrays.train_images, arrays.train_labels, args.batch_size,
                                   args.steps, args.windows, overrides=overrides, against=against)  # fmt: skip
            results.append(as_dict(r))
            table.add_row(arch, str(r.batch_size), r.amp, f"{r.baseline_images_per_sec:,.0f}",
                          f"{r.fastcifar_images_per_sec:,.0f}", f"{r.speedup:.2f}x",
                          f"{r.percent_of_peak:.1f}", f"{r.baseline_eval_images_per_sec:,.0f}",
                          f"{r.fastcifar_eval_images_per_sec:,.0f}", f"{r.eval_speedup:.2f}x")  # fmt: skip
            if args.json:  # after every arch: a stopped run keeps the ones it finished
                _write_results(args, args.json, "side_by_side", "date", results=results)
    finally:
        if results:
            console.print(table)
    if not args.json:
        print(json.dumps(results))
    return 0


def bench_accuracy(args) -> int:
    from fastcifar.results import accuracy_stats, read_accuracy_file, run_record
    from fastcifar.train.device import device_name, resolve_device

    # the file added to is read, and its machine checked, before anything trains
    held_machine, held, commands = (
        read_accuracy_file(args.out) if args.out.exists() else (None, [], [])
    )

    def refuse_other_machine(machine: str) -> None:
        if held and held_machine != machine:
            raise UserError(f"{args.out} holds results of {held_machine}; these runs come "
                            f"from {machine}: record them in a file of their own")  # fmt: skip

    if args.label and not args.label.startswith(args.recipe + "-"):
        raise UserError(f"--label {args.label}: a label starts with its recipe's name, "
                        f"--recipe {args.recipe} (e.g. {args.recipe}-direct)")  # fmt: skip
    runs = list(args.collect or [])
    if not runs:
        refuse_other_machine(device_name(resolve_device("auto")))
        runs = _train_recipes(args)
    records = [{**run_record(run, args.recipe), "recipe": args.label or args.recipe}
               for run in runs]  # fmt: skip
    machines = sorted({r["device_name"] for r in records})
    if len(machines) > 1:
        raise UserError(f"these runs come from {len(machines)} machines ({'; '.join(machines)}): "
                        "record each machine's runs in a file of its own")  # fmt: skip
    refuse_other_machine(machines[0])
    replaced = {(r["run"], r["recipe"]) for r in records}
    previous = [r for r in held if (r["run"], r["recipe"]) not in replaced]
    # the runs' machine, which need not be this one (runs copied back from a GPU machine)
    _write_results(args, args.out, "accuracy", "updated", machine=machines[0],
                   history=commands, records=previous + records)  # fmt: skip
    for arch in sorted({r["arch"] for r in records}):
        stats = accuracy_stats([r["test_acc"] for r in records if r["arch"] == arch])
        print(f"{arch}: {100 * stats['mean']:.2f}% over {stats['runs']} run(s)")
    return 0


def bench_relabel(args) -> int:
    """Records of one label given another of the same recipe: runs trained with a speed
    switch that has since become the default (`default-winograd-wgrad` to `default`), or
    the other way (`default` to `default-direct`)."""
    from fastcifar.results import read_accuracy_file

    if args.old == args.new:
        raise UserError(f"--from and --to are both {args.old}")
    if args.old.split("-")[0] != args.new.split("-")[0]:
        raise UserError(f"--from {args.old} --to {args.new}: a label keeps its recipe's name "
                        f"({args.old.split('-')[0]}-...)")  # fmt: skip
    machine, records, commands = read_accuracy_file(args.file)

    def moves(record: dict) -> bool:
        return record["recipe"] == args.old and (not args.arch or record["arch"] in args.arch)

    archs = f" of {', '.join(args.arch)}" if args.arch else ""
    moved = [r for r in records if moves(r)]
    if not moved:
        raise UserError(f"{args.file} holds no {args.old} records{archs}")
    held = {(r["run"], r["recipe"]) for r in records}
    clash = sorted(r["run"] for r in moved if (r["run"], args.new) in held)
    if clash:
        raise UserError(f"{args.file} already holds {args.new} records of {', '.join(clash)}")
    records = [{**r, "recipe": args.new} if moves(r) else r for r in records]
    _write_results(args, args.file, "accuracy", "updated", machine=machine, history=commands,
                   records=records)  # fmt: skip
    print(f"{len(moved)} {args.old} record(s){archs} now {args.new}")
    return 0


def _train_recipes(args) -> list[Path]:
    """Trains each arch's recipe for each seed into args.runs; a run left by an earlier,
    interrupted call goes on, a finished one stays as it is."""
    from fastcifar.cli.train import train_config
    from fastcifar.display import TrainingDisplay
    from fastcifar.recipes import paper_config
    from fastcifar.train.device import free_earlier_runs, resolve_device
    from fastcifar.train.engine import fit

    # every arch's recipe file is found (or missing) before anything trains
    configs = {arch: paper_config(arch) if args.recipe == "paper" else None for arch in args.arch}
    runs = []
    for arch, config in configs.items():
        for seed in range(args.seeds):
            out = args.runs / f"{arch}-{args.recipe}-s{seed}"
            flags = ["--resume", str(out)] if (out / "last.pt").exists() else [
                "--arch", arch, "--seed", str(seed), "--out", str(out),
                *(["--config", str(config)] if config else []),
            ]  # fmt: skip
            if args.data:
                flags += ["--data", args.data]
            cfg, resume = train_config(flags)
            if runs:
                free_earlier_runs(resolve_device(cfg.device).type)
            try:
                fit(cfg, TrainingDisplay(), resume=resume, resume_hint=False)
            except NothingToResume as exc:
                print(f"fastcifar: {exc}", file=sys.stderr)
            except KeyboardInterrupt:
                kept = "keeps its last finished epoch"
                if not (out / "last.pt").exists():
                    kept = "had not finished an epoch"
                print(f"fastcifar: {out} {kept}; the same command (`{_command(args)}`) goes on "
                      "from there and keeps the finished runs", file=sys.stderr)  # fmt: skip
                raise
            runs.append(out)
    return runs


def _write_results(args, path: Path, kind: str, date_key: str, machine: str | None = None,
                   history: list[str] | None = None, **payload) -> None:  # fmt: skip
    """A results file names the machine (this one unless given), the day and the command
    that measured it; a file added to (`history`: the commands that wrote it before) lists
    them all, this one last, so that they give its records back in order."""
    import time

    from fastcifar.atomic import write_json_atomic
    from fastcifar.train.device import device_name, resolve_device

    write_json_atomic(path, {
        "kind": kind,
        "machine": machine or device_name(resolve_device("auto")),
        date_key: time.strftime("%Y-%m-%d"),
        **({"command": _command(args)} if history is None else
           {"commands": [*history, _command(args)]}),
        **payload,
    })  # fmt: skip


def _command(args) -> str:
    """The command line that gave `args`, as a user would type it."""
    import shlex

    return "fastcifar " + shlex.join(args.argv)


def report(args) -> int:
    from fastcifar.report import (
        load_results,
        load_switches,
        markdown,
        scatter,
        switches_markdown,
        table_rows,
        write_readme_section,
    )

    if not args.results.is_dir():
        raise UserError(f"--results {args.results}: not a folder of results files")
    throughput, accuracy = load_results(args.results)
    tables = table_rows(throughput, accuracy)
    if not tables:
        raise UserError(f"no results in {args.results}")
    text = markdown(tables)
    figure = scatter(tables, args.figure or args.results / "throughput-vs-accuracy.png")
    text += f"\n![throughput against accuracy]({figure.as_posix()})\n"
    switches = switches_markdown(load_switches(args.results))
    if switches:
        text += f"\n{switches}"
    if args.readme:
        write_readme_section(args.readme, text)
    print(text)
    return 0


def profile(args) -> int:
    # kineto's own log lines (on a CPU: "gpuGetDeviceCount failed") are not the user's
    # business; a failed trace is still reported (`profile.export_trace`)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from rich.table import Table

    from fastcifar.data.dataset import resolve_arrays
    from fastcifar.display import table_console
    from fastcifar.profile import profile_training

    overrides = set_overrides(args.set)
    console = table_console()
    arrays, _ = resolve_arrays(args.data, download=False, log=console.print)
    rows, families, fidelity, host = profile_training(
        args.arch, arrays.train_images[:8192], arrays.train_labels[:8192], steps=args.steps,
        batch_size=args.batch_size, variant=args.variant, trace=args.trace,
        overrides=overrides, host_top=args.host or 0,
    )  # fmt: skip
    pipeline = " ".join([args.variant] + [f"{k}={v}" for k, v in args.set])
    table = Table(title=f"{args.arch}: top kernels over {args.steps} training steps ({pipeline})")
    for column in ("kernel", "share", "calls", "time (ms)", "TFLOP/s"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in rows:
        tflops = f"{r['tflops']:.3f}" if r["tflops"] else "-"
        table.add_row(
            r["name"][:60], f"{r['share']:.1%}", str(r["calls"]), f"{r['ms']:.1f}", tflops
        )
    console.print(table)
    for f in families:
        rate = f"{f.tflops:.3f} TFLOP/s" if f.tflops else "FLOPs not counted"
        console.print(f"{f.family}: {f.ms:.1f} ms, {rate}", highlight=False)
    console.print(fidelity_line(fidelity), highlight=False)
    console.print(
        f"Chrome trace: {args.trace} (open in chrome://tracing or ui.perfetto.dev)", highlight=False
    )
    if host:
        console.print(host_table(host, args.steps))
    return 0


def fidelity_line(f) -> str:
    faults = (
        "no page faults"
        if f.faults_per_step == 0
        else f"{f.faults_per_step:,.0f} page faults a step"
    )
    return (f"the last of {f.passes} profiled passes: {f.profiled_ms:.1f} ms of kernels a step, "
            f"{faults}; {f.step_ms:.1f} ms a step without the profiler")  # fmt: skip


def host_table(host, steps: int):
    from rich.table import Table

    table = Table(title=f"host: the main thread's CPU time {host.cpu_ms_per_step:.2f} ms a step of "
                        f"{host.wall_ms_per_step:.2f} ms; cProfile over {steps} more steps "
                        "(wall time, waits included)")  # fmt: skip
    for column in ("function", "calls", "own ms", "total ms"):
        table.add_column(column, justify="left" if column == "function" else "right")
    for f in host.functions:
        table.add_row(f["name"][:80], str(f["calls"]), f"{f['own_ms']:.2f}", f"{f['total_ms']:.2f}")
    return table
