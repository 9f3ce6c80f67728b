"""The training function. It reads top to bottom: device, data, model, optimiser, loop.

The hot loop keeps loss and accuracy on the device and reads them back only at log
boundaries; each host-device sync is marked.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcifar.config import TrainConfig
from fastcifar.data.loader import epoch_seed
from fastcifar.display import TrainingDisplay
from fastcifar.errors import NothingToResume, UserError
from fastcifar.interrupts import interrupts_deferred
from fastcifar.track import Tracker
from fastcifar.train import rundir
from fastcifar.train.build import (
    build_model,
    compiled,
    describe_layers,
    load_data,
    make_loaders,
    native_layers,
)
from fastcifar.train.checkpoint import (
    load_checkpoint,
    load_model_state,
    restore,
    resumable,
    save_checkpoint,
)
from fastcifar.train.device import (
    autocast,
    check_amp,
    check_threads,
    configure_runtime,
    input_dtype,
    resolve_device,
)
from fastcifar.train.evaluate import evaluate
from fastcifar.train.optim import Schedule, build_optimizer


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class EpochStats:
    loss: float
    acc: float
    seconds: float
    first_step_seconds: float


def train_step(model, x, y, optimizer, schedule, cfg: TrainConfig, device, scaler=None):
    """One optimiser step; returns the (detached) loss and logits, still on the device."""
    with autocast(cfg.amp, device):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if schedule is not None:
        schedule.step()
    return loss.detach(), logits.detach()


def train_epoch(model, loader, optimizer, schedule, cfg, device, scaler, display) -> EpochStats:
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, start = 0, time.perf_counter()
    first_step = 0.0
    log_every = max(1, len(loader) // 50)
    for step, (x, y) in enumerate(loader, 1):
        loss, logits = train_step(model, x, y, optimizer, schedule, cfg, device, scaler)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()  # host sync: time the first (compiling) step alone
            first_step = time.perf_counter() - start
        if display.live and step % log_every == 0:  # logs and quiet runs never sync here
            elapsed = time.perf_counter() - start
            display.advance(step, loss.item(), seen / elapsed)  # host sync at log boundary
    total_loss = (loss_sum / seen).item()  # host sync: end of epoch
    acc = correct.item() / seen
    return EpochStats(total_loss, acc, time.perf_counter() - start, first_step)


def fit(
    cfg: TrainConfig,
    display: TrainingDisplay,
    resume: Path | None = None,
    parent_run_id: str | None = None,
    on_epoch=None,
    resume_hint: bool = True,
) -> dict:
    """Train `cfg` (or resume the run in `resume`) and return the run's summary.

    `parent_run_id` nests the MLflow run under a sweep's; `on_epoch(row)` is called after
    every epoch (sweeps use it to prune); `resume_hint` says on Ctrl-C or SIGTERM how to
    go on (a sweep says it for the whole study instead).
    """
    path = resume or Path(cfg.out or rundir.default_run_dir(cfg.arch))
    created = not path.exists()
    run_dir = rundir.create_run_dir(path, fresh=resume is None)
    with rundir.claimed(run_dir, made_for_it=created):  # a run that fails at once leaves none
        try:
            return _fit(cfg, display, run_dir, resume is not None, parent_run_id, on_epoch)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say how to go on
            if resume_hint and (run_dir / "last.pt").exists():
                print(f"fastcifar: {run_dir} keeps its last finished epoch; `fastcifar train "
                      f"--resume {run_dir}` goes on from there", file=sys.stderr)  # fmt: skip
            raise


def _fit(cfg: TrainConfig, display: TrainingDisplay, run_dir: Path, resuming: bool,
         parent_run_id: str | None, on_epoch) -> dict:  # fmt: skip
    wall_start = time.perf_counter()
    device = resolve_device(cfg.device)
    for warning in (check_amp(cfg.amp, device), check_threads(cfg.threads)):
        if warning:
            print(f"fastcifar: {warning}", file=sys.stderr)
    configure_runtime(cfg.threads, cfg.deterministic, cfg.seed)
    ckpt = load_checkpoint(run_dir / "last.pt") if resuming else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, run_dir)

    t = time.perf_counter()
    data = load_data(cfg, device, display.log)
    if cfg.batch_size > len(data.train):
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training images"
        )
    train_loader, val_loader, test_loader = make_loaders(cfg, data, device, input_dtype(cfg.amp))
    data_seconds = time.perf_counter() - t

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    step_model = compiled(model, cfg)
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    state = {"epoch": 0, "best_acc": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if ckpt is not None:
        state = restore(ckpt, model, optimizer, schedule, scaler, cfg.arch, run_dir / "last.pt")
        trained_on = state.get("train_samples", train_loader.num_samples)
        if trained_on != train_loader.num_samples:
            raise UserError(
                f"{run_dir} trained on {trained_on} images an epoch; this data gives "
                f"{train_loader.num_samples}: resume with the run's own data"
            )
        display.log(f"resuming {run_dir} after epoch {state['epoch']}")
    state["train_samples"] = train_loader.num_samples
    rundir.write_json(run_dir, "config.json", cfg.to_dict())  # a resume may change --epochs
    env = {**rundir.environment(device), "data_source": data.source,
           "native_layers": native_layers(model)}  # fmt: skip
    rundir.write_environment(run_dir, env, resumed=ckpt is not None)
    tracker = start_tracking(cfg, env, run_dir, display, parent_run_id, resumed=ckpt is not None)
    display.log(run_header(cfg, model, env["device_name"], len(train_loader), run_dir))

    # Times add up over the invocations of a resumed run (kept in last.pt's state).
    seconds = {"data": 0.0, "warmup": 0.0, "train": 0.0, "eval": 0.0, "total": 0.0}
    seconds.update(state.get("seconds", {}))
    seconds["data"] += data_seconds
    earlier_total = seconds["total"]
    stopped = None
    try:
        first_epoch = state["epoch"] + 1  # of this invocation: its first step warms up
        for epoch in range(first_epoch, cfg.epochs + 1):
            train_loader.set_epoch(epoch)
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 2))  # dropout draws, per epoch
            display.start_epoch(epoch, cfg.epochs, len(train_loader))
            stats = train_epoch(
                step_model, train_loader, optimizer, schedule, cfg, device, scaler, display
            )
            if not math.isfinite(stats.loss):
                kept = f"last.pt (epoch {state['epoch']})" if state["epoch"] else "no checkpoint"
                raise TrainingDiverged(
                    f"loss became {stats.loss} in epoch {epoch}; stopped, kept {kept} in {run_dir}"
                )
            warm = stats.first_step_seconds if epoch == first_epoch else 0.0
            seconds["warmup"] += warm
            seconds["train"] += stats.seconds - warm

            t = time.perf_counter()
            val = evaluate(step_model, val_loader, cfg.amp, device) if val_loader else None
            test = evaluate(step_model, test_loader, cfg.amp, device)
            seconds["eval"] += time.perf_counter() - t
            row = epoch_row(epoch, stats, val, test, optimizer, train_loader)
            schedule.end_epoch(val.acc if val else None)

            monitored = val.acc if val else stats.acc  # without a val split: train accuracy
            improved = monitored > state["best_acc"]
            state["history"].append(row)
            state["epoch"] = epoch
            with interrupts_deferred():  # the epoch's files are written all or none
                if improved:
                    state.update(best_acc=monitored, best_epoch=epoch, bad_epochs=0)
                    best = {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch}
                    save_checkpoint(best, run_dir / "best.pt")
                    rundir.write_predictions(run_dir, test.probs, test.labels, epoch)
                else:
                    state["bad_epochs"] += 1
                seconds["total"] = earlier_total + time.perf_counter() - wall_start
                state["seconds"] = dict(seconds)
                row["wall_seconds"] = seconds["total"]  # the run so far, every invocation
                save_checkpoint(
                    resumable(model, optimizer, schedule, scaler, state, cfg), run_dir / "last.pt"
                )
                rundir.write_metrics(run_dir, state["history"])
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            display.end_epoch(row, improved)
            if on_epoch is not None:
                on_epoch(row)
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                stopped = f"early stop: no improvement for {cfg.patience} epochs"
                break
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise

    load_model_state(model, load_checkpoint(run_dir / "best.pt")["model"], cfg.arch, run_dir)
    seconds["total"] = earlier_total + time.perf_counter() - wall_start
    summary = run_summary(cfg, run_dir, state, stopped, seconds, train_loader, data)
    rundir.write_json(run_dir, "summary.json", summary)
    finish_tracking(tracker, summary, run_dir)
    display.summary(summary)
    summary["model"] = model
    return summary


def epoch_row(epoch, stats: EpochStats, val, test, optimizer, train_loader) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_acc": stats.acc,
        "val_loss": val.loss if val else None,
        "val_acc": val.acc if val else None,
        "test_loss": test.loss,
        "test_acc": test.acc,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_sec": train_loader.num_samples / stats.seconds,
        "seconds": stats.seconds,
    }


def run_header(cfg: TrainConfig, model, device_label: str, steps: int, run_dir: Path) -> str:
    """One line that says what is being trained, where and how, at the top of a log."""
    params = sum(p.numel() for p in model.parameters())
    precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.amp]
    speed = [precision, "channels-last" if cfg.channels_last else "NCHW",
             f"torch.compile ({cfg.compile_mode})" if cfg.compile else "eager"]  # fmt: skip
    if cfg.fused:
        speed.append("fused conv-BN-ReLU")
    layers = native_layers(model)
    if layers:
        speed.append(f"native layers ({describe_layers(layers)})")
    return (
        f"{cfg.arch} ({params:,} params) on {device_label}: {', '.join(speed)}; "
        f"{_count(cfg.epochs, 'epoch')} x {_count(steps, 'step')} of {cfg.batch_size}, "
        f"{'fused ' if cfg.fused_optimizer else ''}{cfg.optimizer} {cfg.schedule} lr {cfg.lr:g}; "
        f"run directory {run_dir}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_resumable(ckpt: dict, cfg: TrainConfig, run_dir: Path) -> None:
    """A one-line error when the saved run cannot go on under `cfg`; NothingToResume when
    it has already finished."""
    saved_epochs = ckpt["config"]["epochs"]
    if cfg.epochs != saved_epochs and cfg.schedule in ("onecycle", "cosine"):
        raise UserError(
            f"--epochs cannot change on resume: the {cfg.schedule} schedule of {run_dir} is "
            f"laid out over {saved_epochs} epochs; start a new run to train longer"
        )
    state = ckpt["state"]
    if state["epoch"] >= cfg.epochs:
        raise NothingToResume(
            f"{run_dir} has already run {state['epoch']} of {cfg.epochs} epochs; nothing to resume"
        )
    if cfg.patience and state["bad_epochs"] >= cfg.patience:
        raise NothingToResume(
            f"{run_dir} stopped early after epoch {state['epoch']} (no improvement for "
            f"{cfg.patience} epochs); nothing to resume"
        )


def run_summary(cfg, run_dir, state, stopped, seconds, train_loader, data) -> dict:
    history = state["history"]
    best_row = history[state["best_epoch"] - 1]
    train_seconds = sum(r["seconds"] for r in history)
    return {
        "arch": cfg.arch,
        "run_dir": str(run_dir),
        "epochs_run": state["epoch"],
        "stopped": stopped,
        "best": {k: best_row[k] for k in ("epoch", "val_acc", "val_loss", "test_acc", "test_loss")},
        "images_per_sec": train_loader.num_samples * len(history) / train_seconds,
        "seconds": dict(seconds),
        "data_source": data.source,
    }


def start_tracking(cfg, env, run_dir, display, parent_run_id, resumed: bool) -> Tracker:
    """Open the run's MLflow run (reopened on resume, by the id kept in tracking.json)."""
    tracker = Tracker(cfg.track, cfg.tracking_uri, log=display.log)
    saved = run_dir / "tracking.json"
    previous = json.loads(saved.read_text()).get("run_id") if resumed and saved.exists() else None
    tags = {"arch": cfg.arch, "device": env["device"], "device_name": env["device_name"],
            "torch": env["torch"], "cuda": str(env["cuda"]), "git_revision": str(env["git_revision"]),
            "native_layers": describe_layers(env["native_layers"]) or "none",
            "run_dir": str(run_dir.resolve())}  # fmt: skip
    run_id = tracker.start(
        run_dir.name, cfg.to_dict(), tags, run_id=previous, parent_id=parent_run_id
    )
    if run_id and not previous:
        rundir.write_json(run_dir, "tracking.json", {"run_id": run_id, "uri": tracker.uri})
    return tracker


def finish_tracking(tracker: Tracker, summary: dict, run_dir: Path) -> None:
    """The paper's Table 1 columns (accuracy, epochs needed, duration), then artifacts."""
    best = summary["best"]
    tracker.log_metrics({
        "final_test_acc": best["test_acc"],
        "best_val_acc": best["val_acc"],
        "epochs_needed": best["epoch"],
        "duration_s": summary["seconds"]["total"],
        **{f"seconds_{k}": v for k, v in summary["seconds"].items()},
    })  # fmt: skip
    tracker.log_artifacts(run_dir)
    if (run_dir / "analysis").is_dir():
        tracker.log_artifacts(run_dir / "analysis", names=[p.name for p in (run_dir / "analysis").iterdir()],
                              subdir="analysis")  # fmt: skip
    tracker.end("FINISHED")
