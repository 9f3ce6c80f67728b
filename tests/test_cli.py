"""The command line: every user mistake is one line on stderr and exit status 2."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fastcifar
from fastcifar.cli import main
from fastcifar.inference import predict_images

from .conftest import make_arrays, write_batches_dir


@pytest.fixture
def data(tmp_path):
    return str(write_batches_dir(tmp_path / "data", make_arrays(n_train=200, n_test=50)))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def quick(data, out, *extra):
    return ["train", "--arch", "lenet", "--data", data, "--out", str(out), "--epochs", "1",
            "--batch-size", "50", "--val", "50", "--no-track", "--quiet", *extra]  # fmt: skip


def assert_one_line_error(code, err, fragment):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcifar: error:"), err
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--batch-size", "100000"], "larger than"),
        (["--arch", "resnet"], "unknown arch 'resnet'; did you mean 'lenet'?"),
        (["--arch", "vgg"], "unknown arch 'vgg'; choose one of: cerberus, conv3"),
        (["--optimizer", "lion"], "--optimizer must be one of"),
        (["--val", "999999"], "--val must be"),
        (["--subset", "999999"], "--subset 999999 is more than the "),
        (["--compile-mode", "fastest"], "--compile-mode must be one of"),
        (["--prefetch", "maybe"], "--prefetch must be one of"),
        (["--winograd-weight-grad", "maybe"], "--winograd-weight-grad must be one of auto, on,"),
        (["--dali-decode"], "--dali-decode needs --loader dali"),
        (["--dali-images-per-run", "-1"], "--dali-images-per-run must be >= 0, not -1"),
        (["--dali-images-per-run", "4096"], "--dali-images-per-run needs --loader dali"),
        (["--device", "tpu"], "--device must be one of auto, cpu, cuda, not 'tpu'"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1), not 1.5"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, not -0.1"),
        (["--cutout", "-1"], "--cutout must be in 0..32, not -1"),
        (["--seed", "-1"], "--seed must be in 0..4294967295, not -1"),
        (["--seed", str(2**80)], f"--seed must be in 0..4294967295, not {2**80}"),
        (["--split-seed", "-1"], "--split-seed must be in 0..4294967295, not -1"),
        (["--threads", "100000"], "--threads must be in 0..1024, not 100000"),
        (["--gamma", "0"], "--gamma must be positive, not 0.0"),
        (["--lr", "inf"], "--lr must be a finite number, not inf"),
        (["--crop-pad", "1000"], "--crop-pad must be in 0..32, not 1000"),
        (["--cutout", "64"], "--cutout must be in 0..32, not 64"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan"),
        (["--gamma", "inf"], "--gamma must be a finite number, not inf"),
        (["--activation", "swish"], "--activation must be one of relu, leaky_relu, gelu, not"),
    ],
)
def test_bad_training_arguments(capsys, tmp_path, data, extra, fragment):
    code, _, err = run(capsys, *quick(data, tmp_path / "run"), *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty run folder


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--epochs"], "train: argument --epochs: expected one argument"),
        (["train", "--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["train", "--lr", "fast"], "argument --lr"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "no command given; choose one of: train, eval,"),
        (["bench"], "bench: no measurement given; choose one of: throughput, accuracy"),
        (["trian"], "unknown command 'trian'; did you mean 'train'?"),
        (["bench", "acuracy"], "unknown measurement 'acuracy'; did you mean 'accuracy'?"),
        (
            ["train", "--ach", "lenet"],
            "train: unrecognized arguments: --ach lenet; did you mean --arch?",
        ),
        (
            ["bench", "throughput", "--stpes", "3"],
            "bench throughput: unrecognized arguments: --stpes 3; did you mean --steps?",
        ),
        (["eval", "run", "--frobnicate"], "eval: unrecognized arguments: --frobnicate (see"),
        (["bench", "throughput", "--steps", "0"], "--steps: must be a positive integer, got '0'"),
        (["bench", "throughput", "--windows", "two"], "--windows: must be a positive integer"),
        (["bench", "throughput", "--set", "speed=11"], "--set: unknown config key 'speed'"),
        (["bench", "throughput", "--set", "lr"], "--set: expected KEY=VALUE, got 'lr'"),
        (
            ["bench", "throughput", "--set", "channels_last=maybe"],
            "--set: channels_last must be true or false, not 'maybe'",
        ),
        (["bench", "throughput", "--set", "epochs=1.5"], "--set: epochs must be an integer"),
        (["bench", "throughput", "--against", "pytorch"], "--against: invalid choice"),
        (["bench", "accuracy", "--seeds", "-1"], "--seeds: must be a positive integer"),
        (
            ["bench", "throughput", "--json", "/no-such-folder/t.json"],
            "--json: no folder /no-such-folder to write t.json into",
        ),
        (["bench", "throughput", "--json", "/"], "--json: / is a folder, not a file"),
        (["bench", "accuracy", "--out", "/no-such-folder/a.json"], "--out: no folder"),
        (["sweep", "s.toml", "--workers", "0"], "--workers: must be a positive integer"),
        (["profile", "--arch", "lenet", "--steps", "0"], "--steps: must be a positive integer"),
        (["profile", "--arch", "lenet", "--host", "0"], "--host: must be a positive integer"),
        (["profile", "--arch", "lenet", "--set", "speed=11"], "--set: unknown config key 'speed'"),
    ],
)
def test_usage_mistakes_are_one_line_too(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert "--help" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")
@pytest.mark.parametrize(("extra", "fragment"), [(["--device", "cuda"], "CUDA is not available"),
                                                 (["--amp", "fp16"], "--amp fp16 needs CUDA")])  # fmt: skip
def test_cuda_options_without_cuda(capsys, tmp_path, data, extra, fragment):
    code, _, err = run(capsys, *quick(data, tmp_path / "run"), *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_missing_and_corrupt_data(capsys, tmp_path):
    code, _, err = run(capsys, *quick(str(tmp_path / "none.zip"), tmp_path / "r"))
    assert_one_line_error(code, err, "data not found")
    assert "--download" in err
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(200))
    code, _, err = run(capsys, *quick(str(corrupt), tmp_path / "r2"))
    assert_one_line_error(code, err, "corrupt.zip")


def cuda_out_of_memory():  # torch's message, as an H200 words it
    import torch

    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "139.80 GiB of which 1.06 GiB is free. Of the allocated memory 130.1 GiB is "
        "allocated by PyTorch. See documentation for Memory Management"
    )


def cpu_out_of_memory():  # the CPU allocator's own error, for real
    import torch

    torch.empty(10**15, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("fail", "fragment"),
    [
        (cuda_out_of_memory, "CUDA out of memory. Tried to allocate 2.00 GiB: a smaller"),
        (cpu_out_of_memory, "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                            "1000000000000000 bytes: a smaller --batch-size needs less memory"),
    ],
)  # fmt: skip
def test_out_of_memory_is_one_line(capsys, tmp_path, data, monkeypatch, fail, fragment):
    from fastcifar.train import engine

    monkeypatch.setattr(engine, "train_step", lambda *args, **kwargs: fail())
    code, _, err = run(capsys, *quick(data, tmp_path / "run"))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "last.pt").exists()  # the same --out trains once fixed


@pytest.mark.gpu
def test_out_of_gpu_memory_frees_what_the_run_held(capsys, tmp_path, data):
    """With the process held to 256 MiB of the GPU, CerberusNet at batch 150 runs out of
    memory (one line), and what it held is free again: lenet then trains in the same
    process, as the next trial of a sweep worker would."""
    import torch

    eager = ("--no-compile", "--amp", "bf16")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / total)
    try:
        big = quick(data, tmp_path / "big", "--arch", "cerberus", "--batch-size", "150", *eager)
        code, _, err = run(capsys, *big)
        assert_one_line_error(code, err, "CUDA out of memory. Tried to allocate ")
        assert run(capsys, *quick(data, tmp_path / "small", *eager))[0] == 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_no_data_at_all_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(capsys, "train", "--arch", "lenet", "--out", str(tmp_path / "r"), "--quiet")
    assert_one_line_error(code, err, "no CIFAR-10 data given")


def test_unwritable_run_directory(capsys, tmp_path, data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(capsys, *quick(data, blocker / "run"))
    assert_one_line_error(code, err, "not writable")
    code, _, err = run(capsys, *quick(data, blocker))
    assert_one_line_error(code, err, "a-file is a file, not a directory")
    assert blocker.read_text() == ""


def test_bad_config_file(capsys, tmp_path, data):
    cfg = tmp_path / "c.toml"
    cfg.write_text('lr = 0.1\nlearning_speed = "fast"\n')
    code, _, err = run(capsys, *quick(data, tmp_path / "r"), "--config", str(cfg))
    assert_one_line_error(code, err, "learning_speed")
    cfg.write_text("lr = [")
    code, _, err = run(capsys, *quick(data, tmp_path / "r"), "--config", str(cfg))
    assert_one_line_error(code, err, "not valid TOML")
    cfg.write_bytes(b"lr = 0.1\n\xf0\x28\x8c\x28\n")  # a binary file named by mistake
    code, _, err = run(capsys, *quick(data, tmp_path / "r"), "--config", str(cfg))
    assert_one_line_error(code, err, f"config {cfg} is not UTF-8 text (byte 9)")
    code, _, err = run(capsys, "sweep", str(cfg), "--no-track")
    assert_one_line_error(code, err, f"sweep file {cfg} is not UTF-8 text")
    for text, fragment in [('epochs = "ten"', "epochs must be an integer, not 'ten'"),
                           ("flip = 1", "flip must be true or false, not 1"),
                           ("lr = true", "lr must be a number, not True"),
                           ("arch = 5", "arch must be a string, not 5")]:  # fmt: skip
        cfg.write_text(text)
        code, _, err = run(capsys, "train", "--config", str(cfg))
        assert_one_line_error(code, err, fragment)


def test_config_values_are_typed():
    from fastcifar.config import TrainConfig

    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    cfg = TrainConfig.from_dict({"lr": 1, "dropout": 0, "subset": None})
    assert isinstance(cfg.lr, float) and isinstance(cfg.dropout, float) and cfg.subset is None


def test_print_config_is_a_config_file_of_the_resolved_values(capsys, tmp_path, data):
    from fastcifar.config import TrainConfig, read_toml
    from fastcifar.recipes import recipe

    code, out, _ = run(capsys, *quick(data, tmp_path / "run", "--lr", "0.02", "--print-config"))
    assert code == 0 and not (tmp_path / "run").exists()  # nothing trained, nothing written
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    values = read_toml(printed)
    assert values["lr"] == 0.02 and values["epochs"] == 1 and values["out"] == str(tmp_path / "run")
    assert values["label_smoothing"] == recipe("lenet", "cpu")["label_smoothing"]  # the recipe's
    assert "dropout" not in values  # unset: the arch's own
    # read back as --config it resolves to the same config
    code, again, _ = run(capsys, "train", "--config", str(printed), "--print-config")
    assert code == 0 and again == out
    assert TrainConfig.from_dict(values).to_toml() == out


def test_config_may_be_a_run_directory(capsys, tmp_path):
    from fastcifar.config import TrainConfig, read_toml

    run_dir = tmp_path / "runs" / "conv3-a"
    run_dir.mkdir(parents=True)
    saved = TrainConfig(arch="conv3", lr=0.03, epochs=7, cutout=6, amp="none", out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(saved.to_dict()))
    for given in (run_dir, run_dir / "config.json"):
        code, out, _ = run(capsys, "train", "--config", str(given), "--seed", "3", "--print-config")
        assert code == 0
        printed = tmp_path / "printed.toml"
        printed.write_text(out)
        # the run's settings, another seed, and not its run directory
        assert read_toml(printed) == {k: v for k, v in {**saved.to_dict(), "seed": 3}.items()
                                      if v is not None and k != "out"}  # fmt: skip
    (run_dir / "config.json").write_text('{"lr": "fast"}')
    code, _, err = run(capsys, "train", "--config", str(run_dir), "--print-config")
    assert_one_line_error(code, err, "lr must be a number, not 'fast'")
    (run_dir / "config.json").write_text("{")
    code, _, err = run(capsys, "train", "--config", str(run_dir))
    assert_one_line_error(code, err, "is not valid JSON")
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "empty"))
    assert_one_line_error(code, err, "cannot read config")


def test_a_stopped_bench_keeps_the_archs_it_finished(capsys, tmp_path, data, monkeypatch):
    import fastcifar.bench as bench

    measure = bench.compare_throughput

    def stopped_at_conv3(arch, *args, **kwargs):
        if arch == "conv3":
            raise KeyboardInterrupt  # Ctrl-C while the second arch is measured
        return measure(arch, *args, **kwargs)

    monkeypatch.setattr(bench, "compare_throughput", stopped_at_conv3)
    out = tmp_path / "throughput.json"
    code, printed, _ = run(capsys, "bench", "throughput", "--arch", "lenet", "conv3", "--data",
                           data, "--steps", "1", "--windows", "1", "--json", str(out))  # fmt: skip
    assert code == 130
    saved = json.loads(out.read_text())
    assert [r["arch"] for r in saved["results"]] == ["lenet"]
    assert saved["results"][0]["fastcifar_images_per_sec"] > 0
    assert "lenet" in printed  # the table of what was measured


def test_bench_settings_leave_the_arch_to_arch(capsys):
    code, _, err = run(capsys, "bench", "throughput", "--set", "arch=conv3")
    assert_one_line_error(code, err, "--set arch=...: name the architectures with --arch")


def test_settings_from_the_command_line_are_typed():
    from fastcifar.config import parse_setting

    assert parse_setting("channels_last=false") == ("channels_last", False)
    assert parse_setting("lr=1") == ("lr", 1.0) and isinstance(parse_setting("lr=1")[1], float)
    assert parse_setting("amp=none") == ("amp", "none")  # a bare word is a string
    assert parse_setting("compile-mode=reduce-overhead") == ("compile_mode", "reduce-overhead")
    assert parse_setting('arch="conv3"') == ("arch", "conv3")
    assert parse_setting("subset=512") == ("subset", 512)


def test_config_file_and_flags_layer(tmp_path, data):
    from fastcifar.cli import build_parser, resolve_train_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('arch = "conv3"\nlr = 0.2\nepochs = 7\n')
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--epochs", "3", "--amp", "bf16"]
    )
    resolved, _ = resolve_train_config(args)
    assert (resolved.arch, resolved.lr, resolved.epochs, resolved.amp) == ("conv3", 0.2, 3, "bf16")


@pytest.mark.parametrize("arch", ["lenet", "conv3", "conv5", "cerberus"])
def test_paper_recipes_override_the_default_augmentation(arch):
    """The paper trained without augmentation or label smoothing: its config files must
    switch off whatever the arch's default recipe adds."""
    from fastcifar.cli import build_parser, resolve_train_config
    from fastcifar.recipes import paper_config

    path = paper_config(arch)
    cfg, _ = resolve_train_config(build_parser().parse_args(["train", "--config", str(path)]))
    assert cfg.arch == arch
    assert (cfg.crop_pad, cfg.flip, cfg.cutout, cfg.label_smoothing) == (0, False, 0, 0.0)


def test_a_run_finds_its_data_from_another_working_directory(capsys, tmp_path, monkeypatch,
                                                             data):  # fmt: skip
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere" / "deeper"
    project.mkdir()
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(project)
    assert run(capsys, *quick(os.path.relpath(data), project / "run", "--schedule", "step"))[0] == 0
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert summary["data_source"] == str(Path(data).resolve())
    monkeypatch.chdir(elsewhere)  # where ../data is no data at all
    code, out, err = run(capsys, "eval", str(project / "run"))
    assert code == 0, err
    assert f"test accuracy: {100 * summary['best']['test_acc']:.2f}%" in out
    assert run(capsys, "analyze", str(project / "run"), "--no-track")[0] == 0
    code, _, err = run(capsys, "train", "--config", str(project / "run"), "--out", "again",
                       "--no-track", "--quiet")  # fmt: skip
    assert code == 0, err
    (project / "run" / "summary.json").unlink()  # as an interrupted run has none: env.json
    assert json.loads((project / "run" / "env.json").read_text())["data_source"] == str(
        Path(data).resolve()
    )
    code, _, err = run(capsys, "train", "--resume", str(project / "run"), "--epochs", "2",
                       "--quiet")  # fmt: skip
    assert code == 0, err
    assert len((project / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_eval_predict_and_foreign_checkpoint(capsys, tmp_path, data):
    code, _, err = run(capsys, *quick(data, tmp_path / "run"))
    assert code == 0, err
    code, out, _ = run(capsys, "eval", str(tmp_path / "run"), "--tta")
    assert code == 0 and "test accuracy (flip TTA):" in out

    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (48, 40), (120, 80, 30)).save(image)
    code, out, _ = run(capsys, "predict", str(tmp_path / "run" / "best.pt"), str(image))
    name, prob = out.strip().split("\t")[1:]
    assert code == 0 and name in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                  "horse", "ship", "truck") and 0 < float(prob) <= 1  # fmt: skip

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "more" / "frog.JPG")
    Image.new("RGB", (32, 32), (200, 10, 30)).save(folder / "red.png")
    (folder / "notes.txt").write_text("not an image")
    code, out, _ = run(capsys, "predict", str(tmp_path / "run"), str(folder), str(image))
    listed = [line.split("\t")[0] for line in out.strip().splitlines()]
    assert code == 0
    assert listed == [str(folder / "more" / "frog.JPG"), str(folder / "red.png"), str(image)]
    one_at_a_time = predict_images(tmp_path / "run", [Path(p) for p in listed], batch_size=1)
    together = predict_images(tmp_path / "run", [Path(p) for p in listed])
    assert [c for _, c, _ in one_at_a_time] == [c for _, c, _ in together]
    assert [p for *_, p in one_at_a_time] == pytest.approx([p for *_, p in together], rel=1e-4)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")  # found in a folder: left out
    code, out, err = run(capsys, "predict", str(tmp_path / "run"), str(folder))
    assert code == 0 and "broken.png" not in out and len(out.strip().splitlines()) == 2
    assert err.startswith(f"cannot read image {folder / 'broken.png'}: ")
    assert err.strip().endswith("; left out") and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "predict", str(tmp_path / "run"), str(folder / "broken.png"))
    assert_one_line_error(code, err, "cannot read image")  # named itself: stops
    (folder / "only").mkdir()
    (folder / "broken.png").rename(folder / "only" / "broken.png")
    code, _, err = run(capsys, "predict", str(tmp_path / "run"), str(folder / "only"))
    assert code == 2 and err.strip().endswith("fastcifar: error: none of the images could be read")
    code, _, err = run(capsys, "predict", str(tmp_path / "run"), str(folder / "more" / "none"))
    assert_one_line_error(code, err, "image not found")
    (folder / "empty").mkdir()
    code, _, err = run(capsys, "predict", str(tmp_path / "run"), str(folder / "empty"))
    assert_one_line_error(code, err, "no image files")

    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["config"]["arch"] = "conv3"
    torch.save(ckpt, tmp_path / "foreign.pt")
    code, _, err = run(capsys, "eval", str(tmp_path / "foreign.pt"))
    assert_one_line_error(code, err, "does not fit arch 'conv3'")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    best = (tmp_path / "run" / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(best[: len(best) // 2])
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("train/cat/0.png", b"")
    for name in ("junk.pt", "truncated.pt", "images.zip"):
        code, _, err = run(capsys, "eval", str(tmp_path / name))
        assert_one_line_error(code, err, f"{name} is not a checkpoint")
    code, _, err = run(
        capsys, "predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / "no.png")
    )
    assert_one_line_error(code, err, "image not found")


def test_existing_run_and_resume_errors(capsys, tmp_path, data):
    assert run(capsys, *quick(data, tmp_path / "run"))[0] == 0
    code, _, err = run(capsys, *quick(data, tmp_path / "run"))
    assert_one_line_error(code, err, "already holds a run")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "empty"))
    assert_one_line_error(code, err, "nothing to resume")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--lr", "0.3")
    assert_one_line_error(code, err, f"cannot change --lr (0.05 in {tmp_path / 'run'}, not 0.3)")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--config", "x.toml")
    assert_one_line_error(code, err, "it takes no --config")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path))
    assert_one_line_error(code, err, "cannot change --out")
    # the command line that started the run, repeated with --resume, is no change
    for out in (tmp_path / "run", f"{tmp_path}/./run/"):  # its directory, however spelled
        code, _, err = run(capsys, *quick(data, out), "--resume", str(tmp_path / "run"))
        assert code == 0 and err.strip().endswith(
            "has already run 1 of 1 epochs; nothing to resume"
        )
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--epochs", "3")
    assert_one_line_error(code, err, "--epochs cannot change on resume: the onecycle schedule")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"))
    assert code == 0 and err.strip().endswith("has already run 1 of 1 epochs; nothing to resume")
    code, out, _ = run(capsys, "train", "--resume", str(tmp_path / "run"), "--print-config")
    assert code == 0 and "\nepochs = 1\n" in out and "\nout =" not in out
    (tmp_path / "run" / "config.json").write_text("{")
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"))
    assert_one_line_error(code, err, "is not valid JSON")


def test_bench_accuracy_records_a_run_only_under_its_own_recipe(capsys, tmp_path, data):
    assert run(capsys, *quick(data, tmp_path / "run"))[0] == 0
    out = tmp_path / "accuracy.json"
    code, _, err = run(
        capsys, "bench", "accuracy", "--collect", str(tmp_path / "run"), "--out", str(out)
    )
    assert_one_line_error(
        code, err, "not trained with the default recipe of lenet: epochs 1 (recipe: 20)"
    )
    assert not out.exists()
    code, _, err = run(capsys, "bench", "accuracy", "--arch", "lenet", "wide4", "--recipe", "paper",
                       "--runs", str(tmp_path / "runs"), "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "no paper recipe for wide4 (there is one for: cerberus, conv3")
    assert not (tmp_path / "runs").exists()  # said before lenet, whose recipe exists, trains
    train = ["bench", "accuracy", "--arch", "lenet", "--data", data, "--runs",
             str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    for held, fragment in [
        ("", "accuracy.json is not valid JSON"),
        (json.dumps({"kind": "accuracy", "machine": "NVIDIA H200", "records": [
            {"arch": "lenet", "recipe": "default", "seed": 0, "test_acc": 0.6, "seconds": {},
             "run": "lenet-default-s0"}]}), "accuracy.json holds results of NVIDIA H200"),
    ]:  # fmt: skip
        out.write_text(held)
        code, _, err = run(capsys, *train)
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "runs").exists()  # said before hours of training, not after
    out.unlink()
    collect = ["bench", "accuracy", "--out", str(out), "--collect"]
    code, _, err = run(capsys, *collect, str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "run directory not found")
    (tmp_path / "run" / "summary.json").unlink()
    code, _, err = run(capsys, *collect, str(tmp_path / "run"))
    assert_one_line_error(code, err, "is not a finished run: summary.json missing")
    (tmp_path / "run" / "env.json").write_text("{")
    code, _, err = run(capsys, *collect, str(tmp_path / "run"))
    assert_one_line_error(code, err, "cannot read the run files of")


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "accuracy", "--arch", "lenet", "cerberos", "--out", "acc.json"],
        ["bench", "throughput", "--arch", "lenet", "cerberos"],
        ["profile", "--arch", "cerberos"],
        ["summary", "--arch", "cerberos"],
    ],
)
def test_a_mistyped_arch_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch, data,
                                                         argv):  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("FASTCIFAR_DATA", data)
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, "unknown arch 'cerberos'; did you mean 'cerberus'?")
    assert out == "" and list(work.iterdir()) == []  # lenet neither trained nor measured


def test_bench_accuracy_reruns_resume_or_keep_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's local store goes here
    data = write_batches_dir(tmp_path / "data", make_arrays(n_train=5200, n_test=100))
    argv = ["bench", "accuracy", "--arch", "lenet", "--data", str(data), "--runs",
            str(tmp_path / "runs"), "--out", str(tmp_path / "accuracy.json")]  # fmt: skip
    from fastcifar import display

    class StopAfterTwoEpochs(display.TrainingDisplay):
        def end_epoch(self, row, improved):
            super().end_epoch(row, improved)
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(display, "TrainingDisplay", StopAfterTwoEpochs)
        code, _, err = run(capsys, *argv)
        assert code == 130
        hint = err.strip().splitlines()[-2]  # what to run to go on: this command, not train
        assert hint.startswith(f"fastcifar: {tmp_path / 'runs' / 'lenet-default-s0'} keeps its "
                               "last finished epoch; the same command (`fastcifar ")  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 0 and f"resuming {tmp_path / 'runs' / 'lenet-default-s0'} after epoch 2" in err
    summary = tmp_path / "runs" / "lenet-default-s0" / "summary.json"
    first = summary.read_bytes()
    code, _, err = run(capsys, *argv)
    assert code == 0 and "has already run 20 of 20 epochs; nothing to resume" in err
    assert summary.read_bytes() == first
    records = json.loads((tmp_path / "accuracy.json").read_text())["records"]
    assert [(r["arch"], r["recipe"], r["epochs_run"]) for r in records] == [
        ("lenet", "default", 20)
    ]
    # runs copied back from another machine are that machine's results, in a file of its own
    run_dir = tmp_path / "runs" / "lenet-default-s0"
    elsewhere = tmp_path / "from-gpu" / "lenet-default-s0"
    shutil.copytree(run_dir, elsewhere)
    env = json.loads((elsewhere / "env.json").read_text())
    (elsewhere / "env.json").write_text(json.dumps({**env, "device_name": "NVIDIA H200"}))
    collect = ["bench", "accuracy", "--collect", str(elsewhere), "--out"]
    assert run(capsys, *collect, str(tmp_path / "gpu.json"))[0] == 0
    assert json.loads((tmp_path / "gpu.json").read_text())["machine"] == "NVIDIA H200"
    shutil.copytree(elsewhere, elsewhere.with_name("lenet-again"))  # a second run joins the file
    assert run(capsys, *collect[:-2], str(elsewhere.with_name("lenet-again")), "--out",
               str(tmp_path / "gpu.json"))[0] == 0  # fmt: skip
    held = json.loads((tmp_path / "gpu.json").read_text())["records"]
    assert [r["run"] for r in held] == ["lenet-default-s0", "lenet-again"]
    # a label records a run of the recipe under a name of its own; the file's command says so
    labelled = [*collect[:-2], str(elsewhere), "--label", "default-direct", "--out",
                str(tmp_path / "gpu.json")]  # fmt: skip
    assert run(capsys, *labelled)[0] == 0
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["run"], r["recipe"]) for r in written["records"]] == [
        ("lenet-default-s0", "default"), ("lenet-again", "default"),
        ("lenet-default-s0", "default-direct"),
    ]  # fmt: skip
    # the file lists every command that wrote it, oldest first: they give its records back
    gpu_json = str(tmp_path / "gpu.json")
    assert written["commands"] == [
        f"fastcifar bench accuracy --collect {elsewhere} --out {gpu_json}",
        f"fastcifar bench accuracy --collect {elsewhere.with_name('lenet-again')} --out {gpu_json}",
        f"fastcifar bench accuracy --collect {elsewhere} --label default-direct --out {gpu_json}",
    ]  # fmt: skip
    for label, fragment in [("direct", "a label starts with its recipe's name, --recipe default"),
                            ("default direct", "use letters, digits")]:  # fmt: skip
        code, _, err = run(
            capsys, *labelled[:-4], "--label", label, "--out", str(tmp_path / "gpu.json")
        )
        assert_one_line_error(code, err, fragment)
    assert json.loads((tmp_path / "gpu.json").read_text()) == written
    # relabelled, as when a switch the runs were trained with becomes the default
    relabel = ["bench", "relabel", gpu_json]
    for flags, fragment in [
        (["--from", "default-direct", "--to", "default"],
         "already holds default records of lenet-default-s0"),
        (["--from", "default", "--to", "paper-direct"], "a label keeps its recipe's name"),
        (["--from", "default", "--to", "default"], "--from and --to are both default"),
        (["--from", "default-winograd", "--to", "default"], "holds no default-winograd records"),
        (["--from", "default-direct", "--to", "default-x", "--arch", "conv5"],
         "holds no default-direct records of conv5"),
    ]:  # fmt: skip
        code, _, err = run(capsys, *relabel, *flags)
        assert_one_line_error(code, err, fragment)
    assert json.loads((tmp_path / "gpu.json").read_text()) == written
    code, out, _ = run(capsys, *relabel, "--from", "default", "--to", "default-direct2",
                       "--arch", "lenet")  # fmt: skip
    assert code == 0 and out.strip() == "2 default record(s) of lenet now default-direct2"
    relabelled = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["run"], r["recipe"]) for r in relabelled["records"]] == [
        ("lenet-default-s0", "default-direct2"), ("lenet-again", "default-direct2"),
        ("lenet-default-s0", "default-direct"),
    ]  # fmt: skip
    assert relabelled["commands"] == [*written["commands"], "fastcifar " + shlex.join(
        [*relabel, "--from", "default", "--to", "default-direct2", "--arch", "lenet"])]  # fmt: skip
    # a file written before the list of commands keeps its one command as the first
    earlier = {k: v for k, v in written.items() if k != "commands"}
    (tmp_path / "old.json").write_text(json.dumps({**earlier, "command": "fastcifar earlier"}))
    assert run(capsys, "bench", "relabel", str(tmp_path / "old.json"), "--from",
               "default-direct", "--to", "default-y")[0] == 0  # fmt: skip
    assert json.loads((tmp_path / "old.json").read_text())["commands"][0] == "fastcifar earlier"
    assert not any("machine" in r for r in held)  # the file names its machine once
    code, _, err = run(capsys, *collect, str(tmp_path / "accuracy.json"))
    assert_one_line_error(code, err, "accuracy.json holds results of ")
    code, _, err = run(capsys, *collect[:-1], str(run_dir), "--out", str(tmp_path / "both.json"))
    assert_one_line_error(code, err, "these runs come from 2 machines")
    (tmp_path / "gpu.json").write_text("[]")
    code, _, err = run(capsys, *collect, str(tmp_path / "gpu.json"))
    assert_one_line_error(code, err, "gpu.json is not an accuracy results file")
    for held, fragment in [
        ({"kind": "side_by_side", "machine": "NVIDIA H200", "results": []}, "is not an accuracy"),
        ({"kind": "accuracy", "machine": "NVIDIA H200", "records": [{"arch": "lenet", "recipe":
          "default", "seed": 0, "test_acc": 0.5, "seconds": {}}]}, "a record without run"),
    ]:  # fmt: skip
        (tmp_path / "gpu.json").write_text(json.dumps(held))
        code, _, err = run(capsys, *collect, str(tmp_path / "gpu.json"))
        assert_one_line_error(code, err, fragment)


def test_no_traceback_from_the_console_script(tmp_path):
    env = {**os.environ, "FASTCIFAR_CACHE": str(tmp_path / "cache")}
    env.pop("FASTCIFAR_DATA", None)
    proc = subprocess.run([sys.executable, "-m", "fastcifar", "train", "--arch", "nope"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_a_reader_that_leaves_early_ends_output_quietly():
    # `fastcifar list | head -1` once head has exited: the pipe has no reader left
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar", "list"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == ""


def test_sigterm_stops_training_like_ctrl_c(tmp_path, data):
    env = {**os.environ, "FASTCIFAR_CACHE": str(tmp_path / "cache")}
    argv = quick(data, tmp_path / "run")
    argv[argv.index("--epochs") + 1] = "10000"
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar", *argv], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    epochs = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    hint, last = err.strip().splitlines()[-2:]
    assert last == "fastcifar: interrupted"
    run_dir = tmp_path / "run"
    assert hint.startswith(f"fastcifar: {run_dir} keeps its last finished epoch; ")
    assert hint.endswith(f"`fastcifar train --resume {run_dir}` goes on from there")
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 1 <= epochs <= ckpt["epoch"] <= epochs + 1 < 10000  # metrics follow last.pt


def test_summary_and_list(capsys):
    code, out, _ = run(capsys, "summary", "--arch", "cerberus")
    assert code == 0 and "Total params: 3,223,882" in out and "Total mult-adds (M): 379.78" in out
    code, out, _ = run(capsys, "list")
    assert code == 0 and "lenet" in out and "62,006" in out
    code, out, _ = run(capsys, "list", "conv4_relu*")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
        "conv4_relu",
        "conv4_relu_bn",
    ]
    code, out, _ = run(capsys, "list", "lenet")
    assert out.split() == ["lenet", "62,006", "params", "0.65", "M", "mult-adds"]
    code, _, err = run(capsys, "list", "resnet*")
    assert_one_line_error(code, err, "no architecture matches 'resnet*'")
    for command in ("analyze", "compare"):
        code, _, err = run(capsys, command, "no-such-run")
        assert_one_line_error(code, err, "run directory not found: no-such-run")


def test_a_run_directory_trains_in_one_process_at_a_time(capsys, tmp_path, data):
    from fastcifar.compare import compare_runs
    from fastcifar.train.rundir import claimed, is_training

    out = tmp_path / "run"
    assert run(capsys, *quick(data, out))[0] == 0
    assert not is_training(out)  # released when training ends
    (out / "summary.json").unlink()  # as if interrupted: --resume would go on
    with claimed(out):  # another process training there (flock: per open file)
        assert is_training(out)
        code, _, err = run(capsys, "train", "--resume", str(out), "--epochs", "2")
        assert_one_line_error(code, err, f"{out} is in use: another fastcifar process")
        code, _, err = run(capsys, *quick(data, out))
        assert_one_line_error(code, err, "is in use")
        assert compare_runs([out], tmp_path / "c.png")[0]["state"] == "training"
    assert compare_runs([out], tmp_path / "c.png")[0]["state"] == "unfinished"


def test_a_run_before_its_first_epoch_says_so(capsys, tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text("{}")
    for command in ("analyze", "compare"):
        code, _, err = run(capsys, command, str(started))
        assert_one_line_error(code, err, f"{started} has not finished an epoch yet")
    code, _, err = run(capsys, "eval", str(started))
    assert_one_line_error(code, err, f"no best.pt in {started}: no epoch finished yet")


def test_doctor_reports_every_path(capsys):
    assert main(["doctor"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [
        "torch", "cpu-bf16", "cuda", "native", "winograd", "dali", "triton", "malloc", "mlflow",
        "optuna",
    ]  # fmt: skip


@pytest.mark.parametrize(("capability", "says"), [((9, 0), "TMA (FASTCIFAR_CONV_LOOP=tma): yes"),
                                                  ((8, 0), "no, before Hopper")])  # fmt: skip
def test_doctor_says_where_tma_runs(monkeypatch, capability, says):
    pytest.importorskip("triton")
    from fastcifar import accelerators

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    name, ok, detail = accelerators.triton_row()
    assert (name, ok) == ("triton", True) and detail.endswith(says)


def test_profile_writes_a_chrome_trace(capsys, tmp_path, data):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--arch", "lenet", "--steps", "2", "--batch-size", "32", "--data", data,
                 "--trace", str(trace)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "top kernels" in out and "convolution" in out
    assert "host:" not in out  # only with --host
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("convolution" in e.get("name", "") for e in events)


def test_profile_with_settings_and_the_host_side(capsys, tmp_path, data):
    assert main(["profile", "--arch", "lenet", "--steps", "2", "--batch-size", "32", "--data", data,
                 "--set", "channels_last=false", "--host", "5",
                 "--trace", str(tmp_path / "trace.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(default channels_last=False)" in out
    assert "host: the main thread's CPU time" in out and "own ms" in out


def test_outputs_that_cannot_be_written_are_one_line(capsys, tmp_path, data):
    """A file where a folder should be: root may write anywhere else."""
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "profile", "--arch", "lenet", "--steps", "1", "--data", data,
                       "--trace", str(tmp_path / "file" / "trace.json"))  # fmt: skip
    assert_one_line_error(code, err, f"{tmp_path / 'file'}: File exists")
    results = tmp_path / "results"
    results.mkdir()
    (results / "t.json").write_text(json.dumps({"kind": "side_by_side", "machine": "m", "results": [
        {"arch": "lenet", "baseline_images_per_sec": 1.0, "fastcifar_images_per_sec": 2.0,
         "speedup": 2.0}]}))  # fmt: skip
    figure = tmp_path / "file" / "figure.png"
    code, _, err = run(capsys, "report", "--results", str(results), "--figure", str(figure))
    assert_one_line_error(code, err, f"cannot write {figure}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file", "results"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_fused_needs_cerberus_and_a_triton_backend(capsys, tmp_path, data, monkeypatch):
    code, _, err = run(capsys, *quick(data, tmp_path / "a"), "--fused")
    assert_one_line_error(code, err, "--fused is for cerberus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run(capsys, *quick(data, tmp_path / "b"), "--arch", "cerberus", "--fused")
    assert_one_line_error(code, err, "needs CUDA, or TRITON_INTERPRET=1")


def test_help_and_usage_errors_need_no_torch():
    """The parser imports nothing heavy: `fastcifar --help` and a mistyped flag answer at
    once, where torch alone takes seconds to import."""
    code = ("import sys; from fastcifar.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'scipy') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_version():
    proc = subprocess.run([sys.executable, "-m", "fastcifar", "--version"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastcifar {fastcifar.__version__}"
