"""Golden master: every lme4 reference fit in shared/refdata, on every engine.

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
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mixedscale
from mixedscale import ModelSpec


def _refdata_dir() -> Path:
    env = os.environ.get("MIXEDSCALE_REFDATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "refdata"


REFDATA = _refdata_dir()
CASE_FILES = sorted((REFDATA / "lme4").glob("*.json")) if REFDATA.is_dir() else []
ENGINES = ("auto", "fast", "statsmodels")

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


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("name", CASES)
def test_status_and_loglik(name: str, engine: str) -> None:
    case, res = _case(name), _fit(name, engine)
    assert res.status == "ok", res.fit["error_message"]
    assert res.fit["n_obs"] == case["nobs"]
    assert res.fit["llf"] >= case["loglik"] - LLF_TOL, (res.fit["llf"], case["loglik"])
    if engine != "auto":
        assert res.fit["engine"] == engine


@pytest.mark.parametrize("name", CASES)
def test_fixed_effects(name: str, engine: str) -> None:
    case, res = _case(name), _fit(name, engine)
    data = _data(case["data"])
    ours = dict(zip(res.params["term"], res.params["estimate"], strict=True))
    assert len(ours) == len(case["fixef_names"])
    for lname, ref in zip(case["fixef_names"], case["fixef"], strict=True):
        term = _patsy_name(lname, data)
        assert term in ours, f"{lname!r} -> {term!r} not in {sorted(ours)}"
        assert abs(ours[term] - ref) <= FE_RTOL * abs(ref), (term, ours[term], ref)


@pytest.mark.parametrize("name", CASES)
def test_fixed_effect_std_errors(name: str, engine: str) -> None:
    case, res = _case(name), _fit(name, engine)
    data = _data(case["data"])
    ours = dict(zip(res.params["term"], res.params["std_error"], strict=True))
    rtol = SE_RTOL[res.fit["engine"]]
    for lname, ref in zip(case["fixef_names"], case["fixef_se"], strict=True):
        term = _patsy_name(lname, data)
        assert abs(ours[term] - ref) <= rtol * abs(ref), (term, ours[term], ref, rtol)


@pytest.mark.parametrize("name", CASES)
def test_variance_components(name: str, engine: str) -> None:
    case, res = _case(name), _fit(name, engine)
    spec = _spec(case, engine)
    ours = _our_vc(res)
    ref_rows = list(zip(case["vc_grp"], case["vc_var1"], case["vc_var2"], case["vc_vcov"],
                        strict=True))
    ref = {_lme4_vc_key(case, spec, g, v1, v2): float(x) for g, v1, v2, x in ref_rows}
    assert set(ours) == set(ref), f"variance rows differ: ours {sorted(ours)} lme4 {sorted(ref)}"
    sigma2 = ref[("Residual", "residual", frozenset())]
    variances = {k: v for k, v in ref.items() if len(k[2]) <= 1}
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
def test_singular_flag(name: str, engine: str) -> None:
    case, res = _case(name), _fit(name, engine)
    assert res.fit["singular"] is bool(case["singular"])
    if case["singular"]:
        assert any("singular" in w for w in res.fit["warnings"])


@pytest.mark.parametrize("name", CASES)
def test_tables_are_finite(name: str, engine: str) -> None:
    res = _fit(name, engine)
    assert np.isfinite(res.params[["estimate", "std_error"]].to_numpy(dtype=float)).all()
    assert np.isfinite(res.variance["estimate"].to_numpy(dtype=float)).all()
    assert res.fit["scale"] == pytest.approx(
        float(res.variance.loc[res.variance["kind"] == "residual", "estimate"].iloc[0]))
