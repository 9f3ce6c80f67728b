"""Precision and threads per device: bf16 only where the hardware computes in bf16."""

import os

import pytest
import torch

from fastcifar.cli import build_parser, main, resolve_train_config
from fastcifar.recipes import recipe
from fastcifar.train.device import check_amp, check_threads, fastest_amp, native_bf16

from .conftest import make_arrays, write_batches_dir

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "avx2-cpu"])
def cpu_bf16(request, monkeypatch):
    """Pretend the CPU has (or lacks) bf16 instructions, at torch's own probes."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: request.param, raising=False)
    return request.param


def test_the_probes_decide_native_bf16(cpu_bf16):
    assert native_bf16(CPU) is cpu_bf16
    assert fastest_amp(CPU) == ("bf16" if cpu_bf16 else "none")


def test_the_cpu_recipe_trains_in_bf16_only_with_bf16_instructions(cpu_bf16):
    values = recipe("cerberus", "cpu")
    assert values["amp"] == ("bf16" if cpu_bf16 else "none")
    assert values["channels_last"] and values["epochs"] == 24  # the rest of the recipe stays


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512-bf16"])
def test_only_a_cpu_with_amx_compiles_conv4_leaky_by_default(amx, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert recipe("conv4_leaky", "cpu")["compile"] is amx
    assert recipe("conv4_leaky", "cpu")["amp"] == "bf16"
    assert not recipe("cerberus", "cpu")["compile"]  # below the rule's 1.10x there
    assert not recipe("conv4_relu", "cpu")["compile"]


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512-bf16"])
def test_only_a_cpu_with_amx_takes_the_fused_optimiser_step_by_default(amx, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    for arch in ("lenet", "conv4_leaky", "cerberus"):
        assert recipe(arch, "cpu").get("fused_optimizer", False) is amx
    assert "fused_optimizer" not in recipe("cerberus", "cuda")  # the CUDA rule has not run


def test_forcing_bf16_without_instructions_warns_but_is_allowed(cpu_bf16):
    warning = check_amp("bf16", CPU)
    assert (warning is None) is cpu_bf16
    if warning:
        assert "emulated" in warning and "--no-amp" in warning
    assert check_amp("none", CPU) is None


def test_more_threads_than_cores_is_a_warning():
    cores = len(os.sched_getaffinity(0))
    assert check_threads(0) is None and check_threads(cores) is None  # 0: torch's default
    assert f"more than the {cores} CPU cores" in check_threads(cores + 1)


def test_bare_amp_picks_the_fastest_precision_and_says_why(cpu_bf16, capsys):
    args = build_parser().parse_args(["train", "--arch", "lenet", "--device", "cpu", "--amp"])
    cfg, _ = resolve_train_config(args)
    assert cfg.amp == ("bf16" if cpu_bf16 else "none")
    err = capsys.readouterr().err
    assert ("trains in fp32" in err) is not cpu_bf16
    args = build_parser().parse_args(
        ["train", "--arch", "lenet", "--device", "cpu", "--amp", "bf16"]
    )
    assert resolve_train_config(args)[0].amp == "bf16"  # an explicit dtype is kept


def test_a_forced_bf16_run_prints_the_warning_once(cpu_bf16, capsys, tmp_path):
    data = str(write_batches_dir(tmp_path / "data", make_arrays(n_train=100, n_test=20)))
    code = main(["train", "--arch", "lenet", "--data", data, "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--batch-size", "50", "--val", "50", "--no-track", "--quiet",
                 "--device", "cpu", "--amp", "bf16"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("bf16 autocast is emulated") == (0 if cpu_bf16 else 1)


def test_the_matmul_peak_is_in_tflops_whatever_the_precision():
    """The peak grows its product only while a product is quick, so an emulated bf16
    peak stays affordable; its rate must agree with a product timed here."""
    import time

    from fastcifar.bench import matmul_peak_tflops

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    seconds = []
    for _ in range(5):  # the quickest of five: one product can lose its core to another task
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    direct = 2 * 512**3 / min(seconds) / 1e12
    assert 0.1 < matmul_peak_tflops(CPU, torch.float32, budget_s=0.2) / direct < 10


def test_the_cpu_is_named_with_its_instruction_set(cpu_bf16):
    from fastcifar.train.device import device_name

    want = "AMX" if cpu_bf16 else torch.backends.cpu.get_cpu_capability()
    assert device_name(CPU).endswith(f" cores, {want}")


def test_a_bf16_checkpoint_is_evaluated_in_the_fastest_precision(cpu_bf16, tmp_path):
    from fastcifar.config import TrainConfig
    from fastcifar.inference import load_trained
    from fastcifar.train.build import build_model
    from fastcifar.train.checkpoint import save_checkpoint

    cfg = TrainConfig(arch="lenet", amp="bf16", device="cpu")
    model = build_model(cfg, CPU)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "best.pt")
    _, loaded = load_trained(tmp_path / "best.pt", "cpu")
    assert loaded.amp == ("bf16" if cpu_bf16 else "none")
