"""`fastcifar report`: the throughput and accuracy results joined into a Markdown table per
device and a throughput-versus-accuracy figure; `--readme` rewrites the README's
section between its report markers. Everything comes from `benchmarks/results/`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fastcifar.errors import UserError
from fastcifar.results import PAPER_ACCURACY, accuracy_stats, read_json, read_results

START, END = "<!-- report:start -->", "<!-- report:end -->"


def load_results(folder: Path) -> tuple[list[dict], list[dict]]:
    """(throughput entries, accuracy records) from every JSON file in `folder`."""
    throughput, accuracy = [], []
    for path in sorted(folder.glob("*.json")):
        entries, records = read_results(path)
        throughput += entries
        accuracy += records
    return throughput, accuracy


def ran_default_settings(result: dict) -> bool:
    """Whether a side-by-side result timed the arch's default settings as they were when
    it ran. Results with another batch size or torch.compile mode are ablations: the table
    leaves them out, whatever order their files sort in. Results saved before they
    recorded it (all before CUDA graphs became the CUDA default) are judged by their
    compile mode and the CPU recipe's batch size. Results
    measured against fastcifar's default instead of the tutorial are ablations too."""
    if result.get("against", "baseline") != "baseline":
        return False
    if "default_settings" in result:
        return result["default_settings"]
    from fastcifar.config import TrainConfig
    from fastcifar.recipes import recipe

    batch = recipe(result["arch"], "cpu").get("batch_size", TrainConfig.batch_size)
    return (
        result.get("compile_mode", "default") in ("default", "eager")
        and result.get("batch_size", batch) == batch
    )


def table_rows(throughput: list[dict], accuracy: list[dict]) -> dict[str, list[dict]]:
    """Rows per device: one per arch with a throughput or accuracy result."""
    from fastcifar.catalog import catalog

    counts = catalog()
    by_device: dict[str, dict[str, dict]] = defaultdict(dict)
    for t in filter(ran_default_settings, throughput):
        by_device[t["machine"]].setdefault(t["arch"], {})["throughput"] = t
    for r in accuracy:  # "paper": the paper's own recipe, run here
        if r["recipe"] in ("default", "paper"):
            by_device[r["machine"]].setdefault(r["arch"], {}).setdefault(r["recipe"], []).append(r)
    tables = {}
    for machine, archs in by_device.items():
        rows = []
        for arch, entry in sorted(archs.items()):
            t, records = entry.get("throughput"), entry.get("default")
            stats = _test_accuracy_stats(records)
            paper = PAPER_ACCURACY.get(arch)
            reach = None  # every run had reached the paper's accuracy by then
            times = [r.get("reached", {}).get("paper") for r in records or []]
            if times and all(times):
                reach = max(times, key=lambda t: t["epoch"])
            rows.append({
                "arch": arch,
                "params": counts.get(arch, {}).get("params"),  # None: an arch since removed
                "mult_adds": counts.get(arch, {}).get("mult_adds"),
                "train_ips": t["fastcifar_images_per_sec"] if t else None,
                "baseline_ips": t["baseline_images_per_sec"] if t else None,
                "speedup": t["speedup"] if t else None,
                "eval_ips": t.get("fastcifar_eval_images_per_sec") if t else None,
                "eval_speedup": t.get("eval_speedup") if t else None,
                "percent_of_peak": t.get("percent_of_peak") if t else None,
                "stats": stats,
                "epochs": records[0].get("epochs_run") if records else None,
                "wall": stats and sum(r["seconds"]["total"] for r in records) / len(records),
                "reach": reach,
                "paper_recipe": _test_accuracy_stats(entry.get("paper")),
                "paper": paper,
            })  # fmt: skip
        tables[machine] = rows
    return tables


def throughput_against_accuracy(measured: dict, machine: str, results: Path) -> str:
    """The README's table for the architectures whose default the benchmark suite timed:
    throughput from `measured` ((arch, "train" | "eval", variant) -> the benchmark's
    extra_info; fastcifar's default against the tutorial baseline), accuracy as recorded
    for `machine` in the `results` folder."""

    def rate(arch, kind, variant):
        return measured.get((arch, kind, variant), {}).get("images_per_sec")

    throughput = []
    for arch in sorted({arch for arch, kind, variant in measured if variant == "default"}):
        default = measured.get((arch, "train", "default"), {})
        train = default.get("images_per_sec")
        # the baseline rounds paired with the default's, else the baseline's own test
        base = default.get("baseline_images_per_sec") or rate(arch, "train", "baseline")
        evals, eval_base = rate(arch, "eval", "default"), rate(arch, "eval", "baseline")
        throughput.append({
            "arch": arch, "machine": machine, "default_settings": True,
            "fastcifar_images_per_sec": train, "baseline_images_per_sec": base,
            "speedup": default.get("speedup") or (train / base if train and base else None),
            "fastcifar_eval_images_per_sec": evals,
            "eval_speedup": evals / eval_base if evals and eval_base else None,
            "percent_of_peak": default.get("percent_of_peak"),
        })  # fmt: skip
    if not throughput:
        return ""
    accuracy = [r for r in load_results(results)[1] if r["machine"] == machine]
    rows = table_rows(throughput, accuracy).get(machine, [])
    archs = {t["arch"] for t in throughput}
    return markdown({machine: [r for r in rows if r["arch"] in archs]})


# The benchmark suite's variants (`fastcifar.ablations.VARIANTS`) as the switches table
# names them, in its column order.
SWITCHES = {"default": "default", "amp": "AMP alone", "channels_last": "channels-last alone",
            "compile": "compile alone", "tensor_loader": "tensor loader alone",
            "native_loader": "native op alone", "dali_loader": "DALI loader alone",
            "fused": "fused block alone", "fused_optimizer": "fused optimiser alone"}  # fmt: skip


def load_switches(folder: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """machine -> arch -> variant -> training extra_info, from the full, paired runs of
    `benchmarks/test_throughput.py` saved in `folder` (pytest-benchmark's JSON); for an
    arch timed in several files, the newest file's. Unpaired runs, whose variants were
    not each timed beside baseline rounds of their own, are left out."""
    newest: dict[tuple[str, str], tuple[str, dict[str, dict]]] = {}
    for path in sorted(folder.glob("*.json")):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            continue
        found: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {}) if isinstance(bench, dict) else {}
            paired = info.get("baseline_images_per_sec") is not None
            if info.get("kind") == "train" and info.get("mode") == "full" and paired:
                found[(info["device_name"], info["arch"])][info["variant"]] = info
        when = str(data.get("datetime", ""))
        for key, variants in found.items():
            if key not in newest or when >= newest[key][0]:
                newest[key] = (when, variants)
    tables: dict[str, dict[str, dict[str, dict]]] = defaultdict(dict)
    for (machine, arch), (_, variants) in sorted(newest.items()):
        tables[machine][arch] = variants
    return dict(tables)


def switches_markdown(tables: dict[str, dict[str, dict[str, dict]]]) -> str:
    """Per machine, each arch's training speedup over the tutorial pipeline with
    fastcifar's default and with each switch alone, and the range of the baseline rounds
    paired with them."""
    out = []
    for machine, archs in tables.items():
        columns = [v for v in SWITCHES if any(v in variants for variants in archs.values())]
        out += [f"**{machine}: each switch alone, training speedup over the tutorial**", "",
                "| arch | " + " | ".join(SWITCHES[v] for v in columns) + " | paired baseline img/s |",
                "| --- |" + " ---: |" * (len(columns) + 1)]  # fmt: skip
        for arch, variants in archs.items():
            cells = [f"{variants[v]['speedup']:.2f}x" if v in variants else "-" for v in columns]
            rates = [i["baseline_images_per_sec"] for v, i in variants.items() if v != "baseline"]
            span = f"{min(rates):,.0f} to {max(rates):,.0f}" if rates else "-"
            out.append(f"| {arch} | " + " | ".join(cells) + f" | {span} |")
        out.append("")
    return "\n".join(out)


def _test_accuracy_stats(records: list[dict] | None) -> dict | None:
    return accuracy_stats([r["test_acc"] for r in records]) if records else None


def markdown(tables: dict[str, list[dict]]) -> str:
    out = []
    header = ("| arch | params | mult-adds | train img/s | baseline img/s | speedup | % of matmul peak "
              "| eval img/s (speedup) | test accuracy | epochs, wall time "
              "| first epoch at or above the paper | paper's recipe, here | paper |")  # fmt: skip
    for machine, rows in tables.items():
        out += [f"**{machine}**", "", header, "|" + " --- |" + " ---: |" * 12]
        for r in rows:
            cells = [
                r["arch"],
                f"{r['params']:,}" if r["params"] else "-",
                f"{r['mult_adds'] / 1e6:.2f} M" if r["mult_adds"] else "-",
                _num(r["train_ips"]),
                _num(r["baseline_ips"]),
                f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                f"{r['percent_of_peak']:.1f}%" if r["percent_of_peak"] is not None else "-",
                _with_speedup(r["eval_ips"], r["eval_speedup"]),
                _accuracy(r["stats"]),
                f"{r['epochs']}, {r['wall']:.0f} s" if r["epochs"] else "-",
                f"epoch {r['reach']['epoch']} ({r['reach']['train_seconds']:.0f} s)"
                if r["reach"]
                else "-",
                _accuracy(r["paper_recipe"]),
                f"{100 * r['paper']:.1f}%" if r["paper"] else "-",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _with_speedup(rate: float | None, speedup: float | None) -> str:
    if not rate:
        return "-"
    return f"{rate:,.0f}" + (f" ({speedup:.2f}x)" if speedup else "")


def _accuracy(stats: dict | None) -> str:
    if not stats:
        return "-"
    text = f"{100 * stats['mean']:.2f}%"
    if stats["runs"] > 1:
        text += f" ± {100 * stats['std']:.2f}"
    return text + f" ({stats['runs']} run{'s' if stats['runs'] > 1 else ''})"


def scatter(tables: dict[str, list[dict]], path: Path) -> Path:
    """Train images/s (log scale) against test accuracy: fastcifar's points, the Pareto
    front, and an arrow from the tutorial pipeline's throughput for the same model."""
    from fastcifar import figures

    plt = figures.plt
    fig, ax = plt.subplots(figsize=(8, 5))
    labels: list[tuple[str, float, float]] = []
    for color, (machine, rows) in zip(plt.cm.tab10.colors, tables.items(), strict=False):
        points = [
            (r["train_ips"], r["stats"]["mean"], r) for r in rows if r["train_ips"] and r["stats"]
        ]
        for ips, acc, r in points:
            ax.scatter(ips, 100 * acc, color=color, zorder=3)
            labels.append((r["arch"], ips, 100 * acc))
            if r["baseline_ips"]:
                ax.scatter(
                    r["baseline_ips"], 100 * acc, facecolors="none", edgecolors=color, zorder=3
                )
                ax.annotate("", (ips, 100 * acc), (r["baseline_ips"], 100 * acc),
                            arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})  # fmt: skip
        front = pareto_front([(ips, acc) for ips, acc, _ in points])
        if front:
            xs, ys = zip(*front, strict=True)
            ax.step(
                xs,
                [100 * y for y in ys],
                where="pre",
                color=color,
                alpha=0.5,
                label=f"{machine[:40]} Pareto front",
            )
    ax.set_xscale("log")
    ax.set(xlabel="training images/s (log)", ylabel="test accuracy (%)",
           title="throughput against accuracy (hollow: tutorial pipeline, same model)")  # fmt: skip
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _annotate_apart(ax, labels, fontsize=8)
    return figures.save(fig, path)


def _annotate_apart(ax, labels: list[tuple[str, float, float]], fontsize: float) -> None:
    """Name each point beside it, moving a name down where it would overlap another."""
    ax.autoscale_view()
    ax.figure.tight_layout()  # the final axes size, so that distances in points hold
    to_points = 72 / ax.figure.dpi
    dx, dy = 5, 4  # a label's corner, up and to the right of its point, in points
    anchors = []
    for text, x, y in labels:
        px, py = ax.transData.transform((x, y)) * to_points
        anchors.append((px + dx, py + dy, 0.6 * fontsize * len(text)))
    lifts = spread_labels(anchors, height=1.15 * fontsize)
    for (text, x, y), lift in zip(labels, lifts, strict=True):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy + lift),
                    fontsize=fontsize)  # fmt: skip


def spread_labels(anchors: list[tuple[float, float, float]], height: float) -> list[float]:
    """Vertical shifts (<= 0) that keep text labels from overlapping. Each anchor is the
    (x, y, width) of a label's lower-left corner, in points; labels are placed from the
    top down, each below any placed label whose box it would cross."""
    placed: list[tuple[float, float, float]] = []
    shifts = [0.0] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: -anchors[i][1]):
        x, y, width = anchors[i]
        top = y
        beside = sorted(
            (py for px, py, pw in placed if x < px + pw and px < x + width), reverse=True
        )
        for py in beside:  # top only moves down, so one pass from the top is enough
            if abs(top - py) < height * (1 - 1e-9):
                top = py - height
        placed.append((x, top, width))
        shifts[i] = top - y
    return shifts


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput and accuracy, by throughput."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)]
    return sorted(front)


def write_readme_section(readme: Path, text: str) -> None:
    from fastcifar.atomic import write_text_atomic

    try:
        content = readme.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{readme} is not a text file") from None
    if START not in content or END not in content:
        raise UserError(f"{readme} has no {START} ... {END} section")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(readme, f"{head}{START}\n{text}\n{END}{tail}")


def _num(value) -> str:
    return f"{value:,.0f}" if value else "-"
