"""The registered architectures with their parameter counts and mult-adds, as `fastcifar
list` shows them.

Counting needs torch and its FLOP counter (seconds to import) while the numbers change
only with the model code, so they are counted once per version of `fastcifar/models/`,
of the counter and of torch, and read back from the cache folder after that.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from fastcifar.atomic import write_json_atomic
from fastcifar.data.cache import cache_root

PACKAGE = Path(__file__).resolve().parent
# what the counts depend on: the model code and the counting code
SOURCES = (*sorted((PACKAGE / "models").glob("*.py")), PACKAGE / "summary.py")


def catalog() -> dict[str, dict[str, int]]:
    """{arch: {"params": N, "mult_adds": M}} for every registered architecture, by name."""
    path = cache_root() / "catalog" / f"{source_key()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not counted yet for this code, or an unreadable file
        pass
    counts = count_all()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, counts)
    except OSError:  # a read-only cache folder: count again next time
        pass
    return counts


def source_key() -> str:
    """A digest of the model and counting code and of torch's version."""
    digest = hashlib.sha256(metadata.version("torch").encode())
    for source in SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def count_all() -> dict[str, dict[str, int]]:
    from fastcifar.models import create_model, list_models
    from fastcifar.summary import count_mult_adds

    counts = {}
    for name in list_models():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        counts[name] = {"params": params, "mult_adds": count_mult_adds(model)}
    return counts
