"""Benchmark suites: sizes (full and ``--quick``), model specs, true parameters, runners."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mixedscale as ms

SUITES = ("genes", "sites", "multiverse", "tiny", "big")
DEFAULT_SUITES = ("genes", "sites", "multiverse", "tiny")

# Peers: plain loop, ProcessPoolExecutor(2), naive dask groupby-apply, lme4 via Rscript.
PEERS = ("pandas-loop", "process-pool", "dask-groupby", "lme4")


@dataclass(frozen=True)
class Suite:
    name: str
    key: str
    n_slices: int
    rows_per_slice: int
    row_group_rows: int  # rows per Parquet row group
    specs: tuple[ms.ModelSpec, ...]
    truth: dict[str, Any]
    runners: tuple[str, ...]
    # Deterministic subsample for slow peers: at most this many slices / specs (None = all).
    peer_slices: dict[str, int | None] = field(default_factory=dict)
    peer_specs: int | None = None
    files: int = 1  # Parquet files per layout
    chunk_rows: int = 0  # generation chunk (big only): rows held in memory at once
    single_spec: ms.ModelSpec | None = None  # timed alone with mixedscale.fit
    cluster: dict[str, Any] = field(default_factory=dict)  # own cluster (big): workers, memory
    # Runners too slow for the default run (tiny with statsmodels: 25-40 min); they run
    # only when --runners names them.
    optional_runners: tuple[str, ...] = ()

    @property
    def n_rows(self) -> int:
        return self.n_slices * self.rows_per_slice

    @property
    def columns(self) -> list[str]:
        cols = [self.key]
        for s in self.specs:
            cols.extend(c for c in s.columns if c not in cols)
        return cols


def _ms_runners(engines: bool, unsorted: bool = True) -> tuple[str, ...]:
    out = ["mixedscale-auto-sorted"]
    if unsorted:
        out.append("mixedscale-auto-unsorted")
    if engines:
        out += ["mixedscale-fast-sorted", "mixedscale-statsmodels-sorted"]
    return tuple(out)


def genes(quick: bool) -> Suite:
    specs = (
        ms.ModelSpec("expression ~ time * group", groups="subject", name="random_intercept"),
        ms.ModelSpec("expression ~ time * group", groups="subject", re_formula="~time",
                     name="random_slope"),
        ms.ModelSpec("expression ~ time * group", groups="subject", reml=False,
                     name="random_intercept_ml"),
    )
    truth = {"fixed": {"Intercept": 5.0, "time": 0.5, "group[T.treated]": 0.8,
                       "time:group[T.treated]": 0.2},
             "sd_intercept": 1.0, "sd_slope": 0.3, "sd_residual": 1.0,
             "design": "30 subjects x 4 times per gene; group = subject parity"}
    return Suite(
        name="genes", key="gene", n_slices=12 if quick else 2000, rows_per_slice=120,
        row_group_rows=360 if quick else 30_000, specs=specs, truth=truth,
        runners=(*_ms_runners(engines=True), *PEERS),
        peer_slices={"pandas-loop": 6 if quick else 300, "process-pool": 12 if quick else 600,
                     "dask-groupby": 12 if quick else 600, "lme4": 6 if quick else 300},
    )


def sites(quick: bool) -> Suite:
    specs = (
        ms.ModelSpec("y ~ x", groups="g", name="random_intercept"),
        ms.ModelSpec("y ~ x", groups="g", re_formula="~x", name="random_slope"),
    )
    truth = {"fixed": {"Intercept": 1.0, "x": 0.5}, "sd_intercept": 1.0, "sd_slope": 0.5,
             "sd_residual": 1.0, "design": "200 groups x 10 rows per site"}
    return Suite(
        name="sites", key="site", n_slices=3 if quick else 20,
        rows_per_slice=400 if quick else 2000, row_group_rows=400 if quick else 10_000,
        specs=specs, truth=truth, runners=(*_ms_runners(engines=True), *PEERS),
        peer_slices={"lme4": None},
    )


# 8 formulas x (a random intercept; a random slope, unstructured or diagonal) x REML/ML:
# 48 models (a random intercept alone has no covariance structure to vary).
MULTIVERSE_FORMULAS = ("y ~ x", "y ~ x + z", "y ~ x * z", "y ~ x + w", "y ~ x + z + w",
                       "y ~ x * z + w", "y ~ x * w", "y ~ x + z * w")


def multiverse(quick: bool) -> Suite:
    specs = tuple(ms.grid(name="mv", formula=list(MULTIVERSE_FORMULAS), groups="g",
                          re_formula=["1", "~x"], reml=[True, False],
                          cov_structure=["unstructured", "diagonal"]))
    truth = {"fixed": {"Intercept": 1.0, "x": 0.5, "z": -0.3, "w": 0.2, "x:z": 0.1},
             "sd_intercept": 1.0, "sd_slope": 0.5, "sd_residual": 1.0,
             "design": "one study: 2,000 groups x 50 rows"}
    single = ms.ModelSpec("y ~ x + z", groups="g", re_formula="~x", name="single_slope")
    return Suite(
        name="multiverse", key="study", n_slices=1, rows_per_slice=2000 if quick else 100_000,
        row_group_rows=500 if quick else 25_000, specs=specs, truth=truth,
        runners=("mixedscale-auto-sorted", "mixedscale-auto-unsorted",
                 "mixedscale-fast-sorted", *PEERS, "single-fast", "single-statsmodels",
                 "single-smf"),
        peer_specs=4 if quick else 8, single_spec=single,
    )


def tiny(quick: bool) -> Suite:
    specs = (ms.ModelSpec("y ~ x", groups="g", name="random_intercept"),)
    truth = {"fixed": {"Intercept": 1.0, "x": 0.5}, "sd_intercept": 1.0, "sd_residual": 1.0,
             "design": "5 groups x 4 rows per unit"}
    return Suite(
        name="tiny", key="unit", n_slices=200 if quick else 100_000, rows_per_slice=20,
        row_group_rows=1000 if quick else 100_000, specs=specs, truth=truth,
        runners=(*_ms_runners(engines=False), *PEERS),
        optional_runners=("mixedscale-statsmodels-sorted",),
        peer_slices={"pandas-loop": 50 if quick else 2000, "process-pool": 100 if quick else 4000,
                     "dask-groupby": 100 if quick else 4000, "lme4": 50 if quick else 1000},
    )


def big(quick: bool) -> Suite:
    """About 5 GB of Parquet (full): 800 sites x 250,000 rows, written in chunks."""
    specs = (ms.ModelSpec("y ~ x + z", groups="g", name="random_intercept"),)
    truth = {"fixed": {"Intercept": 1.0, "x": 0.5, "z": -0.3}, "sd_intercept": 1.0,
             "sd_residual": 1.0, "design": "1,000 groups x 250 rows per site"}
    return Suite(
        name="big", key="site", n_slices=8 if quick else 800,
        rows_per_slice=5000 if quick else 250_000, row_group_rows=5000 if quick else 250_000,
        specs=specs, truth=truth, runners=("mixedscale-auto-sorted", "mixedscale-auto-unsorted",
                                           *PEERS),
        peer_slices={"pandas-loop": 2 if quick else 4, "process-pool": 4 if quick else 8,
                     "dask-groupby": 4 if quick else 8, "lme4": 2 if quick else 4},
        files=2 if quick else 20, chunk_rows=10_000 if quick else 4_000_000,
        cluster={"workers": 2, "memory_limit": "1.5GB", "time_limit": 120 if quick else 1200},
    )


_MAKERS = {"genes": genes, "sites": sites, "multiverse": multiverse, "tiny": tiny, "big": big}


def get_suite(name: str, quick: bool = False) -> Suite:
    if name not in _MAKERS:
        raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return _MAKERS[name](quick)
