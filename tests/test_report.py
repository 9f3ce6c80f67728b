"""The benchmark report, built from a small fixture results folder."""

import json

import pytest
import torch
from PIL import Image

from fastcifar.bench import build_pipeline, compare_throughput
from fastcifar.cli import main
from fastcifar.report import END, START, pareto_front, spread_labels
from fastcifar.results import accuracy_stats

from .conftest import make_arrays


def record(arch, acc, seed, reached, recipe="default"):
    return {"arch": arch, "recipe": recipe, "seed": seed, "test_acc": acc, "best_epoch": 10,
            "epochs_run": 10, "seconds": {"total": 100.0}, "reached": reached, "run": f"{arch}-{seed}"}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "throughput-m.json").write_text(json.dumps({
        "kind": "side_by_side", "machine": "Test CPU, 2 cores",
        "results": [{"arch": "lenet", "baseline_images_per_sec": 4000.0, "fastcifar_images_per_sec": 14000.0,
                     "speedup": 3.5, "percent_of_peak": 12.5, "fastcifar_eval_images_per_sec": 30000.0,
                     "eval_speedup": 1.5},
                    {"arch": "conv3", "baseline_images_per_sec": 1000.0, "fastcifar_images_per_sec": 3000.0,
                     "speedup": 3.0, "percent_of_peak": 40.0}],  # saved before evaluation was timed
    }))  # fmt: skip
    (folder / "throughput-n.json").write_text(json.dumps({  # an ablation: not in the table
        "kind": "side_by_side", "machine": "Test CPU, 2 cores",
        "results": [{"arch": "lenet", "baseline_images_per_sec": 4000.0, "fastcifar_images_per_sec": 20000.0,
                     "speedup": 5.0, "percent_of_peak": 18.0, "compile_mode": "reduce-overhead"},
                    {"arch": "lenet", "baseline_images_per_sec": 4000.0, "fastcifar_images_per_sec": 30000.0,
                     "speedup": 7.5, "percent_of_peak": 27.0, "batch_size": 1024},
                    {"arch": "lenet", "baseline_images_per_sec": 4000.0, "fastcifar_images_per_sec": 40000.0,
                     "speedup": 10.0, "percent_of_peak": 36.0, "default_settings": False},
                    {"arch": "lenet", "baseline_images_per_sec": 14000.0, "fastcifar_images_per_sec": 14000.0,
                     "speedup": 1.0, "percent_of_peak": 12.5, "default_settings": True,
                     "against": "default"}],
    }))  # fmt: skip
    (folder / "accuracy-m.json").write_text(json.dumps({
        "kind": "accuracy", "machine": "Test CPU, 2 cores",
        "records": [record("lenet", 0.68, 0, {"0.6": {"epoch": 5, "train_seconds": 20.0},
                                               "paper": {"epoch": 6, "train_seconds": 24.0}}),
                    record("lenet", 0.70, 1, {"paper": {"epoch": 7, "train_seconds": 30.0}}),
                    record("lenet", 0.63, 0, {}, recipe="paper")],
    }))  # fmt: skip
    return folder


def test_report_table_and_readme_section(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    figure = tmp_path / "fig.png"
    assert (
        main(
            ["report", "--results", str(results), "--figure", str(figure), "--readme", str(readme)]
        )
        == 0
    )
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    row = next(line for line in text.splitlines() if line.startswith("| lenet |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert (
        cells[1] == "62,006"
        and cells[3] == "14,000"
        and cells[4] == "4,000"
        and cells[5] == "3.50x"
        and cells[6] == "12.5%"
    )
    assert cells[7] == "30,000 (1.50x)"  # evaluation images/s and speedup
    assert cells[8] == "69.00% ± 1.41 (2 runs)"
    assert cells[10] == "epoch 7 (30 s)"  # by then both runs had reached the paper's 62%
    assert cells[11] == "63.00% (1 run)"  # the paper's own recipe, run here
    assert cells[12] == "62.0%"
    row = next(line for line in text.splitlines() if line.startswith("| conv3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "3,000" and cells[7] == "-" and cells[8] == "-"
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.width > 400


def bench_file(folder, name, when, entries):
    """A pytest-benchmark JSON file of `benchmarks/test_throughput.py` runs."""
    benchmarks = [{"name": f"test_train_throughput[{e['arch']}-{e['variant']}]",
                   "extra_info": {"kind": "train", "mode": "full", "device_name": "Test CPU, 2 cores",
                                  **e}} for e in entries]  # fmt: skip
    (folder / name).write_text(json.dumps({"datetime": when, "benchmarks": benchmarks}))


def test_report_tables_each_switch_alone_from_the_newest_paired_run(results, tmp_path, capsys):
    def paired(arch, variant, speedup, base):
        return {
            "arch": arch,
            "variant": variant,
            "speedup": speedup,
            "baseline_images_per_sec": base,
        }

    bench_file(results, "benchmarks-old.json", "2026-12-01T10:00:00", [
        paired("lenet", "baseline", 1.0, 4000.0), paired("lenet", "default", 9.9, 4000.0),
        paired("conv3", "baseline", 1.0, 800.0), paired("conv3", "default", 2.5, 900.0),
        paired("conv3", "compile", 0.7, 700.0),
    ])  # fmt: skip
    bench_file(results, "benchmarks-new.json", "2026-12-02T10:00:00", [
        paired("lenet", "baseline", 1.0, 4100.0), paired("lenet", "default", 4.2, 4400.0),
        paired("lenet", "amp", 0.9, 3900.0),
        {**paired("lenet", "native_loader", 8.0, 1.0), "mode": "quick"},  # a smoke test
        {"arch": "lenet", "variant": "default", "kind": "eval", "images_per_sec": 9.0},
    ])  # fmt: skip
    bench_file(results, "benchmarks-unpaired.json", "2026-12-03T10:00:00", [
        {"arch": "lenet", "variant": "default", "speedup": 7.0, "baseline_images_per_sec": None},
        {"arch": "cerberus", "variant": "default", "speedup": 3.0},
    ])  # fmt: skip
    argv = ["report", "--results", str(results), "--figure", str(tmp_path / "f.png")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    _, table = text.split("**Test CPU, 2 cores: each switch alone")
    assert "| cerberus |" not in table  # only in an unpaired run
    lines = table.splitlines()
    assert lines[2] == "| arch | default | AMP alone | compile alone | paired baseline img/s |"
    assert "| lenet | 4.20x | 0.90x | - | 3,900 to 4,400 |" in lines  # the newer run's
    assert "| conv3 | 2.50x | - | 0.70x | 700 to 900 |" in lines  # only in the older run


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"intro, no report section\n", "has no <!--"),
        (b"\x89PNG\r\n\x1a\n\xff", "is not a text file"),
    ],
)
def test_report_refuses_a_readme_it_cannot_rewrite(tmp_path, results, capsys, content, fragment):
    readme = tmp_path / "README.md"
    readme.write_bytes(content)
    argv = ["report", "--results", str(results), "--figure", str(tmp_path / "f.png")]
    assert main([*argv, "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert readme.read_bytes() == content


def test_benchmark_summary_joins_this_sessions_throughput_with_recorded_accuracy(results):
    from fastcifar.report import throughput_against_accuracy

    measured = {
        ("lenet", "train", "baseline"): {"images_per_sec": 2000.0},
        ("lenet", "train", "default"): {"images_per_sec": 8000.0, "percent_of_peak": 20.0},
        ("lenet", "eval", "baseline"): {"images_per_sec": 5000.0},
        ("lenet", "eval", "default"): {"images_per_sec": 25000.0},
        ("conv3", "train", "amp"): {"images_per_sec": 900.0},  # no default timed: no row
        ("cerberus", "train", "default"): {"images_per_sec": 40.0},  # no accuracy recorded
        # the default's paired baseline rounds win over the baseline's own, earlier test
        ("conv5", "train", "baseline"): {"images_per_sec": 500.0},
        ("conv5", "train", "default"): {
            "images_per_sec": 2600.0,
            "speedup": 2.5,
            "baseline_images_per_sec": 1000.0,
        },  # fmt: skip
    }
    table = throughput_against_accuracy(measured, "Test CPU, 2 cores", results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert set(rows) == {"arch", "lenet", "cerberus", "conv5"}
    assert rows["conv5"][3:6] == ["2,600", "1,000", "2.50x"]
    lenet = rows["lenet"]
    assert lenet[3:8] == ["8,000", "2,000", "4.00x", "20.0%", "25,000 (5.00x)"]
    assert lenet[8] == "69.00% ± 1.41 (2 runs)"  # from the results folder, not measured here
    assert rows["cerberus"][3:9] == ["40", "-", "-", "-", "-", "-"]
    assert throughput_against_accuracy({}, "Test CPU, 2 cores", results) == ""


def test_accuracy_stats_and_pareto_front():
    s = accuracy_stats([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["std"] == pytest.approx(0.02)
    half = 4.3027 * 0.02 / 3**0.5  # t(0.975, 2 degrees of freedom), from a printed table
    assert s["ci95"] == pytest.approx([0.72 - half, 0.72 + half], abs=1e-5)
    many = accuracy_stats([0.70, 0.74] * 15)  # 29 degrees of freedom: t = 2.0452, not 1.96
    half = 2.0452 * many["std"] / 30**0.5
    assert many["ci95"] == pytest.approx([0.72 - half, 0.72 + half], abs=1e-5)
    assert accuracy_stats([0.5])["ci95"] is None
    assert pareto_front([(1, 0.9), (2, 0.8), (1.5, 0.7), (3, 0.6)]) == [
        (1, 0.9),
        (2, 0.8),
        (3, 0.6),
    ]


@pytest.mark.parametrize("height", [9.0, 1.15 * 8])
def test_labels_of_nearby_points_are_moved_apart(height):
    anchors = [(100, 50, 60), (104, 49, 80), (102, 51, 40), (300, 50, 60), (100, 10, 60)]
    shifts = spread_labels(anchors, height)
    boxes = [(x, y + s, w) for (x, y, w), s in zip(anchors, shifts, strict=True)]
    for i, (xa, ya, wa) in enumerate(boxes):
        for xb, yb, wb in boxes[i + 1 :]:
            assert not (xa < xb + wb and xb < xa + wa and abs(ya - yb) < height)
    assert shifts[2] == 0 and shifts[3] == 0 and shifts[4] == 0  # the top one and lone ones stay
    assert shifts[0] < 0 and shifts[1] < 0


def test_report_without_results_is_one_line(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"fastcifar: error: no results in {tmp_path}"
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", "--results", str(tmp_path / "results.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"fastcifar: error: --results {tmp_path / 'results.json'}: not a folder of results files"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"kind": "accuracy", "records": []}, "is not a fastcifar accuracy results file"),
        ({"kind": "side_by_side", "machine": "m", "results": {}}, "no machine or results"),
        ({"kind": "accuracy", "machine": "m", "records": [{"arch": "lenet", "recipe": "default"}]},
         ": a record without seed, test_acc, seconds"),
        ({"kind": "side_by_side", "machine": "m", "results": ["lenet"]}, ": a result without arch"),
    ],
)  # fmt: skip
def test_a_damaged_results_file_is_one_line(tmp_path, results, capsys, content, fragment):
    (results / "accuracy-z.json").write_text(json.dumps(content))
    assert main(["report", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "accuracy-z.json" in err[0]


def test_report_keeps_a_result_of_an_arch_no_longer_registered(results, capsys):
    (results / "accuracy-z.json").write_text(json.dumps({
        "kind": "accuracy", "machine": "Test CPU, 2 cores",
        "records": [record("resnet_gone", 0.9, 0, {})],
    }))  # fmt: skip
    assert main(["report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| resnet_gone | - | - |" in out
    assert (results / "throughput-vs-accuracy.png").is_file()  # the figure's default folder


def test_side_by_side_records_whether_it_ran_the_recipe_unchanged(monkeypatch):
    from fastcifar import heap

    monkeypatch.setattr(heap, "_state", "kept")  # as if FASTCIFAR_MALLOC had taken effect
    train, labels, _, _ = make_arrays(n_train=256)
    kwargs = dict(steps=1, windows=1, warmup=1)
    result = compare_throughput("lenet", train, labels, **kwargs)
    assert result.default_settings
    assert result.malloc == "kept"  # the host-memory policy both sides ran under
    assert result.eval_batch_size == 1000  # the recipe's; 256 images give one short batch
    assert result.fastcifar_eval_images_per_sec > 0 and result.baseline_eval_images_per_sec > 0
    assert not compare_throughput("lenet", train, labels, batch_size=32, **kwargs).default_settings
    changed = compare_throughput("lenet", train, labels, overrides={"lr": 0.123}, **kwargs)
    assert not changed.default_settings
    assert changed.against == "baseline" and changed.settings == {"lr": 0.123}


def test_side_by_side_against_the_default_times_one_setting(monkeypatch):
    import fastcifar.bench as bench

    built = []
    real = bench.build_pipeline

    def recording(arch, variant, *args, **kwargs):
        pipeline = real(arch, variant, *args, **kwargs)
        built.append((variant, pipeline.cfg))
        return pipeline

    monkeypatch.setattr(bench, "build_pipeline", recording)
    train, labels, _, _ = make_arrays(n_train=256)
    result = bench.compare_throughput("lenet", train, labels, steps=1, windows=1, warmup=1,
                                      overrides={"channels_last": False}, against="default")  # fmt: skip
    (ours_variant, ours), (base_variant, base) = built
    assert ours_variant == base_variant == "default"
    assert base.channels_last and not ours.channels_last
    assert base.replace(channels_last=False) == ours  # the one setting is the only difference
    assert result.against == "default" and result.settings == {"channels_last": False}
    assert not result.default_settings


def test_a_run_is_recorded_only_under_the_recipe_it_followed():
    from fastcifar.config import TrainConfig
    from fastcifar.recipes import named_recipe
    from fastcifar.results import recipe_differences

    default = TrainConfig.from_dict(named_recipe("conv5", "default", "cpu")).to_dict()
    assert recipe_differences(default, "default", "cpu") == []
    # another seed, run directory or loader is still the recipe
    same = {**default, "seed": 3, "out": "elsewhere", "loader": "dali", "native": "off"}
    assert recipe_differences(same, "default", "cpu") == []
    assert recipe_differences({**default, "epochs": 20}, "default", "cpu") == [
        "epochs 20 (recipe: 25)"
    ]
    assert recipe_differences(default, "paper", "cpu")  # the paper's recipe is another one
    paper = TrainConfig.from_dict(named_recipe("lenet", "paper", "cpu")).to_dict()
    assert recipe_differences(paper, "paper", "cpu") == []
    assert (paper["batch_size"], paper["flip"]) == (4, False)  # from configs/paper/lenet.toml


def test_evaluation_batches_of_the_tutorial_and_of_fastcifar_agree():
    """Both pipelines evaluate the same images in order, normalised alike, unaugmented."""
    train, labels, _, _ = make_arrays(n_train=70)
    ours, base = (build_pipeline("lenet", v, train, labels, overrides={"eval_batch_size": 32})
                  for v in ("default", "baseline"))  # fmt: skip
    for _ in range(4):  # an epoch of 32 + 32 + 6 images, then the next one starts over
        (xa, ya), (xb, yb) = next(ours.eval_batches), next(base.eval_batches)
        assert torch.equal(ya, yb)
        tol = 1e-5 if xa.dtype == torch.float32 else 2e-2  # bf16 where the CPU computes in it
        torch.testing.assert_close(xa.float(), xb, atol=tol, rtol=tol)
