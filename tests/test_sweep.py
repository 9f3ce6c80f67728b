"""Sweeps on Optuna: the sweep file, grid and TPE runs, workers sharing a study, a killed
worker, resume, and MLflow child runs."""

import csv
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcifar import sweep
from fastcifar.cli import main
from fastcifar.errors import UserError
from fastcifar.sweep import run_sweep
from fastcifar.sweep_results import result_columns
from fastcifar.sweep_spec import read_sweep

from .conftest import make_arrays, write_batches_dir

optuna = pytest.importorskip("optuna")
mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata")
    return str(write_batches_dir(root, make_arrays(n_train=300, n_test=100)))


def sweep_file(tmp_path, search: str, sampler: str = "", name: str = "s") -> "os.PathLike":
    path = tmp_path / f"{name}.toml"
    common = 'epochs = 1\nbatch_size = 50\nval = 50\namp = "none"\nthreads = 1\n'
    path.write_text(f"[search]\n{search}\n{common}\n{sampler}")
    return path


def worker_study(tmp_path, search: str, name: str):
    """What a worker is given: a sweep, its output folder and a fresh study in it."""
    path = sweep_file(tmp_path, search, name=name)
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'study.db'}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    return read_sweep(path), out, url


@pytest.mark.parametrize(
    ("search", "sampler", "fragment"),
    [
        ('arch = "lenet"\nlr = [-0.1, 0.1]', "", "--lr must be positive"),
        ('arch = "lenet"\nlr = []', "", "axis 'lr' is empty"),
        ('arch = "lenet"\nspeed = [1, 2]', "", "unknown or sweep-owned option(s) speed"),
        ('arch = ["lenet", "vgg"]', "", "unknown arch 'vgg'"),
        ('arch = "lenet"\nlr = [0.1]', '[sampler]\ntype = "tpe"', "needs a positive 'trials'"),
        ('arch = "lenet"\nlr = [0.1]', '[sampler]\ntype = "random"', "must be 'grid' or 'tpe'"),
        ('arch = "lenet"\nlr = [0.1]', '[sampler]\nseed = "one"', "seed must be an integer in 0.."),
        ('arch = "lenet"\nlr = [0.1]', "[sampler]\nseed = 4294967296", "not 4294967296"),
        ('arch = "lenet"\nlr = [0.1]', '[sampler]\nprune = "no"', "prune must be true or false"),
    ],
)
def test_bad_sweep_files(tmp_path, capsys, search, sampler, fragment):
    path = sweep_file(tmp_path, search, sampler)
    with pytest.raises(UserError, match="."):
        read_sweep(path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "o" / "results.csv").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "o").write_text("keep")
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.1]')
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("o is a file, not a directory"), err
    assert (tmp_path / "o").read_text() == "keep"


def test_paper_grid_has_24_points():
    spec = read_sweep(
        __import__("pathlib").Path(__file__).parents[1] / "configs" / "sweeps" / "paper-table1.toml"
    )
    grid = spec.grid()
    assert len(grid) == 24
    assert {(g["optimizer"], g.get("momentum")) for g in grid} == {
        ("adam", None),
        ("sgd", 0.5),
        ("sgd", 0.9),
    }
    assert all(g["epochs"] == 20 and g["patience"] == 5 for g in grid)


def test_grid_with_two_workers_and_mlflow_children(tmp_path, data):
    path = sweep_file(
        tmp_path,
        'arch = "lenet"\nlr = [0.01, 0.05]\noptimizer = [{optimizer = "adam"}, {optimizer = "sgd", momentum = 0.9}]',
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = run_sweep(read_sweep(path), storage=None, workers=2, resume=False, out=tmp_path / "out", data=data,
                     track=True, tracking_uri=uri, log=lambda _: None)  # fmt: skip
    assert len(rows) == 4 and all(r["state"] == "complete" for r in rows)
    assert {(r["lr"], r["optimizer"]) for r in rows} == {
        (lr, o) for lr in (0.01, 0.05) for o in ("adam", "sgd m=0.9")
    }
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4  # nothing run twice
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 5
    markdown = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| trial | model | duration | lr | optimizer | accuracy |")
    assert len(markdown) == 2 + 4
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["fastcifar"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sweep") == "s"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and all("final_test_acc" in r.data.metrics for r in children)


def test_of_two_racing_trials_exactly_one_gives_way():
    from optuna.trial import TrialState

    from fastcifar.sweep import _taken_by_another

    study = optuna.create_study()
    for lr in (0.01, 0.01, 0.05):  # two workers drew the same grid point, a third another
        study.enqueue_trial({"lr": lr})
    first, second, other = (study.ask() for _ in range(3))
    for trial in (first, second, other):
        trial.suggest_categorical("lr", [0.01, 0.05])
    assert first.params == second.params != other.params
    # every trial has drawn its point, so there is nothing to wait for
    taken = [_taken_by_another(study, t, wait_s=0) for t in (first, second, other)]
    assert taken == [False, True, False]
    study.tell(first, state=TrialState.FAIL)  # a failed first trial no longer holds the point
    assert not _taken_by_another(study, second, wait_s=0)


def test_a_later_trial_waits_for_an_earlier_one_to_draw_its_point():
    import threading

    from fastcifar.sweep import _taken_by_another

    study = optuna.create_study()
    for _ in range(2):
        study.enqueue_trial({"lr": 0.01})
    first, second = study.ask(), study.ask()  # the first's worker has not drawn its point yet
    second.suggest_categorical("lr", [0.01, 0.05])
    draw = threading.Timer(0.3, first.suggest_categorical, ("lr", [0.01, 0.05]))
    draw.start()
    try:
        assert _taken_by_another(study, second, wait_s=60)
    finally:
        draw.join()


def test_an_earlier_trial_that_never_draws_is_waited_for_only_so_long():
    from fastcifar.sweep import _taken_by_another

    study = optuna.create_study()
    study.ask()  # a worker that died before drawing its point
    later = study.ask()
    later.suggest_categorical("lr", [0.01, 0.05])
    began = time.monotonic()
    assert not _taken_by_another(study, later, wait_s=0.2)
    assert time.monotonic() - began >= 0.2


def test_resume_redoes_nothing_and_is_required(tmp_path, data, capsys):
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]')
    args = ["sweep", str(path), "--out", str(tmp_path / "out"), "--data", data, "--no-track"]
    assert main(args) == 0
    assert main(args) == 2
    assert "add --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert len(study.trials) == 2
    for edit, changed in [
        ("lr = [0.01, 0.05, 0.1]", "lr"),
        ("lr = [0.01, 0.05]\nseed = 3", "seed"),
    ]:
        path.write_text(path.read_text().replace("lr = [0.01, 0.05]", edit))
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2  # Optuna cannot widen an axis: no worker starts
        err = capsys.readouterr().err.strip()
        assert err == (f"fastcifar: error: {path} changed {changed} since study 's' began; restore "
                       "it, or sweep it as a new study (another file name or --out)")  # fmt: skip
        assert len(optuna.load_study(study_name="s", storage=study._storage).trials) == 2
        path.write_text(path.read_text().replace(edit, "lr = [0.01, 0.05]"))


def test_workers_train_the_file_as_the_sweep_read_it(tmp_path, data):
    """The file edited once the sweep has begun (the next sweep drafted in it, here a
    different axis): the workers still train the points the sweep planned."""
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]', name="d")
    spec = read_sweep(path)
    path.write_text('[search]\narch = "conv3"\nseed = [7]\n')
    rows = run_sweep(spec, storage=None, workers=1, resume=False, out=tmp_path / "out", data=data,
                     track=False, heartbeat=2, log=lambda _: None)  # fmt: skip
    assert sorted((r["model"], r["lr"], r["state"]) for r in rows) == [
        ("lenet", 0.01, "complete"), ("lenet", 0.05, "complete")]  # fmt: skip


def test_tpe_spends_exactly_its_budget(tmp_path, data):
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.02, 0.05, 0.1]\nseed = [1, 2, 3]',
                      '[sampler]\ntype = "tpe"\ntrials = 3\nprune = false')  # fmt: skip
    rows = run_sweep(read_sweep(path), storage=None, workers=1, resume=False, out=tmp_path / "out", data=data,
                     track=False, heartbeat=2, log=lambda _: None)  # fmt: skip
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert len(study.trials) == 3 and len(rows) <= 3


def test_a_stopped_sweep_stops_its_workers(tmp_path, data):
    from fastcifar.train.rundir import is_training

    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]\nsubset = 250', name="t")
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 400"))
    out, trial = tmp_path / "out", tmp_path / "out" / "trials" / "0000"
    with (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fastcifar", "sweep", str(path), "--out", str(out),
                                 "--data", data, "--no-track"], stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (trial / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 130
        assert not is_training(trial)  # its worker stopped with it (it used to train on)
    finally:
        if shutil.which("pkill"):  # a worker left over by a failure
            subprocess.run(["pkill", "-f", "--", f"--out {out}"])
    hint, last = (tmp_path / "stderr").read_text().strip().splitlines()  # the workers say nothing
    assert hint.startswith(
        f"fastcifar: sweep t stopped; `fastcifar sweep {path} --resume --out {out}`"
    )
    assert last == "fastcifar: interrupted"
    assert (trial / "last.pt").exists()
    states = [
        t.state.name
        for t in optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'study.db'}").trials
    ]
    assert states == ["FAIL"]  # and --resume trains that grid point again


def test_a_killed_sweep_stops_its_workers(tmp_path, data):
    """SIGKILL gives the sweep command no chance to stop its workers: the kernel tells them."""
    from fastcifar.train.rundir import is_training

    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]\nsubset = 250', name="t")
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 2000"))
    out, trial = tmp_path / "out", tmp_path / "out" / "trials" / "0000"
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar", "sweep", str(path), "--out", str(out),
                             "--data", data, "--no-track"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (trial / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.kill()
        proc.wait()

        def states():
            study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'study.db'}")
            return [t.state.name for t in study.trials]

        # the worker lets go of the run's lock first, then tells the study the trial failed
        deadline = time.monotonic() + 300
        while (is_training(trial) or states() == ["RUNNING"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_training(trial)  # it used to train on, orphaned, for all its epochs
        assert (trial / "last.pt").exists()
        assert states() == ["FAIL"]  # and --resume trains that grid point again
    finally:
        if shutil.which("pkill"):  # a worker left over by a failure
            subprocess.run(["pkill", "-f", "--", f"--out {out}"])


def test_killed_worker_trial_is_failed_and_run_again(tmp_path, data):
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]\nsubset = 250', name="k")
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 40"))
    out = tmp_path / "out"
    url = f"sqlite:///{(out / 'study.db')}"
    out.mkdir()
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(study_name="k", storage=storage, direction="maximize")
    worker = subprocess.Popen([sys.executable, "-m", "fastcifar", "sweep", str(path), "--worker-of", url,
                               "--out", str(out), "--data", data, "--no-track", "--heartbeat", "1"])  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline:
        trials = optuna.load_study(study_name="k", storage=url).trials
        if (
            trials
            and trials[0].state.name == "RUNNING"
            and (out / "trials" / "0000" / "metrics.jsonl").exists()
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the worker never got a trial running")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    rows = run_sweep(read_sweep(path), storage=url, workers=1, resume=True, out=out, data=data, track=False,
                     heartbeat=1, log=lambda _: None)  # fmt: skip
    study = optuna.load_study(study_name="k", storage=url)
    states = sorted(t.state.name for t in study.trials)
    assert states.count("FAIL") == 1
    assert states.count("COMPLETE") == 2  # each grid point done once: the killed one again
    assert sorted(r["lr"] for r in rows) == [0.01, 0.05]
    assert json.loads((out / "trials" / "0000" / "config.json").read_text())["epochs"] == 40
    lines = []  # resumed again: the failed trial and its retry count as one point done
    run_sweep(read_sweep(path), storage=url, workers=1, resume=True, out=out, data=data, track=False,
              heartbeat=1, log=lines.append)  # fmt: skip
    assert "2 trials planned, 2 done before" in lines[0]
    assert len(optuna.load_study(study_name="k", storage=url).trials) == 3


def test_a_worker_writes_the_table_after_every_trial(tmp_path, data, capsys, monkeypatch):
    spec, out, url = worker_study(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]', "w")
    tables = []
    real_write = sweep.write_results

    def spy(rows, spec, folder):
        tables.append(len(rows))
        real_write(rows, spec, folder)

    monkeypatch.setattr(sweep, "write_results", spy)
    sweep.run_worker(spec, url, out, data, track=False, worker=0, heartbeat=2)
    assert tables == [1, 2]
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert len(logged) == 2 and all("complete: lenet, lr 0.0" in line for line in logged)
    # the optimiser the recipe chose, though the sweep file leaves it out; seconds, not 0.0 min
    duration = re.compile(r", sgd m=0\.9: .*, (\d+ s|[1-9][\d.]* min)$")
    assert all(duration.search(line) for line in logged), logged
    assert (out / "results.md").read_text().count("| lenet |") == 2


def test_a_trials_memory_is_freed_before_the_next_trial(tmp_path, data, monkeypatch):
    """An out-of-memory trial's model and batches live on in its exception's frames, and a
    finished trial's can live on in a reference cycle; the next trial on that worker must
    not start while they still hold memory."""
    import gc
    import weakref

    import torch

    from fastcifar.train import engine

    class Tensors:  # stands for a trial's model, optimiser state and batches
        pass

    held, alive_at_next_trial = [], []

    def fit(cfg, *args, **kwargs):
        alive_at_next_trial.extend(ref() is not None for ref in held[-1:])
        tensors = Tensors()
        held.append(weakref.ref(tensors))
        if len(held) == 2:  # the second trial runs out of memory; they stay in its frame
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ..."
            )
        tensors.cycle = tensors  # the others finish, their tensors held in a cycle
        return {"best": {"val_acc": 0.5, "test_acc": 0.5, "epoch": 1}, "seconds": {"total": 1.0}}

    monkeypatch.setattr(engine, "fit", fit)
    spec, out, url = worker_study(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05, 0.1]', "m")
    gc.disable()  # only an explicit collection frees the cycle, as between two quick trials
    try:
        sweep.run_worker(spec, url, out, data, track=False, worker=0, heartbeat=2)
    finally:
        gc.enable()
    trials = optuna.load_study(study_name="m", storage=url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert alive_at_next_trial == [False, False]
    assert trials[1].user_attrs["error"] == (
        "CUDA out of memory. Tried to allocate 2.00 GiB: a smaller --batch-size needs less memory"
    )


def test_a_bug_in_a_trial_stops_its_worker_loudly(tmp_path, data, monkeypatch):
    from fastcifar.train import engine

    def fit(cfg, *args, **kwargs):
        raise RuntimeError("index out of range in the loader")  # not the point's settings

    monkeypatch.setattr(engine, "fit", fit)
    spec, out, url = worker_study(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]', "b")
    with pytest.raises(RuntimeError, match="index out of range"):
        sweep.run_worker(spec, url, out, data, track=False, worker=0, heartbeat=2)
    assert len(optuna.load_study(study_name="b", storage=url).trials) == 1  # no second trial


def test_the_table_keeps_the_columns_the_sweep_began_with(tmp_path, capsys, monkeypatch):
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]', name="e")
    columns = result_columns(read_sweep(path))

    def sweep_while_the_file_is_edited(spec, **options):
        spec.path.write_text("[search]\nlr = [0.1]\nseed = [0, 1]\n")  # the next sweep, drafted
        return [{column: f"v-{column}" for column in columns}]

    monkeypatch.setattr(sweep, "run_sweep", sweep_while_the_file_is_edited)
    assert main(["sweep", str(path), "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "v-accuracy" in out and "seed" not in out


def test_no_pruning_unless_asked(tmp_path, data):
    """Five finished trials far better at epoch 1 would make Optuna's default pruner stop
    the next one there; with `prune = false` it runs to the end."""
    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01]\nepochs = 2', "[sampler]\nprune = false",
                      name="p")  # fmt: skip
    path.write_text(path.read_text().replace("epochs = 1\n", ""))
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name="p", storage=url, direction="maximize")
    seeds = optuna.distributions.CategoricalDistribution([1, 2, 3, 4, 5])
    for seed in seeds.choices:  # other points, another axis: never taken for this one
        study.add_trial(optuna.trial.create_trial(
            params={"seed": seed}, distributions={"seed": seeds}, value=0.99,
            intermediate_values={1: 0.99, 2: 0.99}))  # fmt: skip
    sweep.run_worker(read_sweep(path), url, out, data, track=False, worker=0, heartbeat=2)
    ours = optuna.load_study(study_name="p", storage=url).trials[5:]
    assert [t.state.name for t in ours] == ["COMPLETE"]
    assert len(ours[0].intermediate_values) == 2


def test_cpu_workers_split_the_cores(monkeypatch):
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    exit_with_threads = [
        sys.executable,
        "-c",
        "import os; raise SystemExit(int(os.environ['OMP_NUM_THREADS']))",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert sweep._run_workers(exit_with_threads, env, 2) == [2, 2]
    assert sweep._run_workers(exit_with_threads, env, 8) == [1] * 8
    assert sweep._run_workers(exit_with_threads, {**env, "OMP_NUM_THREADS": "3"}, 2) == [3, 3]


def test_a_seed_axis_gets_a_column_and_compare_pools_its_repeats(tmp_path, data, capfd):
    from fastcifar.compare import compare_settings

    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01, 0.05]\nseed = [0, 1]')
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--data", data, "--no-track"]) == 0
    header = (out / "results.md").read_text().splitlines()[0]
    assert header.startswith("| trial | model | duration | lr | optimizer | seed | accuracy |")
    printed = capfd.readouterr().out
    points = sorted(
        line.split(":")[1].strip() for line in printed.splitlines() if line.startswith("trial ")
    )
    assert points == [  # each trial's log line names its point, the seed too
        f"lenet, lr {lr}, sgd m=0.9, seed {seed}" for lr in (0.01, 0.05) for seed in (0, 1)
    ]
    assert f"`fastcifar compare {out} --pool-seeds` pools each point's seeds" in printed
    rows = [line for line in printed.splitlines() if line.startswith("│")]
    assert len(rows) == 4 and all("sgd m=0.9" in row for row in rows)  # not wrapped in a log
    table = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["lr"], r["seed"]) for r in table) == [
        ("0.01", "0"), ("0.01", "1"), ("0.05", "0"), ("0.05", "1"),
    ]  # fmt: skip
    rows = compare_settings([out], tmp_path / "c.png", log=lambda _: None)
    assert sorted((r["settings"], r["runs"], r["seeds"]) for r in rows) == [
        ("lenet, lr=0.01", 2, "0 1"),
        ("lenet, lr=0.05", 2, "0 1"),
    ]
    worse = min(rows, key=lambda r: r["test_acc_mean"])
    assert worse["vs_best"] <= 0 and (worse["p_vs_best"] is None or 0 <= worse["p_vs_best"] <= 1)


def test_a_point_that_fails_on_its_own_settings_is_a_failed_row_not_a_traceback(
    tmp_path, data, capfd
):
    path = tmp_path / "s.toml"  # 250 training images: a batch of 5000 cannot be drawn
    path.write_text('[search]\narch = "lenet"\nbatch_size = [50, 5000]\nepochs = 1\nval = 50\n'
                    'amp = "none"\nthreads = 1\n')  # fmt: skip
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--out", str(out), "--data", data, "--no-track", "--workers", "1"]
    assert main(argv) == 1
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    failure = (
        "failed: lenet, lr 0.05, sgd m=0.9, batch_size 5000: "
        "--batch-size 5000 is larger than the 250 training images"
    )
    lines = [line for line in printed.out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 2 and sum(line.endswith(failure) for line in lines) == 1
    assert printed.err.startswith("fastcifar: error: trial ")
    assert printed.err.strip().endswith(failure) and len(printed.err.strip().splitlines()) == 1
    table = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["batch_size"], r["state"], r["error"]) for r in table) == [
        ("50", "complete", ""),
        ("5000", "failed", "--batch-size 5000 is larger than the 250 training images"),
    ]  # fmt: skip
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2  # the failed point is not retried by the sweep that saw it fail
    assert main([*argv, "--resume"]) == 1  # a resume trains it once more
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.params["batch_size"] for t in study.trials[2:]] == [5000]


def stopped_mid_write(tmp_path, data, monkeypatch, method: str, when, epochs: int = 1):
    """The trial of a one-point sweep whose worker gets SIGTERM in the middle of the study
    write `method` (an RDBStorage method) when `when(its arguments by name)`."""
    from optuna.storages import RDBStorage

    from fastcifar.interrupts import stop_signals_as_interrupt

    path = sweep_file(tmp_path, 'arch = "lenet"\nlr = [0.01]\nsubset = 250', name="w")
    path.write_text(path.read_text().replace("epochs = 1", f"epochs = {epochs}"))
    write = getattr(RDBStorage, method)

    def interrupted_write(*args, **kwargs):
        if when(inspect.signature(write).bind(*args, **kwargs).arguments):
            os.kill(os.getpid(), signal.SIGTERM)  # a stop while the write is under way
        write(*args, **kwargs)

    monkeypatch.setattr(RDBStorage, method, interrupted_write)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="w", storage=url, direction="maximize")
    with pytest.raises(KeyboardInterrupt), stop_signals_as_interrupt():
        sweep.run_worker(read_sweep(path), url, tmp_path / "out", data, False, 0, 10)
    (trial,) = optuna.load_study(study_name="w", storage=url).trials
    return trial


def test_a_stop_waits_for_the_write_to_the_study(tmp_path, data, monkeypatch):
    """SIGTERM arriving while a worker reports an epoch to the study takes effect after the
    write: raised inside Optuna's SQL, it once left the trial RUNNING for good."""
    trial = stopped_mid_write(tmp_path, data, monkeypatch, "set_trial_intermediate_value",
                              lambda call: call["step"] == 2, epochs=4)  # fmt: skip
    assert sorted(trial.intermediate_values) == [1, 2]  # epoch 2's report was written whole
    assert trial.state.name == "FAIL"


def test_a_stop_between_trials_waits_for_the_study_and_trains_nothing(tmp_path, data, monkeypatch):
    """SIGTERM while the worker writes a trial's settings to the study, before training:
    the write ends, the stop takes effect as training would begin, and the trial fails."""
    trial = stopped_mid_write(tmp_path, data, monkeypatch, "set_trial_user_attr",
                              lambda call: call["key"] == "run_dir")  # fmt: skip
    assert "run_dir" in trial.user_attrs and "trained" in trial.user_attrs  # writes ended
    assert not (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").exists()  # no epoch ran
    assert trial.state.name == "FAIL"
