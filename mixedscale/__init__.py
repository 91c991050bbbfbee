"""mixedscale: fit linear mixed-effects models by the thousand, verified against lme4's optimum."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import RunResult, fit_many
from .errors import DataError, MixedscaleError, RunIncomplete, SpecError, StoreError
from .single import FitResult, fit
from .spec import ModelSpec, grid
from .store import Store, open_store

__all__ = [
    "DataError",
    "FitResult",
    "MixedscaleError",
    "ModelSpec",
    "RunIncomplete",
    "RunResult",
    "SpecError",
    "Store",
    "StoreError",
    "__version__",
    "fit",
    "fit_many",
    "grid",
    "open_store",
]
