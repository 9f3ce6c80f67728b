"""MLflow tracking against a real local store, and a tracking failure that must not
stop training."""

import json

import pytest

from fastcifar.config import TrainConfig
from fastcifar.display import TrainingDisplay
from fastcifar.train.engine import fit

from .conftest import make_arrays, write_batches_dir

mlflow = pytest.importorskip("mlflow")


class Recorder(TrainingDisplay):
    def __init__(self):
        super().__init__(quiet=True)
        self.messages = []

    def log(self, message):
        self.messages.append(message)


def config(tmp_path, **changes):
    data = tmp_path / "data"
    if not data.exists():
        write_batches_dir(data, make_arrays(n_train=300, n_test=100))
    base = dict(arch="lenet", data=str(data / "cifar-10-batches-py"), out=str(tmp_path / "run"),
                epochs=2, batch_size=50, val=50, amp="none", lr=0.05)  # fmt: skip
    return TrainConfig(**{**base, **changes})


def test_run_is_written_and_read_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = fit(config(tmp_path, tracking_uri=uri), TrainingDisplay(quiet=True))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["fastcifar"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == "lenet" and float(run.data.params["lr"]) == 0.05
    assert run.data.tags["arch"] == "lenet" and run.data.tags["device"] == "cpu"
    assert run.data.metrics["final_test_acc"] == pytest.approx(summary["best"]["test_acc"])
    assert run.data.metrics["epochs_needed"] == summary["best"]["epoch"]
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run.info.run_id, "val_acc")
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r["val_acc"] for r in rows]
    )
    artifacts = {a.path for a in mlflow.tracking.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "config.json", "best.pt"} <= artifacts


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "bogus://store"])  # no server; no scheme
def test_unreachable_or_unknown_store_warns_once_and_trains_on(tmp_path, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    display = Recorder()
    summary = fit(config(tmp_path, tracking_uri=uri), display)
    assert summary["epochs_run"] == 2
    warnings = [m for m in display.messages if "tracking off" in m]
    assert len(warnings) == 1
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_no_track_touches_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(config(tmp_path, track=False), TrainingDisplay(quiet=True))
    assert not (tmp_path / "mlflow.db").exists()


def test_analysis_is_attached_to_the_tracked_run(tmp_path):
    from fastcifar.analyze import analyze_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fit(config(tmp_path, tracking_uri=uri), TrainingDisplay(quiet=True))
    analyze_run(tmp_path / "run", log=lambda _: None)
    client = mlflow.tracking.MlflowClient(uri)
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/confusion.png", "analysis/index.html", "analysis/analysis.json"} <= logged
    assert client.get_run(run_id).info.status == "FINISHED"
