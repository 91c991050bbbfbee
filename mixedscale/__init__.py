"""mixedscale: fit linear mixed-effects models by the thousand, verified against lme4's optimum."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataError, MixedscaleError, RunIncomplete, SpecError, StoreError
from .single import FitResult, fit
from .spec import ModelSpec, grid

__all__ = [
    "DataError",
    "FitResult",
    "MixedscaleError",
    "ModelSpec",
    "RunIncomplete",
    "SpecError",
    "StoreError",
    "__version__",
    "fit",
    "grid",
]
