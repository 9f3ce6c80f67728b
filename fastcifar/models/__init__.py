"""Model registry and the paper's networks."""

from fastcifar.models import paper, reference  # noqa: F401  (registers the models)
from fastcifar.models.registry import check_arch, create_model, list_models, register_model

__all__ = ["check_arch", "create_model", "list_models", "register_model"]
