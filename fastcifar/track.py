"""MLflow tracking for training runs and sweeps.

The run directory stays the source of truth: tracking mirrors it into MLflow (params,
per-epoch metrics, tags, the paper's Table 1 columns, artifacts). The default store is
a local SQLite file, `mlflow.db`, in the working directory, with artifacts in
`mlartifacts/`; `--tracking-uri` or `MLFLOW_TRACKING_URI` points elsewhere. Any tracking
failure warns once and turns tracking off for the rest of the run: it never stops
training.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fastcifar.errors import first_line

EXPERIMENT = "fastcifar"
ARTIFACTS = ("config.json", "env.json", "metrics.jsonl", "summary.json", "best.pt")


def tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class Tracker:
    """One MLflow run, driven through MlflowClient with explicit run ids."""

    def __init__(self, enabled: bool, uri: str | None = None, log=print):
        self.log = log
        self.client = None
        self.run_id: str | None = None
        if not enabled:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            self._warn("mlflow is not installed (pip install 'fastcifar[track]'); not tracking")
            return
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Fail fast against an unreachable server instead of retrying for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = tracking_uri(uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:  # e.g. a URI scheme MLflow does not know
            self._warn(f"cannot track to {self.uri} ({first_line(exc)[:200]})")

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _warn(self, message: str) -> None:
        self.log(f"[yellow]tracking off:[/yellow] {message}")
        self.client = None

    def _guard(self, what: str, fn, *args, **kwargs):
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any tracking failure must not stop training
            self._warn(f"{what} failed ({first_line(exc)[:200]})")
            return None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return self.client.create_experiment(EXPERIMENT, artifact_location=location)

    def start(self, name: str, params: dict, tags: dict, run_id: str | None = None,
              parent_id: str | None = None) -> str | None:  # fmt: skip
        """Start (or, with `run_id`, reopen) a run; returns its id, None when off."""

        def begin():
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            all_tags = {**tags, "mlflow.runName": name}
            if parent_id:
                all_tags["mlflow.parentRunId"] = parent_id
            run = self.client.create_run(self._experiment_id(), tags=all_tags, run_name=name)
            self.client.log_batch(run.info.run_id, params=_params(params))
            return run.info.run_id

        self.run_id = self._guard("starting the MLflow run", begin)
        return self.run_id

    def log_metrics(self, values: dict, step: int | None = None) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = _now_ms()
            metrics = [
                Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None
            ]
            self._guard("logging metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def set_tags(self, tags: dict) -> None:
        if self.active:
            for key, value in tags.items():
                self._guard("setting tags", self.client.set_tag, self.run_id, key, str(value))

    def log_artifacts(self, folder: Path, names=ARTIFACTS, subdir: str | None = None) -> None:
        if not self.active:
            return
        for name in names:
            path = folder / name
            if path.exists():
                self._guard(
                    f"uploading {name}", self.client.log_artifact, self.run_id, str(path), subdir
                )

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._guard("ending the run", self.client.set_terminated, self.run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _params(values: dict):
    from mlflow.entities import Param

    return [
        Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        for k, v in values.items()
    ]


def log_folder_to_run(run_dir: Path, folder: Path, subdir: str, log=print) -> bool:
    """Attach `folder`'s files to the MLflow run recorded in `run_dir/tracking.json`, if
    any; True when they were logged."""
    saved = run_dir / "tracking.json"
    if not saved.exists():
        return False
    info = json.loads(saved.read_text())
    tracker = Tracker(True, info.get("uri"), log=log)
    if tracker.client is None:
        return False
    tracker.run_id = info["run_id"]
    tracker.log_artifacts(folder, names=sorted(p.name for p in folder.iterdir()), subdir=subdir)
    return tracker.client is not None
