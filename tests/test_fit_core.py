"""mixedscale.fit on one DataFrame: the NBA example, forced non-convergence,
pathological inputs (never raise, always say why), and the record's shape."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

import mixedscale
from mixedscale import DataError, ModelSpec, SpecError
from mixedscale.single import FIT_COLUMNS, PARAM_COLUMNS, VARIANCE_COLUMNS

ENGINES = ("auto", "fast", "statsmodels")
SM_METHODS = ("lbfgs", "bfgs", "powell", "nm")


@pytest.fixture
def nba() -> pd.DataFrame:
    """The example job's data (jobs/make_data.py writes it)."""
    return pd.read_parquet(Path(__file__).resolve().parents[1] / "jobs" / "data" / "nba.parquet")


def _panel(seed: int = 0, n_groups: int = 12, size: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), size)
    x = rng.normal(size=g.size)
    u0 = rng.normal(size=n_groups)
    u1 = 0.5 * rng.normal(size=n_groups)
    y = 1.0 + 0.8 * x + u0[g] + u1[g] * x + rng.normal(scale=0.7, size=g.size)
    return pd.DataFrame({"y": y, "x": x, "z": rng.normal(size=g.size),
                         "g": [f"s{i:02d}" for i in g]})


def _sm_reference(df: pd.DataFrame, formula: str, groups: str, reml: bool = True):
    """statsmodels' own fit; if it does not converge, its best llf across methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm(formula, df, groups=groups)
        res = model.fit(reml=reml)
        if res.converged:
            return res
        fits = []
        for m in SM_METHODS:
            try:
                fits.append(model.fit(reml=reml, method=m))
            except (ValueError, np.linalg.LinAlgError):
                continue
        return max(fits, key=lambda r: r.llf)


def _assert_record_shape(res: mixedscale.FitResult) -> None:
    assert list(res.fit) == FIT_COLUMNS
    assert list(res.params.columns) == PARAM_COLUMNS
    assert list(res.variance.columns) == VARIANCE_COLUMNS
    assert res.fit["n_attempts"] == len(res.fit["attempts"])


# -- the NBA example -------------------------------------------------------------------


def test_nba_wrong_case_column_names_raise_with_suggestion(nba: pd.DataFrame) -> None:
    spec = ModelSpec("points ~ minutes", groups="team")
    with pytest.raises(SpecError) as exc:
        mixedscale.fit(nba, spec)
    msg = str(exc.value)
    assert "no column 'points'" in msg
    assert "did you mean 'Points'" in msg
    assert msg.endswith("\n    points ~ minutes\n    ^^^^^^")  # the token, marked


def test_unknown_column_mark_finds_the_whole_token(nba: pd.DataFrame) -> None:
    with pytest.raises(SpecError) as exc:
        mixedscale.fit(nba, ModelSpec("Points ~ np.log(Minutes) + min", groups="Team"))
    assert str(exc.value).endswith("np.log(Minutes) + min\n" + " " * 31 + "^^^")


def test_nba_wrong_case_groups_raise_with_suggestion(nba: pd.DataFrame) -> None:
    with pytest.raises(SpecError, match=r"no column 'team'.*did you mean 'Team'"):
        mixedscale.fit(nba, ModelSpec("Points ~ Minutes", groups="team"))


@pytest.mark.parametrize("engine", ENGINES)
def test_nba_matches_statsmodels(nba: pd.DataFrame, engine: str) -> None:
    res = mixedscale.fit(nba, ModelSpec("Points ~ Minutes", groups="Team", engine=engine))
    assert res.status == "ok", res.fit["error_message"]
    _assert_record_shape(res)
    ref = _sm_reference(nba, "Points ~ Minutes", "Team")
    ours = dict(zip(res.params["term"], res.params["estimate"], strict=True))
    assert set(ours) == set(ref.fe_params.index)
    for term, value in ref.fe_params.items():
        assert ours[term] == pytest.approx(value, rel=1e-4), term
    assert res.fit["llf"] >= ref.llf - 1e-4
    assert res.fit["llf"] == pytest.approx(ref.llf, abs=1e-4)
    re_var = res.variance.query("kind == 're'")["estimate"].iloc[0]
    assert re_var == pytest.approx(float(ref.cov_re.iloc[0, 0]), rel=1e-3)
    assert res.fit["scale"] == pytest.approx(ref.scale, rel=1e-3)
    assert res.fit["n_obs"] == 10 and res.fit["n_groups"] == 2 and res.fit["n_dropped"] == 0


def test_nba_ml_matches_statsmodels(nba: pd.DataFrame) -> None:
    res = mixedscale.fit(nba, ModelSpec("Points ~ Minutes", groups="Team", reml=False))
    ref = _sm_reference(nba, "Points ~ Minutes", "Team", reml=False)
    assert res.status == "ok"
    assert res.fit["llf"] >= ref.llf - 1e-4
    ours = dict(zip(res.params["term"], res.params["estimate"], strict=True))
    for term, value in ref.fe_params.items():
        assert ours[term] == pytest.approx(value, rel=1e-4), term


# -- forced non-convergence ------------------------------------------------------------


def _assert_not_converged(res: mixedscale.FitResult, engines: set[str]) -> None:
    _assert_record_shape(res)
    assert res.status == "not_converged", res
    assert res.fit["converged"] is False
    assert res.fit["n_attempts"] >= 1
    assert {a["engine"] for a in res.fit["attempts"]} <= engines
    firsts = {}
    for a in res.fit["attempts"]:
        firsts.setdefault(a["engine"], a["method"])
    assert set(firsts.values()) == {"lbfgs"}  # each engine starts with the one optimizer
    assert res.fit["error_message"].startswith("not verified")
    assert np.isfinite(res.fit["llf"])
    assert len(res.params) > 0  # a not_converged fit still reports where it stopped


def test_forced_non_convergence_auto(nba: pd.DataFrame) -> None:
    spec = ModelSpec("Points ~ Minutes", groups="Team", maxiter=1, optimizers=("lbfgs",))
    res = mixedscale.fit(nba, spec)
    _assert_not_converged(res, {"fast", "statsmodels"})
    # auto escalates to statsmodels when the fast engine cannot verify.
    assert res.fit["attempts"][0]["engine"] == "fast"
    assert res.fit["attempts"][-1]["engine"] == "statsmodels"


def test_forced_non_convergence_fast(nba: pd.DataFrame) -> None:
    spec = ModelSpec("Points ~ Minutes", groups="Team", maxiter=1, optimizers=("lbfgs",),
                     engine="fast")
    res = mixedscale.fit(nba, spec)
    _assert_not_converged(res, {"fast"})
    assert "did not report convergence" in res.fit["error_message"]


def test_forced_non_convergence_statsmodels() -> None:
    spec = ModelSpec("y ~ x", groups="g", re_formula="x", maxiter=1, optimizers=("lbfgs",),
                     engine="statsmodels")
    res = mixedscale.fit(_panel(), spec)
    _assert_not_converged(res, {"statsmodels"})


def test_forced_non_convergence_statsmodels_nba(nba: pd.DataFrame) -> None:
    spec = ModelSpec("Points ~ Minutes", groups="Team", maxiter=1, optimizers=("bfgs",),
                     engine="statsmodels")
    res = mixedscale.fit(nba, spec)
    assert res.status == "not_converged", res
    assert res.fit["attempts"][0]["engine"] == "statsmodels"


def test_statsmodels_lbfgs_crash_is_recorded_not_raised(nba: pd.DataFrame) -> None:
    # statsmodels' lbfgs steps to cov_re == 0 on this data and raises LinAlgError in its
    # score; the engine records the failed attempt instead of raising.
    spec = ModelSpec("Points ~ Minutes", groups="Team", maxiter=1, optimizers=("lbfgs",),
                     engine="statsmodels")
    res = mixedscale.fit(nba, spec)
    _assert_record_shape(res)
    assert res.status in {"not_converged", "error"}
    assert res.fit["n_attempts"] == 1
    if res.status == "error":
        assert res.fit["error_message"]
        assert res.fit["attempts"][0]["message"]


def test_attempt_llfs_are_on_the_reported_scale(nba: pd.DataFrame) -> None:
    res = mixedscale.fit(nba, ModelSpec("Points ~ Minutes", groups="Team", engine="statsmodels"))
    assert res.status == "ok"
    best = [a for a in res.fit["attempts"] if a["method"] == res.fit["method"]][-1]
    assert best["llf"] == pytest.approx(res.fit["llf"], abs=1e-8)


# -- pathological inputs: an error record that says why, never an exception -----------


def _fit_error(df: pd.DataFrame, spec: ModelSpec) -> mixedscale.FitResult:
    res = mixedscale.fit(df, spec)  # must not raise
    _assert_record_shape(res)
    assert res.status in {"error", "not_converged"}, res
    assert res.fit["error_message"]
    assert res.fit["error_type"] or res.status == "not_converged"
    return res


def test_collinear_fixed_effects() -> None:
    df = _panel()
    df["x2"] = 2 * df["x"] - 1
    res = _fit_error(df, ModelSpec("y ~ x + x2", groups="g"))
    assert res.status == "error"
    assert "rank deficient" in res.fit["error_message"]
    assert "'x2'" in res.fit["error_message"]
    assert res.params.empty and res.variance.empty


def test_single_group() -> None:
    df = _panel().assign(g="only")
    res = _fit_error(df, ModelSpec("y ~ x", groups="g"))
    assert "only one group" in res.fit["error_message"]
    assert res.fit["n_groups"] == 1


def test_constant_response() -> None:
    df = _panel().assign(y=3.5)
    res = _fit_error(df, ModelSpec("y ~ x", groups="g"))
    assert "constant" in res.fit["error_message"]


def test_all_nan_column() -> None:
    df = _panel().assign(z=np.nan)
    res = _fit_error(df, ModelSpec("y ~ x + z", groups="g"))
    assert "'z'" in res.fit["error_message"] and "missing" in res.fit["error_message"]
    assert res.fit["n_obs"] == 0


def test_empty_dataframe() -> None:
    df = _panel().iloc[:0]
    res = _fit_error(df, ModelSpec("y ~ x", groups="g"))
    assert "no rows" in res.fit["error_message"]
    assert res.fit["n_obs"] == 0


def test_empty_dataframe_without_columns_is_an_input_error() -> None:
    with pytest.raises(SpecError, match="no column 'y'"):
        mixedscale.fit(pd.DataFrame(), ModelSpec("y ~ x", groups="g"))


@pytest.mark.parametrize("column", ["y", "x", "z"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_values(column: str, value: float) -> None:
    df = _panel()
    df.loc[3, column] = value
    res = _fit_error(df, ModelSpec("y ~ x + z", groups="g"))
    assert res.status == "error"
    assert f"column {column!r}" in res.fit["error_message"]
    assert "infinite" in res.fit["error_message"]


def test_factor_response() -> None:
    # An input error, as fit_many's planner says it: raised, not an error row.
    df = _panel()
    df["y"] = np.where(df["y"] > 1, "hi", "lo")
    with pytest.raises(DataError, match=r"the response must be numeric; got \(y=text\)"):
        mixedscale.fit(df, ModelSpec("y ~ x", groups="g"))


@pytest.mark.parametrize("re_formula", [None, "x"])
def test_unidentifiable_random_effects(re_formula: str | None) -> None:
    # One observation per group: the random effects interpolate the data (lme4 refuses).
    df = _panel(n_groups=12, size=1)
    res = _fit_error(df, ModelSpec("y ~ x", groups="g", re_formula=re_formula))
    assert "unidentifiable" in res.fit["error_message"]


def test_more_random_effects_than_observations() -> None:
    df = _panel(n_groups=5, size=2)  # 10 rows, 5 groups x 2 random effects
    res = _fit_error(df, ModelSpec("y ~ x", groups="g", re_formula="x"))
    assert "n_random_effects=10" in res.fit["error_message"]


def test_random_effects_interpolating_the_data() -> None:
    # 4 rows, 3 groups: intercept, slope and 3 random intercepts span the data, so the
    # residual variance can shrink to 0 (an unbounded ML likelihood).
    df = pd.DataFrame({"y": [1.0, 2.5, 2.0, 4.0], "x": [0.1, 0.7, 0.3, 0.9],
                       "g": ["a", "b", "b", "c"]})
    for reml in (True, False):
        res = _fit_error(df, ModelSpec("y ~ x", groups="g", reml=reml))
        assert "no residual degrees of freedom" in res.fit["error_message"]
    ok = mixedscale.fit(pd.concat([df, df.assign(y=df["y"] + 0.3)]), ModelSpec("y ~ x",
                                                                               groups="g"))
    assert ok.status == "ok", ok


def test_too_few_rows_for_fixed_effects() -> None:
    df = _panel(n_groups=3, size=2)
    df["c"] = [f"c{i}" for i in range(len(df))]
    res = _fit_error(df, ModelSpec("y ~ C(c)", groups="g"))
    assert res.status == "error"


def test_missing_rows_are_dropped_and_counted() -> None:
    df = _panel()
    n = len(df)
    df.loc[[1, 7, 30], "x"] = np.nan
    df.loc[11, "y"] = np.nan
    df.loc[[7, 40], "g"] = None  # row 7 already counted
    df.loc[[2, 5], "unused"] = np.nan  # a column the model does not use drops nothing
    res = mixedscale.fit(df, ModelSpec("y ~ x", groups="g"))
    assert res.status == "ok", res
    assert res.fit["n_dropped"] == 5
    assert res.fit["n_obs"] == n - 5
    clean = mixedscale.fit(df.dropna(subset=["y", "x", "g"]), ModelSpec("y ~ x", groups="g"))
    assert clean.fit["n_dropped"] == 0
    assert clean.fit["llf"] == pytest.approx(res.fit["llf"], abs=1e-9)


def test_nullable_dtypes_with_missing_values() -> None:
    df = _panel()
    df["x"] = pd.array(np.round(df["x"].to_numpy() * 10), dtype="Int64")
    df.loc[4, "x"] = pd.NA
    df["y"] = pd.array(df["y"].to_numpy(), dtype="Float64")
    df.loc[9, "y"] = pd.NA
    res = mixedscale.fit(df, ModelSpec("y ~ x", groups="g"))
    assert res.status == "ok", res
    assert res.fit["n_dropped"] == 2


# -- the record ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_record_and_tables(engine: str) -> None:
    spec = ModelSpec("y ~ x + z", groups="g", re_formula="x", engine=engine, name="panel")
    res = mixedscale.fit(_panel(), spec)
    assert res.status == "ok", res
    _assert_record_shape(res)
    f = res.fit
    assert f["spec_id"] == spec.spec_id and f["spec_name"] == "panel"
    assert f["converged"] is True and f["hessian_pd"] is True
    assert f["grad_max"] <= 2e-3
    assert f["n_obs"] == 72 and f["n_groups"] == 12
    assert f["group_size_min"] == f["group_size_max"] == 6 and f["group_size_mean"] == 6.0
    assert len(f["theta"]) == 3
    n_par = 3 + 3 + 1
    assert f["aic"] == pytest.approx(-2 * f["llf"] + 2 * n_par)
    assert f["bic"] == pytest.approx(-2 * f["llf"] + np.log(72) * n_par)
    for key in ("mixedscale_version", "statsmodels_version", "numpy_version", "scipy_version"):
        assert isinstance(f[key], str) and f[key]
    p = res.params
    assert list(p["term"]) == ["Intercept", "x", "z"]
    assert np.allclose(p["statistic"], p["estimate"] / p["std_error"])
    assert ((p["p_value"] >= 0) & (p["p_value"] <= 1)).all()
    assert (p["conf_low"] < p["estimate"]).all() and (p["estimate"] < p["conf_high"]).all()
    v = res.variance
    assert list(v["kind"]) == ["re", "re", "re", "residual"]
    assert list(v["group"]) == ["g", "g", "g", "Residual"]
    assert list(v["term1"][:3]) == ["Intercept", "x", "Intercept"]
    assert v["term2"].iloc[2] == "x"


def test_error_record_has_every_column() -> None:
    res = mixedscale.fit(_panel().assign(y=1.0), ModelSpec("y ~ x", groups="g"))
    _assert_record_shape(res)
    assert res.fit["status"] == "error"
    assert res.fit["llf"] is None and res.fit["converged"] is False
    assert res.fit["error_type"] == "ModelFailure"
    assert repr(res).startswith("FitResult(")


def test_vc_without_groups_crossed() -> None:
    rng = np.random.default_rng(3)
    a = np.repeat(np.arange(8), 6)
    b = np.tile(np.arange(6), 8)
    y = rng.normal(size=8)[a] + 0.7 * rng.normal(size=6)[b] + rng.normal(scale=0.5, size=48)
    df = pd.DataFrame({"y": y, "a": a.astype(str), "b": b.astype(str)})
    spec = ModelSpec("y ~ 1", vc_formula={"a": "0 + C(a)", "b": "0 + C(b)"})
    res = mixedscale.fit(df, spec)
    assert res.status == "ok", res
    assert sorted(res.variance["group"]) == ["Residual", "a", "b"]
    assert set(res.variance["kind"]) == {"vc", "residual"}


def test_design_matrices_shared_only_with_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Specs of one task that share a formula build X once (worker frames are never
    changed during a task); without a source, every call builds afresh."""
    import mixedscale.design as design

    calls: list[str] = []
    real = design._matrix

    def spy(formula, *args, **kwargs):
        calls.append(formula)
        return real(formula, *args, **kwargs)

    monkeypatch.setattr(design, "_matrix", spy)
    from .conftest import make_genes

    df = make_genes(n_genes=1, n_subjects=12, seed=2)
    specs = [ModelSpec("y ~ time", groups="subject", reml=r) for r in (True, False)]
    specs.append(ModelSpec("y ~ time", groups="subject", re_formula="~time"))
    designs = [design.build_design(df, s, source=df) for s in specs]
    assert len(calls) == 3  # X once; Z for "1" and for "~time"
    assert designs[0].X is designs[1].X and not designs[0].X.flags.writeable
    calls.clear()
    for s in specs:
        design.build_design(df, s)
    assert len(calls) == 6
    # The shared design gives the same fits as building afresh.
    from mixedscale.single import fit_shared

    for s in specs:
        a, b = fit_shared(df, s, df), mixedscale.fit(df, s)
        assert a.fit["llf"] == pytest.approx(b.fit["llf"], abs=1e-9)


def test_statsmodels_engine_at_a_lower_optimum_is_not_ok() -> None:
    # statsmodels passes every check at a singular local optimum 0.16 below the maximum
    # (found by an audit; brute force agrees with the fast engine's -28.4733).
    df = pd.DataFrame({
        "g": [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4],
        "x": [1.2093, -1.5201, -0.3659, 0.0875, -0.6735, -0.3122, -0.2635, 0.6564, -1.051,
              -0.2952, -0.6036, -0.2461, 0.0474, -0.1726, -0.4265, 0.7426, 1.6626, -0.233,
              1.0204],
        "y": [0.9289, 2.0105, 3.3371, 0.773, 1.3496, 2.3643, 0.9383, 3.383, -1.1353, 0.3824,
              0.8456, 0.4608, -0.9466, 0.3835, 2.0531, 2.0056, 4.0431, 0.5432, 2.8567]})
    spec = ModelSpec("y ~ x", groups="g", re_formula="~x", reml=True)
    sm = mixedscale.fit(df, spec.replace(engine="statsmodels")).fit
    assert sm["status"] == "not_converged" and "a local optimum" in sm["error_message"]
    assert "fast" in {a["engine"] for a in sm["attempts"]}  # the cross-check is recorded
    for engine in ("auto", "fast"):
        rec = mixedscale.fit(df, spec.replace(engine=engine)).fit
        assert rec["status"] == "ok" and rec["llf"] == pytest.approx(-28.473289, abs=1e-5)


# From an audit against a 50-start brute-force optimum of an independent deviance: the
# optimizers stop at an interior optimum (llf -23.724464) that passes every check, 0.07
# below the boundary one. fit() now also runs a vectorized Newton from a bank of starts.
_BOUNDARY_BEST = pd.DataFrame({
    "g": [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4],
    "x": [1.405, -1.332, 0.296, 0.244, 0.97, 1.237, 0.703, 1.294, -0.471, -0.806, -1.429,
          -0.738, -0.866, 1.044, 0.369, -0.255, 1.729, 0.425],
    "y": [3.997, -0.062, 0.78, -0.407, 1.407, -0.661, 0.498, 2.223, 1.332, 0.097, 0.123,
          0.799, 0.399, 1.603, 2.329, 0.028, 2.542, 1.512]})


@pytest.mark.parametrize("engine", ["fast", "auto"])
def test_fit_restarts_find_the_boundary_optimum_the_optimizers_miss(engine: str) -> None:
    spec = ModelSpec("y ~ x", groups="g", re_formula="~x", reml=False,
                     cov_structure="diagonal", engine=engine)
    res = mixedscale.fit(_BOUNDARY_BEST, spec)
    assert res.status == "ok", res
    assert res.fit["llf"] == pytest.approx(-23.654348, abs=1e-5)
    assert res.fit["singular"]
    assert any(a["llf"] < res.fit["llf"] - 0.05 for a in res.fit["attempts"])  # the miss


@pytest.mark.parametrize("optimizer", ["lbfgs", "bfgs", "powell", "nm"])
def test_statsmodels_gets_only_arguments_it_uses(optimizer: str) -> None:
    # statsmodels 0.15 drops (and later versions will raise on) arguments MixedLM.fit
    # does not pass on, e.g. lbfgs's pgtol and factr.
    spec = ModelSpec("y ~ x", groups="g", re_formula="x", engine="statsmodels",
                     optimizers=(optimizer,))
    res = mixedscale.fit(_panel(), spec)
    assert not [w for w in res.fit["warnings"] if "not used by MixedLM.fit" in w]


def test_a_point_that_passes_lme4s_checks_is_ok_whatever_the_optimizer_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # statsmodels' Nelder-Mead can stop at its iteration limit on a verified optimum
    # (it did for 5 of 2,000 genes, depending on the data's row order).
    from mixedscale import engines

    real = engines._finish

    def unflagged(*args: object) -> engines.Attempt:
        att = real(*args)  # type: ignore[arg-type]
        att.converged = False
        return att

    monkeypatch.setattr(engines, "_finish", unflagged)
    res = mixedscale.fit(_panel(), ModelSpec("y ~ x", groups="g", re_formula="x",
                                             engine="statsmodels"))
    assert res.status == "ok", res
    assert res.fit["converged"] is False
    assert any(a["engine"] == "fast" for a in res.fit["attempts"])  # cross-checked


def test_result_types_do_not_depend_on_the_covariance_structure() -> None:
    df = _panel(seed=3)
    tables = [mixedscale.fit(df, ModelSpec("y ~ x", groups="g", re_formula="~x",
                                           cov_structure=cs))
              for cs in ("unstructured", "diagonal")]
    for r in tables:
        assert r.status == "ok", r.fit
        assert r.variance["term2"].dtype == r.variance["term1"].dtype == "str"
        assert all(type(r.fit[k]) is float for k in ("llf", "aic", "bic", "scale"))
    assert tables[0].variance.dtypes.equals(tables[1].variance.dtypes)


@pytest.mark.parametrize("engine", ["fast", "statsmodels", "auto"])
def test_a_covariate_with_a_large_offset_is_not_rank_deficient(engine: str) -> None:
    """The rank check runs on centred, scaled columns as the engines fit them: a time in
    Unix seconds was called rank deficient by fit() and fitted ok by fit_many."""
    from .conftest import REFDATA

    ss = pd.read_parquet(REFDATA / "sleepstudy.parquet")
    ss["t"] = 1.7e9 + ss["Days"] * 3600.0
    days = mixedscale.fit(ss, ModelSpec("Reaction ~ Days", groups="Subject",
                                        re_formula="~Days", engine=engine))
    secs = mixedscale.fit(ss, ModelSpec("Reaction ~ t", groups="Subject", re_formula="~t",
                                        engine=engine))
    assert secs.fit["status"] == "ok", secs.fit["error_message"]
    slope = secs.params.set_index("term")["estimate"]["t"]
    assert slope * 3600 == pytest.approx(days.params["estimate"].iloc[1], rel=1e-6)
    # REML's log-likelihood moves by log|det| of the fixed effects' reparametrization
    assert secs.fit["llf"] == pytest.approx(days.fit["llf"] - np.log(3600.0), abs=1e-5)


def test_a_random_slope_on_a_between_group_covariate_is_flagged_not_ok() -> None:
    """``(arm | subject)`` with arm constant within subjects: only var(Intercept) and
    var + 2 cov + var(arm) are identified, so the deviance is flat along a line. Its
    Hessian's eigenvalue ratio (~5e-8) passed a 1e-8 test, and the engines returned
    different variances, both "ok"; lme4's check.conv.hess (tol 1e-6) flags it."""
    from mixedscale.batch import fit_slices

    r = np.random.default_rng(1)
    g = np.repeat(np.arange(12), 6)
    x, arm = r.normal(size=72), (np.arange(12) % 2)[g] * 1.0
    df = pd.DataFrame({"y": 1 + x + 0.5 * arm + r.normal(size=12)[g] + r.normal(size=72),
                       "x": x, "arm": arm, "g": g})
    spec = ModelSpec("y ~ x + arm", groups="g", re_formula="~arm")
    for engine in ("fast", "statsmodels", "auto"):
        res = mixedscale.fit(df, spec.replace(engine=engine))
        assert res.fit["status"] == "not_converged", engine
        assert not res.fit["hessian_pd"]
        assert "not uniquely determined" in res.fit["error_message"]
    many = pd.concat([df.assign(k=i) for i in range(4)])
    out = fit_slices(many, many["k"].to_numpy(), spec, 4)
    assert out is not None and out.fallback == [0, 1, 2, 3]  # none passes as verified


def test_unused_levels_of_a_categorical_column_are_dropped_as_in_r() -> None:
    """A pandas categorical (or a Parquet dictionary column read back as one) keeps
    levels no row of a slice holds; patsy coded them as all-zero columns, so the
    slice was an error, "rank deficient", where the same text column fits."""
    r = np.random.default_rng(0)
    g = np.repeat(np.arange(8), 6)
    t = r.choice(["ctl", "drugA"], 48)
    df = pd.DataFrame({"y": (t == "drugA") + r.normal(size=8)[g] + r.normal(size=48),
                       "treat": t, "subj": g})
    spec = ModelSpec("y ~ treat", groups="subj")
    text = mixedscale.fit(df, spec)
    cat = mixedscale.fit(df.assign(treat=pd.Categorical(t, categories=["ctl", "drugA",
                                                                       "drugB"])), spec)
    assert cat.fit["status"] == text.fit["status"] == "ok", cat.fit["error_message"]
    assert cat.fit["llf"] == pytest.approx(text.fit["llf"], abs=1e-9)
    assert list(cat.params["term"]) == list(text.params["term"])


def test_statsmodels_attempts_count_their_evaluations() -> None:
    """MixedLMResults keeps no evaluation count; a 0 in the record was made up."""
    from .conftest import REFDATA

    ss = pd.read_parquet(REFDATA / "sleepstudy.parquet")
    res = mixedscale.fit(ss, ModelSpec("Reaction ~ Days", groups="Subject",
                                       re_formula="~Days", engine="statsmodels"))
    sm = [a for a in res.fit["attempts"] if a["engine"] == "statsmodels"]
    assert sm and all(a["n_evals"] > 0 for a in sm)


def test_a_slope_variance_component_is_labelled_by_its_covariate() -> None:
    r = np.random.default_rng(0)
    g = np.repeat(np.arange(20), 10)
    x = r.normal(size=200)
    df = pd.DataFrame({"y": x + r.normal(size=20)[g] * x + r.normal(size=200), "x": x, "g": g})
    res = mixedscale.fit(df, ModelSpec("y ~ x", groups="g", vc_formula={"xs": "0 + x"}))
    v = res.variance.set_index("kind")
    assert v.loc["vc", "group"] == "xs" and v.loc["vc", "term1"] == "x"
    assert v.loc["re", "term1"] == "Intercept"


@pytest.mark.parametrize(("change", "formula", "counts"), [
    ({"z": np.nan}, "y ~ x + z", (0, 72, 0)),  # message: n_dropped=72
    ({"x": 0.0}, "y ~ np.log(x)", (72, 0, 12)),  # log(0): -inf in the design
    ({"y": np.r_[np.inf, np.zeros(71)]}, "y ~ x", (72, 0, 12)),
], ids=["all_missing", "log0", "inf"])
def test_error_rows_carry_the_data_counts_their_message_speaks_of(
        change: dict[str, object], formula: str, counts: tuple[int, int, int]) -> None:
    df = _panel().assign(**change)
    r = mixedscale.fit(df, ModelSpec(formula, groups="g"))
    assert r.status == "error"
    assert (r.fit["n_obs"], r.fit["n_dropped"], r.fit["n_groups"]) == counts


@pytest.mark.parametrize("engine", ["auto", "fast", "statsmodels"])
def test_groups_as_a_fixed_factor_beside_their_random_intercept_is_an_error_naming_it(
        engine: str) -> None:
    """The REML deviance is flat in that variance: the fast engine wandered to theta
    ~3e6 and failed with numpy's 'Matrix is not positive definite'."""
    df = _panel()
    r = mixedscale.fit(df, ModelSpec("y ~ x + g", groups="g", engine=engine))
    assert r.status == "error" and r.fit["error_type"] == "ModelFailure"
    assert "'Intercept' is not identifiable" in r.fit["error_message"]
    assert "groups column also in the formula" in r.fit["error_message"]
    # a between-group factor with fewer levels than groups is fine
    ok = mixedscale.fit(df.assign(arm=df["g"].str[-1].isin(list("02468"))),
                        ModelSpec("y ~ x + arm", groups="g", engine=engine))
    assert ok.status == "ok"


def test_scaled_gradient_is_lme4s() -> None:
    # lme4: scgrad <- solve(chol(Hessian), gradient), R's chol being the upper factor
    # U (H = U'U); then max(pmin(|scgrad|, |gradient|)). Worked by hand for this H, g.
    from mixedscale.engines import lme4_verdict

    H = np.array([[100.0, 9.9], [9.9, 1.0]])
    g = np.array([0.05, -0.004])
    U = np.array([[10.0, 0.99], [0.0, np.sqrt(1.0 - 0.99**2)]])
    assert np.allclose(U.T @ U, H)
    want = float(np.minimum(np.abs(np.linalg.solve(U, g)), np.abs(g)).max())
    gmax, pd_ = lme4_verdict(g, H, np.zeros(2, dtype=bool))
    assert pd_ is True and gmax == pytest.approx(want) and want == pytest.approx(0.0078, 1e-2)


def test_unidentifiable_random_effects_say_why_in_the_data_s_terms() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y": rng.normal(size=40), "x": rng.normal(size=40),
                       "g1": np.arange(40).astype(str),
                       "g": np.repeat(np.arange(8), 5).astype(str)})
    one = mixedscale.fit(df, ModelSpec("y ~ x", groups="g1")).fit
    assert one["status"] == "error" and "(Intercept | g1)" in one["error_message"]
    assert "every 'g1' group has a single observation" in one["error_message"]
    own = mixedscale.fit(df, ModelSpec("y ~ x", groups="g", re_formula="~C(g)")).fit
    assert "re_formula uses the groups column 'g' itself" in own["error_message"]
    assert "C(g)[T.2] + ... | g)" in own["error_message"]  # not every level's term
    crossed = pd.DataFrame({"plate": np.repeat(np.arange(24), 6).astype(str)})
    crossed["sample"] = crossed["plate"] + "_" + np.tile(np.arange(6), 24).astype(str)
    crossed["y"] = rng.normal(size=len(crossed))
    vc = mixedscale.fit(crossed, ModelSpec("y ~ 1", groups="plate",
                                      vc_formula={"sample": "0 + C(sample)"})).fit
    assert "for crossed effects (lme4's (1 | a) + (1 | b)) give groups=None" in \
        vc["error_message"]


@pytest.mark.parametrize(("formula", "lhs"), [
    ("_ms0_ ~ _ms1_ + _ms2_", True), ("_ms0_~_ms2_", True), ("_ms0_ ~ 1", True),
    ("_ms0_ ~ 1 + _ms3_ + _ms1_", True), ("_ms3_ ~ _ms1_", True), ("~ _ms1_", False),
    ("~1", False), ("~ _ms2_ + 1 + _ms3_", False), ("_ms1_", False), ("1 + _ms2_", False),
    # patsy's own: no intercept, repeats, products, text, bool, transforms
    ("_ms0_ ~ 0 + _ms1_", True), ("_ms0_ ~ _ms1_ - 1", True), ("_ms0_ ~ _ms1_ + _ms1_", True),
    ("_ms0_ ~ _ms1_ * _ms2_", True), ("_ms0_ ~ _ms4_", True), ("~ _ms5_", False),
    ("_ms0_ ~ np.log(_ms2_)", True), ("_ms4_ ~ _ms1_", True),
])
def test_plain_designs_are_built_as_patsy_builds_them(formula: str, lhs: bool) -> None:
    import patsy

    from mixedscale import design

    rng = np.random.default_rng(3)
    n = 50
    frame = pd.DataFrame({"_ms0_": rng.normal(size=n), "_ms1_": rng.normal(size=n),
                          "_ms2_": rng.uniform(1, 2, n).astype(np.float32),
                          "_ms3_": rng.integers(-5, 5, n), "_ms4_": rng.choice(["a", "b"], n),
                          "_ms5_": rng.random(n) < 0.5})
    frame["_ms4_"] = pd.Categorical(frame["_ms4_"])
    plain = design._plain_matrix(formula, frame, lhs)
    plain_kind = all(t.strip() == "1" or design._IDENT_TERM.fullmatch(t.strip())
                     for t in formula.split("~")[-1].split("+"))
    plain_kind = plain_kind and "_ms4_" not in formula and "_ms5_" not in formula \
        and formula.count("_ms1_") < 2
    assert (plain is not None) == plain_kind
    if plain is None:
        return
    env = patsy.EvalEnvironment([{"np": np}])
    if lhs:
        yv, xm = patsy.dmatrices(formula, frame, eval_env=env)
        np.testing.assert_array_equal(plain[1], np.asarray(yv))
    else:
        xm = patsy.dmatrix(formula, frame, eval_env=env)
        assert plain[1] is None
    np.testing.assert_array_equal(plain[0], np.asarray(xm))
    assert plain[2] == list(xm.design_info.column_names)


def test_rank_from_qr_agrees_with_numpy() -> None:
    from mixedscale.design import _rank

    rng = np.random.default_rng(11)
    n = 200
    x = rng.normal(size=n)
    cases = [np.c_[np.ones(n), x], np.c_[np.ones(n), x, 2 * x - 1],  # exactly collinear
             np.c_[np.ones(n), x, x + 1e-9 * rng.normal(size=n)],  # nearly, still full rank
             np.c_[np.ones(n), x, x + 1e-16 * rng.normal(size=n)],  # below the tolerance
             np.zeros((n, 2)), np.ones((n, 1))]
    for M in cases:
        R = np.linalg.qr(M, mode="r")
        assert _rank(M, R) == np.linalg.matrix_rank(M)
        assert _rank(M, None) == np.linalg.matrix_rank(M)


def test_ones_columns_finds_intercepts_as_numpy_does() -> None:
    from mixedscale.lmm import ones_columns

    cases = [np.ones((5, 3)), np.zeros((0, 3)), np.zeros((4, 0)),
             np.c_[np.ones(5), np.r_[1, 1, 1, 1, 2.0]], np.c_[np.r_[2, 1, 1.0], np.ones(3)],
             np.array([[np.nan, 1.0]]), np.c_[np.ones(4), -np.ones(4)]]
    for M in cases:
        np.testing.assert_array_equal(ones_columns(M), np.all(M == 1.0, axis=0))
