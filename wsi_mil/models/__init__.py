"""The MIL model registry: `create_model(name, in_dim, n_classes, **kw)` (timm-style)."""

from __future__ import annotations

from .abmil import ABMIL
from .base import MILModel, MILOutput
from .camil import CAMIL
from .dsmil import DSMIL
from .dtfd import DTFDMIL
from .linear_probe import LinearProbe
from .psmil import PSMIL
from .transmil import TransMIL

MODELS: dict[str, type[MILModel]] = {
    "abmil": ABMIL,
    "dsmil": DSMIL,
    "dtfd": DTFDMIL,
    "camil": CAMIL,
    "transmil": TransMIL,
    "psmil": PSMIL,
    "linearprobe": LinearProbe,  # on slide embeddings (`wsi-mil slide-embed`)
}


def list_models() -> list[str]:
    """The MIL models (not the linear probe, which takes slide embeddings)."""
    return sorted(k for k, cls in MODELS.items() if not getattr(cls, "slide_level", False))


def model_class(name: str) -> type[MILModel]:
    """The registered class for a model name (case, '-' and '_' ignored)."""
    from ..errors import WsiMilError

    key = name.lower().replace("-", "").replace("_", "")
    key = {"dtfdmil": "dtfd"}.get(key, key)
    if key not in MODELS:
        names = ", ".join(list_models())
        raise WsiMilError(f"unknown model {name!r}; choose one of {names}, or linear-probe")
    return MODELS[key]


def create_model(name: str, in_dim: int, n_classes: int = 2, **kwargs) -> MILModel:
    """Build a MIL model by name with its defaults (the authors', except where its docstring says
    why not), overridden by `kwargs`."""
    return model_class(name)(in_dim, n_classes, **kwargs)


__all__ = ["MILModel", "MILOutput", "create_model", "list_models", "model_class", "MODELS"]
