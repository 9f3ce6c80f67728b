"""Model registry in the style of timm: `register_model`, `create_model`, `list_models`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

from fastcifar.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def check_arch(name: str) -> str:
    """`name` if it is registered, else a one-line error naming the nearest one."""
    if name not in _MODELS:
        names = list_models()
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"choose one of: {', '.join(names)}"
        raise UserError(f"unknown arch {name!r}; {hint}")
    return name


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` go to its factory (activation, dropout, ...)."""
    check_arch(name)
    try:
        return _MODELS[name](**overrides)
    except TypeError as exc:
        raise UserError(f"bad option for arch {name!r}: {exc}") from None
