"""Error analysis: the numbers behind every figure, and the report files."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fastcifar.analysis import analyze_predictions, misclassified, without_diagonal
from fastcifar.cli import main
from fastcifar.compare import compare_records
from fastcifar.config import TrainConfig
from fastcifar.data.cache import load_cached
from fastcifar.display import TrainingDisplay
from fastcifar.errors import UserError
from fastcifar.train.engine import fit

from .conftest import make_arrays, write_batches_dir


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10))
    logits[np.arange(500), labels] += rng.normal(1.0, 1.5, 500)  # right about half the time
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_confusion_and_per_class_numbers_against_direct_counts(predictions):
    probs, labels = predictions
    a = analyze_predictions(probs, labels, top_pairs=5)
    predicted = probs.argmax(1)
    for t in range(10):
        for p in range(10):
            assert a.confusion[t, p] == np.sum((labels == t) & (predicted == p))
    off = without_diagonal(a.confusion)
    assert np.all(np.diag(off) == 0) and off.sum() == np.sum(labels != predicted)
    for c in range(10):
        errors = np.sum((labels == c) & (predicted != c))
        assert a.errors_per_class[c] == errors
        tp = np.sum((labels == c) & (predicted == c))
        precision = tp / np.sum(predicted == c)
        recall = tp / np.sum(labels == c)
        assert a.precision[c] == pytest.approx(precision)
        assert a.recall[c] == pytest.approx(recall)
        assert a.f1[c] == pytest.approx(2 * precision * recall / (precision + recall))
    assert a.accuracy == pytest.approx(np.mean(labels == predicted))
    counts = [c for _, _, c in a.confused_pairs]
    assert counts == sorted(counts, reverse=True) and counts[0] == off.max()


def test_misclassified_examples_are_the_right_mistakes(predictions):
    probs, labels = predictions
    t, p, count = analyze_predictions(probs, labels).confused_pairs[0]
    picked = misclassified(probs, labels, t, p, limit=100)
    assert len(picked) == count
    confidences = [c for _, c in picked]
    assert confidences == sorted(confidences, reverse=True)
    for index, confidence in picked:
        assert labels[index] == t and probs[index].argmax() == p
        assert confidence == pytest.approx(probs[index, p])


def test_analyze_and_compare_write_valid_figures(tmp_path, capsys):
    data = str(write_batches_dir(tmp_path / "data", make_arrays(n_train=300, n_test=200)))
    for name in ("a", "b"):
        cfg = TrainConfig(arch="lenet", data=data, out=str(tmp_path / name), epochs=2, batch_size=50,
                          val=50, amp="none", track=False, seed=ord(name))  # fmt: skip
        fit(cfg, TrainingDisplay(quiet=True))
    assert main(["analyze", str(tmp_path / "a")]) == 0
    report = tmp_path / "a" / "analysis"
    pngs = sorted(report.glob("*.png"))
    assert {"curves.png", "confusion.png", "confusion_errors.png", "class_errors.png"} <= {
        p.name for p in pngs
    }
    assert any(p.name.startswith("pair_") for p in pngs)
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 150
    html = (report / "index.html").read_text()
    assert all(p.name in html for p in pngs)
    result = json.loads((report / "analysis.json").read_text())
    assert sum(map(sum, result["confusion"])) == 200
    assert (
        main(
            ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]
        )
        == 0
    )
    assert "test acc" in capsys.readouterr().out
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG"


def fake_run(path, epochs, planned, summary=None, wall=False):
    """A run directory's files as `fit` writes them, without training (`wall`: rows with
    the run's wall time so far, as runs since that field write them)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"arch": "lenet", "epochs": planned}))
    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e, "val_loss": 2.1 / e,
             "val_acc": 0.09 * e, "test_loss": 2.2 / e, "test_acc": 0.08 * e, "seconds": 10.0}
            for e in range(1, epochs + 1)]  # fmt: skip
    for row in rows if wall else []:
        row["wall_seconds"] = 12.5 * row["epoch"]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        best = {k: rows[-1][k] for k in ("epoch", "val_acc", "test_acc")}
        (path / "summary.json").write_text(json.dumps({**summary, "best": best}))
    return path


def test_compare_takes_folders_of_runs_and_says_how_each_ended(tmp_path):
    from fastcifar.compare import compare_runs

    sweep = tmp_path / "sweep"
    fake_run(sweep / "a", 4, 4, {"stopped": None, "seconds": {"total": 55.0}})
    fake_run(sweep / "b", 3, 8, {"stopped": "early stop: no improvement for 2 epochs"})
    fake_run(sweep / "c", 2, 6, wall=True)  # interrupted: no summary yet
    (sweep / "d").mkdir()
    (sweep / "d" / "config.json").write_text("{}")  # started, no epoch finished
    other = fake_run(tmp_path / "other" / "trials" / "a", 1, 5, {"stopped": None})
    notes = []
    rows = compare_runs([sweep, tmp_path / "other"], tmp_path / "c.png", log=notes.append)
    assert [r["run"] for r in rows] == [str(sweep / "a"), "b", "c", str(other)]  # "a" twice
    assert [r["state"] for r in rows] == ["finished", "early stop", "unfinished", "finished"]
    assert [(r["epochs"], r["planned_epochs"]) for r in rows] == [(4, 4), (3, 8), (2, 6), (1, 5)]
    assert rows[0]["seconds"] == 55.0 and rows[2]["seconds"] == 25.0  # the last epoch's wall
    assert rows[2]["test_acc"] == pytest.approx(0.16)  # best validation epoch so far
    assert notes == [f"{sweep / 'd'}: no finished epoch yet, left out"]
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG"


def test_compare_leaves_out_a_damaged_run_found_in_a_folder(tmp_path, capsys):
    from fastcifar.compare import compare_runs, compare_settings

    runs = tmp_path / "runs"
    fake_run(runs / "a", 2, 2, {"stopped": None})
    fake_run(runs / "b", 2, 2, {"stopped": None})
    (runs / "b" / "config.json").write_text('{"arch": "lenet", "epo')  # cut short
    notes = []
    rows = compare_runs([runs], tmp_path / "c.png", log=notes.append)
    assert [r["run"] for r in rows] == ["a"]
    assert len(notes) == 1 and notes[0].startswith(f"cannot read {runs / 'b' / 'config.json'}")
    assert notes[0].endswith("; left out")
    assert [r["runs"] for r in compare_settings([runs], tmp_path / "p.png", log=notes.append)] == [
        1
    ]
    # named itself, the damaged run stops the comparison with its one-line error
    assert main(["compare", str(runs / "b"), "--out", str(tmp_path / "d.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (runs / "a" / "metrics.jsonl").write_text("{not json")
    with pytest.raises(UserError, match="no run to compare in"):
        compare_runs([runs], tmp_path / "e.png", log=notes.append)


def test_compare_writes_its_table_as_csv_or_markdown(tmp_path, capsys):
    import csv

    fake_run(tmp_path / "runs" / "a", 4, 4, {"stopped": None, "seconds": {"total": 55.04}})
    fake_run(tmp_path / "runs" / "b", 2, 6)
    argv = ["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "c.png")]
    assert main([*argv, "--table", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [(r["run"], r["state"], r["epochs"], r["planned_epochs"]) for r in rows] == [
        ("a", "finished", "4", "4"),
        ("b", "unfinished", "2", "6"),
    ]
    assert rows[0]["test_acc"] == "0.32" and rows[0]["seconds"] == "55.0"
    assert rows[1]["seconds"] == "20.0"  # rows without wall time: their epochs' seconds
    assert main([*argv, "--table", str(tmp_path / "t.md")]) == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| run | state | epochs |") and lines[2].startswith(
        "| a | finished | 4 |"
    )
    capsys.readouterr()
    assert main([*argv, "--table", str(tmp_path / "t.txt")]) == 2
    out, err = capsys.readouterr()
    assert (
        err.strip() == f"fastcifar: error: {tmp_path / 't.txt'}: a table is written as .csv or .md"
    )
    assert out == "" and not (tmp_path / "t.txt").exists()  # refused before any work


def test_compare_refuses_a_figure_it_cannot_write(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "a", 2, 2)
    argv = ["compare", str(tmp_path / "runs"), "--table", str(tmp_path / "t.csv"), "--out"]
    assert main([*argv, str(tmp_path / "c.txt")]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"fastcifar: error: {tmp_path / 'c.txt'}: matplotlib writes no .txt "
                           "figure; name it .png, .pdf or .svg")  # fmt: skip
    assert out == "" and not (tmp_path / "t.csv").exists()  # refused before any work
    folder = tmp_path / "figures"
    folder.mkdir()
    assert main([*argv, str(folder)]) == 2  # a folder where the figure would go
    err = capsys.readouterr().err
    assert err.strip() == f"fastcifar: error: cannot write {folder}: Is a directory"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main([*argv, str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_compare_pools_runs_that_differ_only_in_their_seed(tmp_path, capsys):
    import csv

    from fastcifar.compare import compare_settings
    from fastcifar.results import accuracy_stats

    def trained(name, epochs, test_acc, **config):
        path = fake_run(tmp_path / "runs" / name, epochs, epochs, {"stopped": None,
                        "seconds": {"total": 10.0 * epochs}})  # fmt: skip
        (path / "config.json").write_text(json.dumps({"arch": "lenet", "epochs": epochs, **config}))
        summary = json.loads((path / "summary.json").read_text())
        summary["best"]["test_acc"] = test_acc
        (path / "summary.json").write_text(json.dumps(summary))

    trained("a", 3, 0.61, lr=0.05, seed=0, out="runs/a")
    trained("b", 3, 0.65, lr=0.05, seed=1, out="runs/b", threads=1)  # threads change no result
    trained("c", 4, 0.70, lr=0.1, seed=0)
    trained("d", 3, 0.50, lr=0.05, seed=2, arch="conv3")
    fake_run(tmp_path / "runs" / "e", 1, 3)  # interrupted: not pooled
    # --winograd auto decides by the CPU: what ran, as env.json records it, is the setting
    for name, winograd, layers in [("w0", "on", None), ("w1", "auto", {"Winograd conv": 3}),
                                   ("w2", "auto", {"native max pool": 2}),
                                   ("w3", "auto", {"Winograd conv (and weight gradient)": 3}),
                                   ("w4", "auto",
                                    {"Winograd conv (and F(4x4) weight gradient)": 3})]:  # fmt: skip
        trained(name, 3, 0.5, arch="conv4", seed=int(name[1]), winograd=winograd)
        if layers is not None:
            (tmp_path / "runs" / name / "env.json").write_text(
                json.dumps({"native_layers": layers})
            )
    notes = []
    rows = compare_settings([tmp_path / "runs"], tmp_path / "c.png", log=notes.append)
    by_setting = {r["settings"]: r for r in rows}
    # the weight gradient's tile from the layers too (an unset flag: the precision's default)
    with_winograd = "conv4, winograd=on, winograd_grad_tile="
    assert sorted(by_setting) == ["conv3",
                                  "conv4, winograd=off, winograd_grad_tile=2, winograd_weight_grad=off",
                                  f"{with_winograd}2, winograd_weight_grad=off",
                                  f"{with_winograd}2, winograd_weight_grad=on",
                                  f"{with_winograd}4, winograd_weight_grad=on",
                                  "lenet, epochs=3, lr=0.05", "lenet, epochs=4, lr=0.1"]  # fmt: skip
    assert by_setting[f"{with_winograd}2, winograd_weight_grad=off"]["seeds"] == "0 1"
    assert by_setting[f"{with_winograd}2, winograd_weight_grad=on"]["seeds"] == "3"
    assert by_setting[f"{with_winograd}4, winograd_weight_grad=on"]["seeds"] == "4"
    pooled = by_setting["lenet, epochs=3, lr=0.05"]
    stats = accuracy_stats([0.61, 0.65])
    assert (pooled["runs"], pooled["seeds"]) == (2, "0 1")
    assert pooled["test_acc_mean"] == pytest.approx(0.63)
    assert pooled["test_acc_std"] == pytest.approx(round(stats["std"], 4))
    assert pooled["test_acc_ci95_low"] == pytest.approx(round(stats["ci95"][0], 4))
    assert pooled["seconds_mean"] == 30.0
    alone = by_setting["lenet, epochs=4, lr=0.1"]
    assert (
        alone["runs"] == 1 and alone["test_acc_std"] is None and alone["test_acc_ci95_low"] is None
    )
    assert notes == [f"{tmp_path / 'runs' / 'e'}: unfinished, left out of the pooled rows"]
    argv = ["compare", str(tmp_path / "runs"), "--pool-seeds", "--out", str(tmp_path / "p.png")]
    assert main([*argv, "--table", str(tmp_path / "p.csv")]) == 0
    assert "63.00% ± 2.83%" in capsys.readouterr().out
    written = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["settings"] for r in written] == [r["settings"] for r in rows]
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG"


def test_against_best_is_welchs_t_test_worked_by_hand():
    from fastcifar.compare import against_best

    # means 0.81 and 0.85, variances 2e-4 each: standard error sqrt(2e-4), t = -2.828 with
    # 2 degrees of freedom, where the t CDF is 1/2 + t / (2 sqrt(2 + t^2)): p = 0.1056;
    # the interval is -0.04 +- t(0.975, 2) = 4.3027 times the standard error
    worse, best, single, flat = against_best([[0.80, 0.82], [0.84, 0.86], [0.70], [0.5, 0.5]])
    assert worse["vs_best"] == pytest.approx(-0.04) and worse["p_vs_best"] == pytest.approx(0.1056)
    half = 4.3027 * 2e-4**0.5
    assert (worse["vs_best_ci95_low"], worse["vs_best_ci95_high"]) == pytest.approx(
        (-0.04 - half, -0.04 + half), abs=1e-4
    )
    assert best == {"vs_best": 0.0, "vs_best_ci95_low": None, "vs_best_ci95_high": None,
                    "p_vs_best": None}  # fmt: skip
    assert single["vs_best"] == pytest.approx(-0.15) and single["p_vs_best"] is None
    assert flat["p_vs_best"] is not None  # no spread on one side only: still a test
    assert against_best([[0.5, 0.5], [0.6, 0.6]])[0]["p_vs_best"] is None  # none on either


def test_ensemble_accuracy_averages_the_seeds_softmax_outputs(tmp_path):
    import torch

    from fastcifar.compare import ensemble_accuracy
    from fastcifar.train.rundir import write_predictions

    labels = torch.tensor([0, 1, 2])
    a = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0], [0.0, 0.4, 0.6]])  # says 0, 0, 2
    b = torch.tensor([[0.4, 0.6, 0.0], [0.0, 0.9, 0.1], [0.7, 0.0, 0.3]])  # says 1, 1, 0
    for name, probs in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_predictions(tmp_path / name, probs, labels, epoch=1)
    assert (a.argmax(1) == labels).float().mean() == pytest.approx(2 / 3)
    assert (b.argmax(1) == labels).float().mean() == pytest.approx(1 / 3)
    # the mean, [0.55, 0.45, 0], [0.3, 0.65, 0.05], [0.35, 0.2, 0.45], says 0, 1, 2
    assert ensemble_accuracy([tmp_path / "a", tmp_path / "b"]) == pytest.approx(1.0)
    assert ensemble_accuracy([tmp_path / "a"]) is None  # one run is no ensemble
    (tmp_path / "c").mkdir()
    write_predictions(tmp_path / "c", a, torch.tensor([2, 1, 0]), epoch=1)
    assert ensemble_accuracy([tmp_path / "a", tmp_path / "c"]) is None  # other images
    assert ensemble_accuracy([tmp_path / "a", tmp_path / "missing"]) is None


def test_a_pooled_curve_carries_its_spread_for_the_band():
    from fastcifar.compare import _mean_curve

    runs = [[{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}],
            [{"epoch": 1, "test_acc": 0.7}]]  # fmt: skip
    (row,) = _mean_curve(runs)  # as far as every run went
    assert row["test_acc"] == pytest.approx(0.6) and row["test_acc_std"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert row["val_acc"] is None and "val_acc_std" not in row
    assert "test_acc_std" not in _mean_curve(runs[:1])[0]  # one run: no band


def test_compare_of_a_file_is_one_line(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("not a run")
    assert main(["compare", str(log)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"fastcifar: error: {log} is a file, not a run directory"
    )


def test_analyze_without_predictions_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert main(["analyze", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predictions.npz" in err[0]
    (tmp_path / "run" / "predictions.npz").write_bytes(b"PK\x03\x04 cut short")  # truncated
    assert main(["analyze", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0] and "predictions.npz" in err[0]


def test_analyze_finds_the_cached_data_a_run_trained_on(tmp_path, monkeypatch):
    """A run given no --data trains on the default cache entry; analysing it later reopens
    that entry, even after its source is gone and another entry became the default."""
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    first = write_batches_dir(tmp_path / "first", make_arrays(n_train=200, n_test=100, seed=1))
    load_cached(first, log=lambda _: None)
    shutil.rmtree(first)
    cfg = TrainConfig(arch="lenet", data=None, out=str(tmp_path / "run"), epochs=1, batch_size=50,
                      val=50, amp="none", track=False)  # fmt: skip
    fit(cfg, TrainingDisplay(quiet=True))
    second = write_batches_dir(tmp_path / "second", make_arrays(n_train=200, n_test=80, seed=2))
    load_cached(second, log=lambda _: None)
    assert main(["analyze", str(tmp_path / "run"), "--no-track"]) == 0
    result = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())
    assert sum(map(sum, result["confusion"])) == 100


def test_compare_pools_recorded_results_per_arch_and_recipe(tmp_path, capsys):
    import csv

    def results_file(name, machine, records):
        path = tmp_path / name
        path.write_text(json.dumps({"kind": "accuracy", "machine": machine, "records": [
            {"arch": arch, "recipe": recipe, "seed": seed, "test_acc": acc,
             "seconds": {"total": 100.0 + seed}}
            for arch, recipe, seed, acc in records]}))  # fmt: skip
        return path

    a = results_file("a.json", "cpu A", [("lenet", "default", 0, 0.61), ("lenet", "default", 1, 0.65),
                                         ("lenet", "other", 0, 0.70), ("conv3", "default", 0, 0.50),
                                         ("conv3", "default", 1, 0.52)])  # fmt: skip
    rows = {r["settings"]: r for r in compare_records([a])}
    assert sorted(rows) == ["conv3, recipe=default", "lenet, recipe=default", "lenet, recipe=other"]
    pooled = rows["lenet, recipe=default"]
    assert (pooled["runs"], pooled["seeds"], pooled["seconds_mean"]) == (2, "0 1", 100.5)
    assert pooled["test_acc_mean"] == pytest.approx(0.63)
    assert pooled["test_acc_std"] == pytest.approx(0.0283, abs=1e-4)
    assert pooled["vs_best"] == pytest.approx(-0.07)  # against lenet's best recipe
    assert rows["conv3, recipe=default"]["vs_best"] == 0.0  # not against lenet's
    b = results_file("b.json", "cpu B", [("lenet", "default", 0, 0.60)])
    both = {r["settings"]: r for r in compare_records([a, b])}
    assert both["lenet, recipe=default (cpu B)"]["vs_best"] == 0.0  # its machine's own best
    assert both["lenet, recipe=default (cpu A)"]["runs"] == 2

    figure = tmp_path / "c.png"
    assert main(["compare", str(a), "--out", str(figure), "--table", str(tmp_path / "t.csv")]) == 0
    assert "63.00% ± 2.83%" in capsys.readouterr().out
    assert not figure.exists()  # records have no curves
    written = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [r["settings"] for r in written] == list(rows)


def test_compare_of_results_refuses_what_it_cannot_pool(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    other = tmp_path / "throughput.json"
    other.write_text(json.dumps({"kind": "side_by_side", "machine": "m", "results": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for argv, message in (
        ([str(other), str(tmp_path / "run")], "compare takes run directories or results files (.json), not both"),
        ([str(other)], f"no accuracy records in {other}"),
        ([str(broken)], f"{broken} is not valid JSON"),
        ([str(tmp_path / "gone.json")], f"{tmp_path / 'gone.json'} does not exist"),
    ):  # fmt: skip
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fastcifar: error: {message}")
