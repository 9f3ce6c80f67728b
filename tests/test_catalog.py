"""`fastcifar list`'s numbers: counted from the models, then read back from the cache
folder without importing torch, and counted again for other model code."""

from __future__ import annotations

import json
import subprocess
import sys

from fastcifar import catalog
from fastcifar.models import create_model, list_models
from fastcifar.summary import count_mult_adds


def test_the_counts_are_the_models_own(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path))
    counts = catalog.catalog()
    assert sorted(counts) == list_models()
    for name in ("lenet", "cerberus"):
        model = create_model(name)
        assert counts[name] == {
            "params": sum(p.numel() for p in model.parameters()),
            "mult_adds": count_mult_adds(model),
        }
    assert round(counts["cerberus"]["mult_adds"] / 1e6, 2) == 379.78  # the paper's figure 8
    (written,) = (tmp_path / "catalog").iterdir()
    assert json.loads(written.read_text()) == counts


def test_a_counted_catalog_lists_without_torch(tmp_path):
    env = {"FASTCIFAR_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    code = ("import sys; from fastcifar.cli import main; main(['list', 'lenet']); "
            "print('torch' in sys.modules)")  # fmt: skip
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0] == ["lenet", "62,006", "params", "0.65", "M", "mult-adds", "True"]
    assert runs[1] == [*runs[0][:-1], "False"]  # read back: no torch import, no counting


def test_other_model_code_or_a_damaged_file_is_counted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path))
    key = catalog.source_key()
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / f"{key}.json").write_text("{")  # cut short
    assert catalog.catalog()["lenet"]["params"] == 62_006
    edited = tmp_path / "paper.py"
    edited.write_text("# another version of the model code\n")
    monkeypatch.setattr(catalog, "SOURCES", (*catalog.SOURCES, edited))
    assert catalog.source_key() != key
