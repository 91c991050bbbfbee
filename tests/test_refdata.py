"""Golden master: every lme4 reference fit in shared/refdata, on every engine, and
through ``fit_many`` on a real cluster (the batched engine wherever the spec allows it).

Tolerances are the ones refdata/README.md states for a correct fit: llf within
1e-4 of lme4 (or higher), fixed effects 1e-5 relative, their standard errors
1e-4 relative (5e-4 for the statsmodels engine), variance components 1e-3
relative (a variance near zero in absolute terms, scaled by the residual
variance), and lme4's isSingular flag.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mixedscale
from mixedscale import ModelSpec
from mixedscale.batch import MIN_BATCH


def _refdata_dir() -> Path:
    env = os.environ.get("MIXEDSCALE_REFDATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "refdata"


REFDATA = _refdata_dir()
CASE_FILES = sorted((REFDATA / "lme4").glob("*.json")) if REFDATA.is_dir() else []
ENGINES = ("auto", "fast", "statsmodels")
# fit_many fits REPLICATES copies of each case's data, split by a replicate column, so
# the batched engine fits the copies together as it fits a job's slices.
REPLICATES = MIN_BATCH  # fewer slices of one spec are fitted one by one

if CASE_FILES:
    CASES = [pytest.param(p.stem, id=p.stem) for p in CASE_FILES]
else:
    CASES = [pytest.param(None, marks=pytest.mark.skip(
        reason=f"lme4 reference data not found at {REFDATA}/lme4/*.json "
               "(set MIXEDSCALE_REFDATA to the refdata directory)"))]

LLF_TOL = 1e-4
FE_RTOL = 1e-5
SE_RTOL = {"fast": 1e-4, "statsmodels": 5e-4}
VC_RTOL = 1e-3
NEAR_ZERO = 1e-3  # a variance below this fraction of the residual variance counts as near zero


@cache
def _case(name: str) -> dict[str, Any]:
    return json.loads((REFDATA / "lme4" / f"{name}.json").read_text())


@cache
def _data(name: str) -> pd.DataFrame:
    return pd.read_parquet(REFDATA / f"{name}.parquet")


def _spec(case: dict[str, Any], engine: str) -> ModelSpec:
    s = case["spec"]
    return ModelSpec(
        s["formula"], groups=s.get("groups"), re_formula=s.get("re_formula"),
        vc_formula=s.get("vc_formula"), cov_structure=s.get("cov_structure", "unstructured"),
        reml=bool(case["reml"]), engine=engine, name=case["case"],
    )


@cache
def _fit(name: str, engine: str) -> mixedscale.FitResult:
    case = _case(name)
    return mixedscale.fit(_data(case["data"]), _spec(case, engine))


_RUNS: dict[str, list[mixedscale.FitResult]] = {}


def _fit_many(name: str, client: Any) -> list[mixedscale.FitResult]:
    """Every replicate's fit through fit_many, from Parquet to a store and back."""
    if name not in _RUNS:
        case = _case(name)
        data = _data(case["data"])
        stacked = pd.concat([data.assign(replicate=r) for r in range(REPLICATES)],
                            ignore_index=True)
        with tempfile.TemporaryDirectory() as tmp:
            stacked.to_parquet(f"{tmp}/data.parquet", index=False)
            res = mixedscale.fit_many(f"{tmp}/data.parquet", _spec(case, "auto"),
                                      split_by="replicate", store=f"{tmp}/store",
                                      client=client, progress=False)
        assert len(res.fits) == REPLICATES
        out = []
        for row in res.fits.sort_values("replicate").to_dict("records"):
            params = res.params[res.params["fit_id"] == row["fit_id"]].reset_index(drop=True)
            variance = res.variance[res.variance["fit_id"] == row["fit_id"]]
            out.append(mixedscale.FitResult(fit={str(k): v for k, v in row.items()},
                                            params=params,
                                            variance=variance.reset_index(drop=True)))
        _RUNS[name] = out
    return _RUNS[name]


def _results(name: str, route: str, request: pytest.FixtureRequest
             ) -> list[mixedscale.FitResult]:
    if route == "fit_many":
        return _fit_many(name, request.getfixturevalue("cluster_client"))
    return [_fit(name, route)]


def _patsy_name(lme4_name: str, data: pd.DataFrame) -> str:
    """lme4's coefficient name ("SexMale", "age:SexMale") as patsy writes it."""
    parts = []
    for part in lme4_name.split(":"):
        if part == "(Intercept)":
            parts.append("Intercept")
            continue
        if part in data.columns:
            parts.append(part)
            continue
        hits = []
        for col in data.columns:
            s = data[col]
            if part.startswith(col) and not pd.api.types.is_numeric_dtype(s):
                level = part[len(col):]
                if level in set(s.dropna().astype(str)):
                    hits.append(f"{col}[T.{level}]")
        assert len(hits) == 1, f"cannot map lme4 term {lme4_name!r} ({part!r}): {hits}"
        parts.append(hits[0])
    return ":".join(parts)


def _term(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    return "Intercept" if v == "(Intercept)" else str(v)


def _lme4_vc_key(case: dict[str, Any], spec: ModelSpec, grp: str, v1: Any, v2: Any) -> tuple:
    """Our variance-table key (group, kind, terms) for one row of lme4's VarCorr."""
    if grp == "Residual":
        return ("Residual", "residual", frozenset())
    terms = frozenset(t for t in (_term(v1), _term(v2)) if t is not None)
    base = re.sub(r"\.\d+$", "", grp)  # lme4 numbers the terms of (x || g): g, g.1, ...
    groups = spec.groups
    if base == groups:
        return (groups, "re", terms)
    inner = base[len(groups) + 1:] if groups and base.startswith(groups + ":") else base
    names = [k for k in (spec.vc_formula or {})
             if k == inner or inner in spec.parsed[f"vc:{k}"].names]
    assert len(names) == 1, f"cannot map lme4 group {grp!r} to a vc of {spec.vc_formula}"
    return (names[0], "vc", frozenset({"Intercept"}))


def _our_vc(res: mixedscale.FitResult) -> dict[tuple, float]:
    out = {}
    for row in res.variance.itertuples(index=False):
        terms = frozenset(t for t in (_term(row.term1), _term(row.term2)) if t is not None)
        key = (str(row.group), str(row.kind), terms)
        assert key not in out, f"duplicate variance row {key}"
        out[key] = float(row.estimate)
    return out


@pytest.fixture(params=(*ENGINES, "fit_many"))
def route(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("name", CASES)
def test_status_and_loglik(name: str, route: str, request: pytest.FixtureRequest) -> None:
    case = _case(name)
    for res in _results(name, route, request):
        assert res.status == "ok", res.fit["error_message"]
        assert res.fit["n_obs"] == case["nobs"]
        assert res.fit["llf"] >= case["loglik"] - LLF_TOL, (res.fit["llf"], case["loglik"])
        if route in ("fast", "statsmodels"):
            assert res.fit["engine"] == route


@pytest.mark.parametrize("name", CASES)
def test_fit_many_batches_what_it_can(name: str, cluster_client: Any) -> None:
    """The fit_many route is the batched engine's golden master: every spec it can take
    (no variance components) is fitted there, not by the per-fit fallback."""
    from mixedscale.batch import batchable

    case = _case(name)
    expected = "newton-batch" if batchable(_spec(case, "auto")) else None
    for res in _fit_many(name, cluster_client):
        if expected:
            assert res.fit["method"] == expected, res.fit["method"]
        else:
            assert res.fit["method"] != "newton-batch"


@pytest.mark.parametrize("name", CASES)
def test_fixed_effects(name: str, route: str, request: pytest.FixtureRequest) -> None:
    case = _case(name)
    data = _data(case["data"])
    for res in _results(name, route, request):
        ours = dict(zip(res.params["term"], res.params["estimate"], strict=True))
        assert len(ours) == len(case["fixef_names"])
        for lname, ref in zip(case["fixef_names"], case["fixef"], strict=True):
            term = _patsy_name(lname, data)
            assert term in ours, f"{lname!r} -> {term!r} not in {sorted(ours)}"
            assert abs(ours[term] - ref) <= FE_RTOL * abs(ref), (term, ours[term], ref)


@pytest.mark.parametrize("name", CASES)
def test_fixed_effect_std_errors(name: str, route: str, request: pytest.FixtureRequest
                                 ) -> None:
    case = _case(name)
    data = _data(case["data"])
    for res in _results(name, route, request):
        ours = dict(zip(res.params["term"], res.params["std_error"], strict=True))
        rtol = SE_RTOL[res.fit["engine"]]
        for lname, ref in zip(case["fixef_names"], case["fixef_se"], strict=True):
            term = _patsy_name(lname, data)
            assert abs(ours[term] - ref) <= rtol * abs(ref), (term, ours[term], ref, rtol)


@pytest.mark.parametrize("name", CASES)
def test_variance_components(name: str, route: str, request: pytest.FixtureRequest) -> None:
    case = _case(name)
    spec = _spec(case, "auto")
    ref_rows = list(zip(case["vc_grp"], case["vc_var1"], case["vc_var2"], case["vc_vcov"],
                        strict=True))
    ref = {_lme4_vc_key(case, spec, g, v1, v2): float(x) for g, v1, v2, x in ref_rows}
    sigma2 = ref[("Residual", "residual", frozenset())]
    variances = {k: v for k, v in ref.items() if len(k[2]) <= 1}
    for res in _results(name, route, request):
        ours = _our_vc(res)
        assert set(ours) == set(ref), f"variance rows: ours {sorted(ours)} lme4 {sorted(ref)}"
        for key, r in ref.items():
            if len(key[2]) == 2:  # a covariance: near zero on the scale of its two SDs
                t1, t2 = sorted(key[2])
                scale = math.sqrt(variances[(key[0], key[1], frozenset({t1}))]
                                  * variances[(key[0], key[1], frozenset({t2}))])
            else:
                scale = sigma2
            tol = VC_RTOL * max(abs(r), NEAR_ZERO * scale)
            assert abs(ours[key] - r) <= tol, (key, ours[key], r, tol)


@pytest.mark.parametrize("name", CASES)
def test_singular_flag(name: str, route: str, request: pytest.FixtureRequest) -> None:
    case = _case(name)
    for res in _results(name, route, request):
        singular = res.fit["singular"]
        if route == "fit_many":  # a table cell: numpy's bool
            assert singular is not None and not pd.isna(singular)
            singular = bool(singular)
        assert singular is bool(case["singular"])
        if case["singular"]:
            assert any("singular" in w for w in res.fit["warnings"])


@pytest.mark.parametrize("name", CASES)
def test_tables_are_finite(name: str, route: str, request: pytest.FixtureRequest) -> None:
    for res in _results(name, route, request):
        assert np.isfinite(res.params[["estimate", "std_error"]].to_numpy(dtype=float)).all()
        assert np.isfinite(res.variance["estimate"].to_numpy(dtype=float)).all()
        assert res.fit["scale"] == pytest.approx(
            float(res.variance.loc[res.variance["kind"] == "residual", "estimate"].iloc[0]))
