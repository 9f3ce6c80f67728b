"""`fastcifar sweep FILE`: grid or TPE searches over `fastcifar train` options, on Optuna.

The sweep file is read by `fastcifar.sweep_spec`; the result table is made by
`fastcifar.sweep_results`.

The study lives in Optuna storage: a SQLite file in the sweep's folder by default, or
any `--storage` URL (PostgreSQL for many machines). Workers heartbeat; a killed worker's
trial is marked failed by the next worker to start a trial and run again with the same
parameters. Every trial is an MLflow child run under one parent run for the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from fastcifar.config import MAX_SEED, TrainConfig
from fastcifar.errors import UserError, first_line, is_out_of_memory, settings_error_line
from fastcifar.interrupts import interrupts_allowed, interrupts_deferred
from fastcifar.sweep_results import results, trial_line, write_results
from fastcifar.sweep_spec import SweepSpec, decode_choice, encode_choice, point_key

SPEC_TEXT_ENV = "FASTCIFAR_SWEEP_TEXT"  # the sweep file's text, handed to its workers


def make_sampler(spec: SweepSpec, worker: int):
    import optuna

    if spec.sampler == "grid":
        space = {name: [encode_choice(v) for v in values] for name, values in spec.axes.items()}
        # One seed for every worker: the seed also orders the grid, whose point ids the
        # workers share through the study.
        return optuna.samplers.GridSampler(space, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=(spec.seed + worker) % (MAX_SEED + 1))


def open_storage(url: str, heartbeat: int):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
            )  # fmt: skip
    except ModuleNotFoundError as exc:
        raise UserError(f"storage {url.split(':')[0]} needs the {exc.name} package") from None
    except Exception as exc:  # sqlalchemy's connection errors
        raise UserError(f"cannot open sweep storage {url}: {first_line(exc)[:200]}") from None


def trial_config(spec: SweepSpec, options: dict, out: Path, number: int, data: str | None,
                 track: bool, device: str) -> TrainConfig:  # fmt: skip
    from fastcifar.recipes import recipe

    values = {**recipe(options.get("arch", TrainConfig.arch), device), **options}
    if data:
        values["data"] = data
    values.update(out=str(out / "trials" / f"{number:04d}"), track=track)
    return TrainConfig.from_dict(values)


def run_worker(spec: SweepSpec, storage_url: str, out: Path, data: str | None, track: bool,
               worker: int, heartbeat: int) -> None:  # fmt: skip
    """Run trials until the grid is exhausted or the budget is spent. A stop signal (the
    sweep command's, or the kernel's when it dies) takes effect while a trial trains, never
    inside Optuna's writes to the study: raised inside its SQL, one once broke Optuna's own
    bookkeeping, and the trial stayed RUNNING for good."""
    with interrupts_deferred():
        _run_trials(spec, storage_url, out, data, track, worker, heartbeat)


def _run_trials(spec: SweepSpec, storage_url: str, out: Path, data: str | None, track: bool,
                worker: int, heartbeat: int) -> None:  # fmt: skip
    import optuna

    from fastcifar.display import TrainingDisplay
    from fastcifar.train.device import free_earlier_runs, resolve_device
    from fastcifar.train.engine import fit

    # The worker prints its own line per trial, a failed one's error included: Optuna's
    # warnings (a failed trial's traceback among them) would repeat it at length.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(storage_url, heartbeat)
    # No pruner would mean Optuna's default, a MedianPruner: `prune = false` needs NopPruner.
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
        if spec.prune
        else optuna.pruners.NopPruner()
    )
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, worker),
                              pruner=pruner)  # fmt: skip
    parent = study.user_attrs.get("mlflow_parent_run_id")
    device = resolve_device("auto").type
    trials_here = []  # the trials this worker has begun

    def objective(trial):
        if trials_here:  # an earlier trial's model and data, or a failed one's, let go
            free_earlier_runs(device)
        trials_here.append(trial.number)
        choice = {
            name: decode_choice(trial.suggest_categorical(name, [encode_choice(v) for v in values]))
            for name, values in spec.axes.items()
        }
        if spec.sampler == "grid" and _taken_by_another(study, trial, wait_s=3 * heartbeat + 1):
            # Two workers raced for one grid point: the first trial keeps it, this one counts
            # nowhere, and this worker stops (the round loop in run_sweep covers what is left).
            trial.set_user_attr("duplicate", True)
            study.stop()
            raise optuna.TrialPruned()
        cfg = trial_config(spec, spec.options(choice), out, trial.number, data, track, device)
        run_dir = Path(cfg.out)
        trial.set_user_attr("run_dir", str(run_dir))
        # what the trial trains with, the recipe's values included, for the result table
        trial.set_user_attr("trained", {"lr": cfg.lr, "optimizer": cfg.optimizer,
                                        "momentum": cfg.momentum})  # fmt: skip
        if (run_dir / "last.pt").exists():  # a retried trial starts over
            import shutil

            shutil.rmtree(run_dir)

        def report(row):
            with interrupts_deferred():  # called inside fit, where stops are let through
                trial.report(
                    row["val_acc"] if row["val_acc"] is not None else row["train_acc"], row["epoch"]
                )
                prune = trial.should_prune()
            if prune:
                raise optuna.TrialPruned()

        try:
            with interrupts_allowed():
                summary = fit(cfg, TrainingDisplay(quiet=True), parent_run_id=parent,
                              on_epoch=report, resume_hint=False)  # fmt: skip
        except Exception as exc:  # not KeyboardInterrupt: a stop passes through, the trial fails
            if not (isinstance(exc, UserError) or is_out_of_memory(exc)):
                raise  # a bug, not the point's own settings: the worker stops, loudly
            error = settings_error_line(exc)  # kept for the table; this sweep does not retry it
            trial.set_user_attr("error", error)
            raise UserError(error) from None  # failed; Optuna goes on
        best = summary["best"]
        trial.set_user_attr("test_acc", best["test_acc"])
        trial.set_user_attr("epochs_needed", best["epoch"])
        trial.set_user_attr("duration_s", summary["seconds"]["total"])
        return best["val_acc"] if best["val_acc"] is not None else best["test_acc"]

    def table_so_far(study, trial):  # a long sweep's table and log grow trial by trial
        rows = results(study, spec)
        write_results(rows, spec, out)
        for r in rows:
            if r["trial"] == trial.number:
                print(trial_line(r, spec), flush=True)

    if spec.sampler == "grid":  # the grid sampler stops the study once every point is taken
        study.optimize(objective, catch=(UserError,), callbacks=[table_so_far])
        return
    from optuna.trial import TrialState

    budget = optuna.study.MaxTrialsCallback(
        spec.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    study.optimize(objective, n_trials=spec.trials, callbacks=[budget, table_so_far],
                   catch=(UserError,))  # fmt: skip


def run_sweep(spec: SweepSpec, *, storage: str | None, workers: int, resume: bool, out: Path | None,
              data: str | None, track: bool, tracking_uri: str | None = None, heartbeat: int = 10,
              log=print) -> list[dict]:  # fmt: skip
    """Create or resume the study, run `workers` worker processes, write the results table."""
    import optuna

    path = spec.path
    out = out or Path("sweeps") / spec.name
    if out.exists() and not out.is_dir():
        raise UserError(f"sweep directory {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(url, heartbeat)
    existing = {s.study_name for s in optuna.get_all_study_summaries(rdb)}
    if spec.name in existing and not resume:
        raise UserError(f"study {spec.name!r} already exists in {url}; add --resume to continue it")
    study = optuna.create_study(
        study_name=spec.name, storage=rdb, direction="maximize", load_if_exists=True
    )
    _keep_search_space(spec, study)
    first_new = len(study.trials)  # a point that fails from here on is not retried by this sweep
    if resume:
        _retry_failed_points(study)
    if track and "mlflow_parent_run_id" not in study.user_attrs:
        from fastcifar.track import Tracker

        parent = Tracker(True, tracking_uri, log=log)
        run_id = parent.start(f"sweep-{spec.name}", {"sweep_file": str(path), "sampler": spec.sampler},
                              {"sweep": spec.name})  # fmt: skip
        if run_id:
            study.set_user_attr("mlflow_parent_run_id", run_id)
    log(f"sweep {spec.name}: {spec.planned()} trials planned, {_trials_done(spec, study)} done before, "
        f"{workers} worker(s), storage {url}")  # fmt: skip
    command = [sys.executable, "-m", "fastcifar", "sweep", str(path), "--worker-of", url, "--out", str(out),
               "--heartbeat", str(heartbeat)] + (["--data", data] if data else []) + ([] if track else ["--no-track"])  # fmt: skip
    env = {**os.environ, SPEC_TEXT_ENV: spec.text,
           **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})}  # fmt: skip
    for _ in range(3):  # a round of workers, then again for what a dead or racing worker left
        if _nothing_left(spec, study, first_new):
            break
        try:
            codes = _run_workers(command, env, workers)
        except KeyboardInterrupt:
            again = f"fastcifar sweep {path} --resume --out {out}" + (
                f" --storage {storage}" if storage else ""
            )
            print(f"fastcifar: sweep {spec.name} stopped; `{again}` goes on from there, training "
                  "the interrupted trials again", file=sys.stderr)  # fmt: skip
            raise
        if any(codes):
            log(f"[yellow]{sum(1 for c in codes if c)} worker(s) exited with an error[/yellow]")
        _recover_stale(study, heartbeat)
    rows = results(optuna.load_study(study_name=spec.name, storage=rdb), spec)
    write_results(rows, spec, out)
    if track and study.user_attrs.get("mlflow_parent_run_id"):
        from fastcifar.track import Tracker

        parent = Tracker(True, tracking_uri, log=log)
        parent.run_id = study.user_attrs["mlflow_parent_run_id"]
        parent.log_artifacts(out, names=["results.csv", "results.md"])
        parent.end("FINISHED")
    return rows


def _keep_search_space(spec: SweepSpec, study) -> None:
    """A study's trials hold to the search space it began with: a resumed sweep whose file
    changed an axis, a fixed value or the sampler is refused (Optuna cannot widen an axis,
    and a changed fixed value would mix two experiments in one table)."""
    space = json.loads(
        json.dumps({"axes": spec.axes, "fixed": spec.fixed, "sampler": spec.sampler})
    )
    began = study.user_attrs.get("search_space")
    if began is None:  # a new study (or one begun before the space was kept)
        study.set_user_attr("search_space", space)
        return
    changed = [name for part in ("axes", "fixed") for name in sorted({*began[part], *space[part]})
               if began[part].get(name) != space[part].get(name)]  # fmt: skip
    if began["sampler"] != space["sampler"]:
        changed.append("the sampler")
    if changed:
        raise UserError(f"{spec.path} changed {', '.join(changed)} since study {spec.name!r} began; "
                        "restore it, or sweep it as a new study (another file name or --out)")  # fmt: skip


def _run_workers(command: list[str], env: dict, workers: int) -> list[int]:
    """N worker processes on this machine, one GPU each when there are GPUs."""
    gpus = _gpu_count()
    procs = []
    for worker in range(workers):
        worker_env = {**env, "FASTCIFAR_SWEEP_WORKER": str(worker),
                      "FASTCIFAR_SWEEP_PARENT": str(os.getpid())}  # fmt: skip
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = str(worker % gpus)
        else:
            worker_env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_worker(workers)))
        # Their own session: a stop reaches each worker once, from here, not from the
        # terminal as well, so no worker is interrupted a second time while it stops.
        procs.append(subprocess.Popen(command, env=worker_env, start_new_session=True))
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers stop too, none outlives it
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()  # each finishes the file it is writing; its trial is marked failed
        raise


def cpu_threads_per_worker(workers: int) -> int:
    """The cores split between CPU workers: each with torch's default of one thread per
    core, two workers on two cores trained conv4 at a quarter of the images/s of two
    one-thread workers (benchmarks/NOTES.md). A sweep's `threads` still overrides it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def _retry_failed_points(study) -> None:
    """Queue once more each point whose trials all failed with an error of their own: a
    resume trains it again (the sweep that saw it fail did not)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    settled = {point_key(t.params) for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)}  # fmt: skip
    for trial in trials:
        key = point_key(trial.params)
        if trial.state == TrialState.FAIL and "error" in trial.user_attrs and key not in settled:
            study.enqueue_trial(trial.params)
            settled.add(key)


def _recover_stale(study, heartbeat: int) -> None:
    """After the workers exit, a trial still RUNNING belongs to a dead worker or to one on
    another machine. Wait out the grace period and fail the stale ones, which enqueues
    their retry."""
    import optuna
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        time.sleep(3 * heartbeat + 1)
        optuna.storages.fail_stale_trials(study)


def _nothing_left(spec: SweepSpec, study, first_new: int) -> bool:
    """Every grid point (or the whole TPE budget) is finished, or failed with an error of
    its own in a trial from `first_new` on, and no trial waits or runs."""
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        return False
    return _trials_done(spec, study, errors_since=first_new) >= spec.planned()


def _trials_done(spec: SweepSpec, study, errors_since: int | None = None) -> int:
    """Trials that count: completed or pruned, not duplicates; on a grid, distinct points
    (a failed trial and its retry count once, a failure not at all, except one that failed
    with an error of its own from trial `errors_since` on)."""
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if not t.user_attrs.get("duplicate")]  # fmt: skip
    if errors_since is not None:
        finished += [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                     if t.number >= errors_since and "error" in t.user_attrs]  # fmt: skip
    if spec.sampler == "tpe":
        return len(finished)
    return len({point_key(t.params) for t in finished})


def _taken_by_another(study, trial, *, wait_s: float) -> bool:
    """Whether an earlier live trial has the same grid point. Only earlier ones count, so
    that of two racing trials exactly one gives way. An earlier running trial that has not
    drawn its point yet (its worker draws it at the objective's start) is waited for, up to
    `wait_s`: deciding without its point let two workers train the same one."""
    from optuna.trial import TrialState

    live = (TrialState.RUNNING, TrialState.COMPLETE)
    deadline = time.monotonic() + wait_s
    while True:
        earlier = [
            t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number
        ]
        if any(t.params == trial.params for t in earlier):
            return True
        undrawn = any(
            t.state == TrialState.RUNNING and t.params.keys() != trial.params.keys()
            for t in earlier
        )
        if not undrawn or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0
