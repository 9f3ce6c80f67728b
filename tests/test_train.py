"""Training runs: learning on real data, resume equivalence, determinism, divergence."""

import json
from pathlib import Path

import pytest
import torch

import fastcifar
from fastcifar.config import TrainConfig
from fastcifar.display import TrainingDisplay
from fastcifar.errors import UserError
from fastcifar.models import create_model
from fastcifar.models.pooling import native_pooling_available
from fastcifar.models.relu_bn import use_relu_bn, use_relu_bn_pool
from fastcifar.models.winograd import use_winograd
from fastcifar.train import engine
from fastcifar.train.build import native_layers
from fastcifar.train.device import fastest_amp
from fastcifar.train.engine import TrainingDiverged, fit

from .conftest import make_arrays, write_batches_dir


@pytest.fixture
def small_data(tmp_path):
    return str(write_batches_dir(tmp_path / "data", make_arrays(n_train=400, n_test=100)))


def small_config(data, out, **changes) -> TrainConfig:
    base = dict(
        arch="lenet", data=data, out=str(out), epochs=3, batch_size=50, eval_batch_size=64,
        val=50, lr=0.05, amp="none", threads=1, track=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class CrashAfter(TrainingDisplay):
    """A display that raises KeyboardInterrupt once epoch `n` is finished and saved."""

    def __init__(self, n):
        super().__init__(quiet=True)
        self.n = n

    def end_epoch(self, row, improved):
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def comparable(rows):
    timing = ("images_per_sec", "seconds", "wall_seconds")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, small_data, schedule):
    straight = fit(
        small_config(small_data, tmp_path / "a", schedule=schedule), TrainingDisplay(quiet=True)
    )
    cfg = small_config(small_data, tmp_path / "b", schedule=schedule)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, CrashAfter(2))
    assert len(read_metrics(tmp_path / "b")) == 2
    resumed = fit(cfg, TrainingDisplay(quiet=True), resume=tmp_path / "b")
    assert comparable(read_metrics(tmp_path / "a")) == comparable(read_metrics(tmp_path / "b"))
    # the summary's times cover both invocations, and env.json both machines
    epoch_seconds = sum(row["seconds"] for row in read_metrics(tmp_path / "b"))
    spent = resumed["seconds"]
    assert spent["train"] + spent["warmup"] == pytest.approx(epoch_seconds)
    assert spent["total"] > epoch_seconds + spent["eval"]
    walls = [row["wall_seconds"] for row in read_metrics(tmp_path / "b")]
    assert walls == sorted(walls) and walls[-1] < spent["total"]  # adds up over both invocations
    env = json.loads((tmp_path / "b" / "env.json").read_text())
    assert len(env["resumed"]) == 1 and env["resumed"][0]["started"] >= env["started"]
    assert env["fastcifar"] == fastcifar.__version__
    for (name, a), b in zip(
        straight["model"].state_dict().items(), resumed["model"].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_progress_syncs_only_for_a_live_bar(tmp_path, small_data):
    import io

    from rich.console import Console

    class Counting(TrainingDisplay):
        def __init__(self, console):
            super().__init__(console)
            self.updates = 0

        def advance(self, *args):
            self.updates += 1
            super().advance(*args)

    log, terminal = (
        Counting(Console(file=io.StringIO())),
        Counting(Console(file=io.StringIO(), force_terminal=True)),
    )
    fit(small_config(small_data, tmp_path / "log", epochs=1), log)
    fit(small_config(small_data, tmp_path / "tty", epochs=1), terminal)
    assert log.updates == 0 and terminal.updates == 7  # 7 steps, each one a log boundary


def test_warm_up_is_the_first_step_of_a_run_only(tmp_path, small_data, monkeypatch):
    epochs, real = [], engine.train_epoch
    monkeypatch.setattr(
        engine, "train_epoch", lambda *a, **k: epochs.append(real(*a, **k)) or epochs[-1]
    )
    spent = fit(small_config(small_data, tmp_path / "run"), TrainingDisplay(quiet=True))["seconds"]
    assert len(epochs) == 3
    assert spent["warmup"] == epochs[0].first_step_seconds
    assert spent["train"] == pytest.approx(sum(e.seconds for e in epochs) - spent["warmup"])


def test_resume_refuses_other_data(tmp_path, small_data):
    cfg = small_config(small_data, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, CrashAfter(1))
    other = str(write_batches_dir(tmp_path / "other", make_arrays(n_train=500, n_test=100)))
    with pytest.raises(UserError, match="trained on 350 images an epoch; this data gives 450"):
        fit(cfg.replace(data=other), TrainingDisplay(quiet=True), resume=tmp_path / "run")


def test_resume_finished_or_extended_runs(tmp_path, small_data):
    from fastcifar.errors import NothingToResume

    step = small_config(small_data, tmp_path / "step", epochs=1, schedule="step")
    fit(step, TrainingDisplay(quiet=True))
    kept = {f.name: f.read_bytes() for f in (tmp_path / "step").iterdir()}
    with pytest.raises(NothingToResume, match="already run 1 of 1 epochs"):
        fit(step, TrainingDisplay(quiet=True), resume=tmp_path / "step")
    assert {f.name: f.read_bytes() for f in (tmp_path / "step").iterdir()} == kept

    longer = fit(step.replace(epochs=2), TrainingDisplay(quiet=True), resume=tmp_path / "step")
    assert longer["epochs_run"] == 2 and len(read_metrics(tmp_path / "step")) == 2
    assert json.loads((tmp_path / "step" / "config.json").read_text())["epochs"] == 2

    cycle = small_config(small_data, tmp_path / "cycle", epochs=1, schedule="onecycle")
    fit(cycle, TrainingDisplay(quiet=True))
    with pytest.raises(UserError, match="onecycle schedule .* is laid out over 1 epochs"):
        fit(cycle.replace(epochs=2), TrainingDisplay(quiet=True), resume=tmp_path / "cycle")

    patient = small_config(
        small_data, tmp_path / "patient", lr=1e-9, schedule="constant", patience=1, epochs=5
    )  # learns nothing, so epoch 2 does not improve
    stopped = fit(patient, TrainingDisplay(quiet=True))
    assert stopped["stopped"] and stopped["epochs_run"] == 2
    with pytest.raises(NothingToResume, match="stopped early after epoch 2"):
        fit(patient, TrainingDisplay(quiet=True), resume=tmp_path / "patient")


def test_a_log_opens_with_one_line_saying_what_trains(tmp_path, small_data):
    import io

    from rich.console import Console

    log = io.StringIO()
    fit(
        small_config(small_data, tmp_path / "run", epochs=1),
        TrainingDisplay(Console(file=log, width=60)),
    )
    lines = log.getvalue().splitlines()  # the data cache's line may come first
    first = next(line for line in lines if not line.startswith("decoding "))
    assert first.startswith("lenet (62,006 params) on ")
    pools = native_pooling_available()  # lenet's two 2x2 max pools, on a CPU with AVX-512
    layers = ", native layers (2 native max pool)" if pools else ""
    assert f": fp32, channels-last, eager{layers}; 1 epoch x 7 steps of 50, sgd onecycle" in first
    assert first.endswith(f"run directory {tmp_path / 'run'}")
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["native_layers"] == ({"native max pool": 2} if pools else {})


def test_native_layers_counts_each_swapped_in_layer_once():
    model = create_model("cerberus")
    assert native_layers(model) == {}
    assert use_relu_bn(model) == 12 and use_relu_bn_pool(model) == 3 and use_winograd(model) == 11
    counts = native_layers(model)  # a folded pool is part of its layer, not a layer of its own
    assert counts == {"ReLU-BatchNorm": 9, "ReLU-BatchNorm-max pool": 3, "Winograd conv": 11}
    cfg = TrainConfig(arch="cerberus", amp="bf16")
    header = engine.run_header(cfg, model, "a CPU", 7, Path("run"))
    assert ("bf16 autocast, channels-last, eager, native layers (9 ReLU-BatchNorm, "
            "11 Winograd conv, 3 ReLU-BatchNorm-max pool); 20 epochs") in header  # fmt: skip


def test_the_log_line_says_when_the_optimiser_step_is_fused(tmp_path):
    model = torch.nn.Linear(2, 2)
    fused = small_config("data", tmp_path, fused_optimizer=True)
    header = engine.run_header(fused, model, "a CPU", 7, tmp_path)
    assert "; 3 epochs x 7 steps of 50, fused sgd onecycle lr 0.05;" in header
    plain = engine.run_header(fused.replace(fused_optimizer=False), model, "a CPU", 7, tmp_path)
    assert ", sgd onecycle lr 0.05;" in plain and "fused" not in plain


def test_same_seed_same_result_other_seed_differs(tmp_path, small_data):
    runs = [fit(small_config(small_data, tmp_path / str(i), seed=s, epochs=1), TrainingDisplay(quiet=True))
            for i, s in enumerate([7, 7, 8])]  # fmt: skip
    metrics = [comparable(read_metrics(tmp_path / str(i))) for i in range(3)]
    assert metrics[0] == metrics[1]
    assert metrics[0] != metrics[2]
    assert runs[0]["best"] == runs[1]["best"]


def test_run_directory_contents(tmp_path, small_data):
    summary = fit(
        small_config(small_data, tmp_path / "run", epochs=2, patience=1),
        TrainingDisplay(quiet=True),
    )
    run = tmp_path / "run"
    for name in ("config.json", "env.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    required = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                "lr", "images_per_sec", "seconds", "wall_seconds"}  # fmt: skip
    assert all(required <= set(r) for r in rows)
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in rows)
    assert json.loads((run / "config.json").read_text())["arch"] == "lenet"
    assert set(summary["seconds"]) == {"data", "warmup", "train", "eval", "total"}
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["epoch"] == summary["best"]["epoch"]


def test_early_stopping_restores_best(tmp_path, small_data, monkeypatch):
    # A constant, far too high LR makes validation accuracy stall; patience 1 stops the run.
    summary = fit(small_config(small_data, tmp_path / "r", epochs=8, patience=1, lr=3.0, schedule="constant"),
                  TrainingDisplay(quiet=True))  # fmt: skip
    rows = read_metrics(tmp_path / "r")
    assert summary["stopped"] and len(rows) < 8
    best = max(rows, key=lambda r: r["val_acc"])
    assert summary["best"]["epoch"] == rows.index(best) + 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_data, monkeypatch):
    real = engine.train_epoch
    calls = []

    def diverging(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            stats.loss = float("nan")
        return stats

    monkeypatch.setattr(engine, "train_epoch", diverging)
    with pytest.raises(TrainingDiverged, match="kept last.pt \\(epoch 1\\)"):
        fit(small_config(small_data, tmp_path / "n"), TrainingDisplay(quiet=True))
    assert torch.load(tmp_path / "n" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(read_metrics(tmp_path / "n")) == 1


def test_batch_larger_than_dataset(tmp_path, small_data):
    with pytest.raises(UserError, match="larger than"):
        fit(small_config(small_data, tmp_path / "x", batch_size=5000), TrainingDisplay(quiet=True))


def test_lenet_learns_on_real_cifar(tmp_path, real_data):
    cfg = small_config(str(real_data), tmp_path / "real", subset=6000, val=1000, epochs=5,
                       batch_size=128, eval_batch_size=1000, lr=0.05, label_smoothing=0.1,
                       amp=fastest_amp(torch.device("cpu")), threads=0)  # fmt: skip
    summary = fit(cfg, TrainingDisplay(quiet=True))
    assert summary["best"]["test_acc"] > 0.3  # chance is 0.10


def test_a_missing_extension_is_reported_once(monkeypatch, capsys):
    from fastcifar.ops import native
    from fastcifar.train import build

    monkeypatch.setattr(native, "load", lambda: (False, "fastcifar._C did not load (test)"))
    monkeypatch.setattr(build, "_said", set())
    cpu = torch.device("cpu")
    assert [build.use_native("auto", cpu) for _ in range(2)] == [False, False]
    assert build.use_native("off", cpu) is False
    err = capsys.readouterr().err
    assert err.count("fastcifar._C did not load (test)") == 1 and "torch ops instead" in err


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_every_schedule_runs_through_a_run_of_a_few_steps(schedule):
    from fastcifar.train.optim import Schedule

    for steps in range(1, 9):  # a small --subset gives a handful of steps (onecycle: 4 failed)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        plan = Schedule(optimizer, TrainConfig(schedule=schedule, epochs=1, lr=0.1), steps)
        for _ in range(steps):
            optimizer.step()
            plan.step()
        assert 0 <= optimizer.param_groups[0]["lr"] <= 0.1


def test_compiled_models_keep_static_shapes_across_batch_sizes(monkeypatch):
    """Compiled models in one process at different batch sizes (a side-by-side benchmark,
    a sweep's trials) each get graphs of their own concrete shapes: without
    `dynamic=False`, torch.compile's automatic dynamic shapes, keyed on code that every
    compiled module shares, gives the second one a symbolic batch dimension. And every
    one is compiled: past torch's limit of 8 graphs for that code, the rest ran eager."""
    from fastcifar.models import create_model
    from fastcifar.train.build import compiled

    graphs = []  # each graph's input shapes as traced: ints, or SymInts where dynamic

    def recording_backend(gm, example_inputs):
        shapes = []
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            shapes.append(tuple(value.shape) if isinstance(value, torch.Tensor) else (value,))
        graphs.append(shapes)
        return gm.forward

    real_compile = torch.compile

    def compile_on_recording_backend(model, *, mode=None, **kwargs):
        return real_compile(model, backend=recording_backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_on_recording_backend)
    torch._dynamo.reset()
    cfg = TrainConfig(arch="lenet", compile=True)
    batches = [8, 16, 4, 12, 20, 24, 28, 32, 36, 40]
    # torch's default limit, restored afterwards (monkeypatch.setattr on dynamo's config
    # deletes the setting when it undoes, which breaks every later compile)
    with torch._dynamo.config.patch(recompile_limit=8):
        for batch in batches:
            compiled(create_model("lenet"), cfg)(torch.randn(batch, 3, 32, 32))
    torch._dynamo.reset()
    images = [s[0] for shapes in graphs for s in shapes if len(s) == 4 and s[1:] == (3, 32, 32)]
    assert images == batches  # one graph each, none left to run eager
    assert all(isinstance(d, int) for shapes in graphs for s in shapes for d in s), graphs


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_fused_optimizer_steps_as_torchs_default(optimizer):
    """`fused_optimizer` is torch's fused implementation (one kernel a group), and moves
    the weights as torch's default does, to float rounding."""
    from fastcifar.train.optim import build_optimizer

    torch.manual_seed(0)
    models = {fused: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
              for fused in (True, False)}  # fmt: skip
    models[False].load_state_dict(models[True].state_dict())
    cfg = TrainConfig(optimizer=optimizer, lr=0.05)
    steps = {fused: build_optimizer(m, cfg.replace(fused_optimizer=fused))
             for fused, m in models.items()}  # fmt: skip
    assert steps[True].defaults["fused"] is True and not steps[False].defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in models[True].parameters()]
        for fused, model in models.items():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            steps[fused].step()
    for a, b in zip(models[True].parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_tutorial_baseline_keeps_torchs_default_optimizer(monkeypatch):
    """The peer baseline is what a tutorial runs, and each ablation is the baseline with one
    switch: neither takes the fused step from a recipe that turns it on, and it is an
    ablation of its own."""
    from fastcifar import bench
    from fastcifar.ablations import ABLATIONS

    real = bench.recipe
    monkeypatch.setattr(bench, "recipe", lambda *a: {**real(*a), "fused_optimizer": True})
    cpu = torch.device("cpu")
    assert bench.variant_config("lenet", "default", cpu, None).fused_optimizer
    assert not bench.variant_config("lenet", "baseline", cpu, None).fused_optimizer
    assert not bench.variant_config("lenet", "amp", cpu, None).fused_optimizer
    assert bench.variant_config("lenet", "fused_optimizer", cpu, None).fused_optimizer
    assert ABLATIONS["fused_optimizer"] == {"fused_optimizer": True}


@pytest.mark.parametrize("change", [{"amp": "none"}, {"channels_last": False}, {"amx": True}])
def test_winograd_auto_stays_off_where_it_cannot_run(change, monkeypatch):
    """`--winograd auto` is the default: outside bf16 channels-last training on an
    AVX512-BF16 CPU without AMX, or fp32 on an AVX2 one, it keeps the direct
    convolutions, and says nothing (fp32 here as on a CPU with AVX-512)."""
    from fastcifar.models.winograd import WinogradConv2d
    from fastcifar.train import device
    from fastcifar.train.build import build_model

    if change.pop("amx", False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    if change.get("amp") == "none":
        monkeypatch.setattr(device, "cpu_instructions", lambda: "AVX512")
    cfg = TrainConfig(**{"arch": "cerberus", "amp": "bf16", "channels_last": True} | change)
    model = build_model(cfg, torch.device("cpu"))
    assert not any(isinstance(m, WinogradConv2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
