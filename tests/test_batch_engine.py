"""The batched fast engine against the per-fit path, slice by slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixedscale as ms
from mixedscale import batch as batch_mod
from mixedscale.batch import BatchProblem, _at, _offsets, bound_verdicts, fit_slices
from mixedscale.engines import lme4_verdict

from .conftest import make_genes


def _batch(df: pd.DataFrame, spec: ms.ModelSpec, key: str = "gene"):
    codes, uniq = pd.factorize(df[key], sort=True)
    out = fit_slices(df, codes, spec, len(uniq))
    assert out is not None
    return out, list(uniq)


def _frames(out):
    """The batch's Arrow tables as pandas, for comparisons."""
    return out.params.to_pandas(), out.variance.to_pandas()


def _compare(df: pd.DataFrame, spec: ms.ModelSpec, key: str = "gene") -> int:
    """Every batched fit equals the per-fit path; returns how many were batched."""
    out, uniq = _batch(df, spec, key)
    params, variance = _frames(out)
    for rec in out.records:
        s = rec["_slice"]
        single = ms.fit(df[df[key] == uniq[s]], spec)
        assert single.fit["status"] == "ok"
        assert rec["llf"] == pytest.approx(single.fit["llf"], abs=1e-6)
        assert rec["singular"] == single.fit["singular"]
        assert rec["n_obs"] == single.fit["n_obs"]
        assert rec["n_groups"] == single.fit["n_groups"]
        p = params[params["_slice"] == s]
        assert list(p["term"]) == list(single.params["term"])
        np.testing.assert_allclose(p["estimate"], single.params["estimate"], rtol=1e-5,
                                   atol=1e-8)
        np.testing.assert_allclose(p["std_error"], single.params["std_error"], rtol=1e-4)
        v = variance[variance["_slice"] == s]
        assert list(v["kind"]) == list(single.variance["kind"])
        resid = float(single.variance["estimate"].iloc[-1])
        np.testing.assert_allclose(v["estimate"], single.variance["estimate"], rtol=1e-4,
                                   atol=1e-4 * resid)
    return len(out.records)


@pytest.mark.parametrize("re_formula", ["1", "~time"])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("cov", ["unstructured", "diagonal"])
def test_batch_matches_single(re_formula: str, reml: bool, cov: str) -> None:
    df = make_genes(n_genes=12, n_subjects=15, n_times=4, seed=3)
    spec = ms.ModelSpec("y ~ time", groups="subject", re_formula=re_formula, reml=reml,
                        cov_structure=cov)  # type: ignore[arg-type]
    assert _compare(df, spec) >= 10


def test_batch_sends_bad_slices_to_fallback() -> None:
    df = make_genes(n_genes=8, n_subjects=10, seed=1)
    df.loc[df["gene"] == "g002", "y"] = 1.0  # constant response
    df = df[~((df["gene"] == "g005") & (df["subject"] > 0))]  # a single group
    out, uniq = _batch(df, ms.ModelSpec("y ~ time", groups="subject"))
    assert {uniq[i] for i in out.fallback} >= {"g002", "g005"}
    assert len(out.records) == 6


def test_batch_declines_categorical_levels_missing_in_a_slice() -> None:
    df = make_genes(n_genes=6, n_subjects=10, seed=2)
    df["arm"] = np.where(df["subject"] % 2 == 0, "a", "b")
    spec = ms.ModelSpec("y ~ time + arm", groups="subject")
    codes, uniq = pd.factorize(df["gene"])
    assert fit_slices(df, codes, spec, len(uniq)) is not None
    df = df[~((df["gene"] == "g003") & (df["arm"] == "b"))]
    codes, uniq = pd.factorize(df["gene"])
    assert fit_slices(df, codes, spec, len(uniq)) is None


def test_batch_counts_dropped_rows_per_slice() -> None:
    df = make_genes(n_genes=5, n_subjects=10, seed=4)
    df.loc[df.index[:3], "y"] = np.nan  # all in g000
    out, uniq = _batch(df, ms.ModelSpec("y ~ time", groups="subject"))
    dropped = {uniq[r["_slice"]]: r["n_dropped"] for r in out.records}
    assert dropped["g000"] == 3 and dropped["g001"] == 0


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n_groups=st.integers(3, 25), max_size=st.integers(2, 9),
       slope_sd=st.sampled_from([0.0, 0.05, 0.5]), icpt_sd=st.sampled_from([0.0, 0.3, 2.0]),
       reml=st.booleans(), seed=st.integers(0, 10_000))
def test_batch_matches_single_on_random_designs(n_groups: int, max_size: int, slope_sd: float,
                                                icpt_sd: float, reml: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(5):
        sizes = rng.integers(1, max_size + 1, n_groups)
        grp = np.repeat(np.arange(n_groups), sizes)
        x = rng.normal(size=len(grp)) * 3 + 10
        y = 1 + 0.2 * x + rng.normal(0, icpt_sd, n_groups)[grp] \
            + rng.normal(0, slope_sd, n_groups)[grp] * x + rng.normal(0, 1, len(grp))
        frames.append(pd.DataFrame({"gene": f"g{g}", "grp": grp, "x": x, "y": y}))
    df = pd.concat(frames, ignore_index=True)
    spec = ms.ModelSpec("y ~ x", groups="grp", re_formula="~x", reml=reml)
    out, uniq = _batch(df, spec)
    for rec in out.records:
        single = ms.fit(df[df["gene"] == uniq[rec["_slice"]]], spec)
        # Both verified optima: the same likelihood (the higher one wins elsewhere).
        assert rec["llf"] >= single.fit["llf"] - 1e-6
        assert rec["llf"] == pytest.approx(single.fit["llf"], abs=1e-4)


def test_hanging_slice_in_a_batch_times_out_alone(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path) -> None:
    """A batch over its budget (timeout x fits = 4 s) is retried fit by fit: only the
    hanging slice fails."""
    import json

    from mixedscale.api import prepare
    from mixedscale.executor import RunOptions, _Run
    from mixedscale.worker import Loaded, run_task

    df = make_genes(n_genes=8, n_subjects=10, seed=5)
    monkeypatch.setenv("MIXEDSCALE_TEST_FAULTS",
                       json.dumps([{"key": ["g003"], "do": "hang", "seconds": 6}]))
    src, plan = prepare(df, [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    run = _Run(plan, src, None, None, RunOptions(timeout=0.5))
    outcomes = [run_task(run.payload(t), Loaded(df, 0), None) for t in plan.tasks]
    fits = pd.concat([o.tables["fits"].to_pandas() for o in outcomes if o.tables])
    assert len(fits) == 8 and fits["fit_id"].is_unique
    bad = fits[fits["status"] != "ok"]
    assert list(bad["gene"]) == ["g003"] and list(bad["error_type"]) == ["FitTimeout"]
    assert bad[["n_obs", "n_dropped", "n_groups"]].isna().all(axis=None)  # unknown, not 0
    params = pd.concat([o.tables["params"].to_pandas() for o in outcomes if o.tables])
    assert set(params["gene"]) == set(fits.loc[fits["status"] == "ok", "gene"])
    assert not params.duplicated(["fit_id", "term"]).any()


def test_shared_designs_are_found_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-gene slices share X and Z (only y differs): their cross-products are computed
    once; a slice whose covariates differ in one value gets its own."""
    import mixedscale.batch as batch

    seen = {}
    real = batch._shared_designs

    def spy(*args):
        seen["rep"] = real(*args)
        return seen["rep"]

    monkeypatch.setattr(batch, "_shared_designs", spy)
    spec = ms.ModelSpec("y ~ time", groups="subject")
    df = make_genes(n_genes=6, n_subjects=10, seed=6)
    _batch(df, spec)
    assert list(seen["rep"]) == [0] * 6
    df.loc[(df["gene"] == "g004") & (df["subject"] == 3), "time"] += 0.5
    _batch(df, spec)
    assert list(seen["rep"]) == [0, 0, 0, 0, 4, 0]
    assert _compare(df, spec) == 6  # and the estimates are still each slice's own


# Found by an audit against brute-force optima (60 random starts on the original scale):
# this slice has an interior local optimum (llf -26.7927) below a boundary one (-26.7519).
_TWO_OPTIMA = pd.DataFrame({
    "g": [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6],
    "x": [0.0692, -0.8107, 1.7305, 1.3089, -1.2229, 0.0824, 1.2789, -0.1753, -1.7268, 1.6098,
          0.5799, -2.2714, -0.0694, 2.7834, 0.3462, 1.5438, 1.0476, -2.2343, 0.3945, -0.5495,
          -0.0324, 1.1843, -1.3463, 0.2468],
    "y": [2.184, 0.9676, 0.5983, 1.8023, 0.9728, 0.7717, 1.9696, 0.6504, -0.8393, 2.8816,
          1.9058, -0.5921, -0.1522, 3.006, 0.3867, 1.9853, 0.8449, -1.4684, -0.1359, 0.058,
          0.8523, 1.8944, -1.4302, 0.073]})


# Found by the same audit: identity and scaled starts all reach a rank-deficient
# (perfectly correlated) boundary optimum at llf -41.497888, 1.25e-3 below the interior
# one that fit() finds; a grid of 112 Newton starts reaches only these two.
_CORRELATED_BOUNDARY = pd.DataFrame({
    "g": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5],
    "x": [0.4204, 1.136, 0.1097, -0.5526, -0.7848, -1.7321, -0.0837, -1.1632, -0.6293,
          -0.488, -0.7133, -1.2894, 0.0207, -0.0379, -0.3043, 1.1703, 0.7166, -1.9978,
          0.2721, -1.1017, 0.0331, -0.8405, 1.4487, 0.5682, 2.4317, -0.3966, 0.1888,
          -0.0212],
    "y": [0.5302, 1.5963, -0.024, -1.6968, -1.4801, 1.9359, 2.4781, 1.193, 2.5673, 3.0869,
          0.4556, -1.4501, -0.3702, -1.0845, -1.4354, 0.5553, -1.2003, 2.2087, 0.8032,
          2.8581, 0.0232, 0.4011, 0.9904, 0.8376, -0.2953, 0.8054, 0.9144, 0.7383]})


# Same audit: Newton from the identity and from 0.25 x identity both reach an interior
# optimum (llf -39.308005), 0.23 below the best one, on the face where the intercept's
# SD is zero; only a start on that face (or on the x-only axis) reaches it.
_FACE_BEST = pd.DataFrame({
    "g": [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4],
    "x": [-5.645, 2.48, 3.605, -1.629, 0.722, 2.003, -0.627, -5.055, -2.988, 7.916, -0.315,
          -9.803, -2.646, -1.874, -1.335, -0.222, 4.273, -2.044, 0.182, -2.906],
    "z": [-0.458, -0.563, -0.59, -0.608, 1.111, -1.579, 1.276, 2.341, 0.071, 1.523, 1.161,
          -0.316, 0.84, 0.744, 1.489, -0.082, 0.282, 0.239, -0.551, -0.185],
    "y": [6.845, 4.38, 2.047, 4.073, 6.214, -4.973, 5.585, 8.362, 0.909, -0.544, 2.056,
          1.652, 1.077, -0.759, 0.867, 0.396, 1.132, 0.018, -0.82, 1.497]})


@pytest.mark.parametrize(("data", "spec", "llf", "singular"), [
    (_TWO_OPTIMA, ms.ModelSpec("y ~ x", groups="g", re_formula="~x", reml=False,
                               cov_structure="diagonal"), -26.751931, True),
    (_CORRELATED_BOUNDARY, ms.ModelSpec("y ~ x", groups="g", re_formula="~x", reml=True),
     -41.49664, False),
    (_FACE_BEST, ms.ModelSpec("y ~ x + z", groups="g", re_formula="~x+z", reml=True,
                              cov_structure="diagonal"), -39.078718, True),
    # A second audit, 50-200 groups: two basins, relative SDs near 0.5 and near 5; the
    # optimum (9.2 llf higher) is reached only from starts of 4 x lme4's and up.
    (pd.read_csv(Path(__file__).parent / "data" / "large_sd_two_basins.csv"),
     ms.ModelSpec("y ~ x", groups="g", re_formula="~x", reml=False,
                  cov_structure="diagonal"), -729.58484, False),
], ids=["two_optima", "correlated_boundary", "face_best", "large_sd"])
def test_batch_restarts_reach_the_highest_optimum(data: pd.DataFrame, spec: ms.ModelSpec,
                                                  llf: float, singular: bool) -> None:
    df = pd.concat([data.assign(s=f"s{i}") for i in range(4)], ignore_index=True)
    fits = _batch(df, spec, key="s")[0].fits.to_pandas()
    assert len(fits) == 4 and (fits["status"] == "ok").all()
    np.testing.assert_allclose(fits["llf"], llf, atol=1e-5)
    assert (fits["singular"] == singular).all()
    assert ms.fit(data, spec).fit["llf"] == pytest.approx(llf, abs=1e-5)  # one answer
    # Every attempt on record: the first Newton's lower optimum, then the restart's.
    for _, f in fits.iterrows():
        att = list(f["attempts"])
        assert f["method"] == "newton-multistart" and f["n_attempts"] == len(att) == 2
        assert [a["method"] for a in att] == ["newton-batch", "newton-multistart"]
        assert att[1]["llf"] == pytest.approx(f["llf"], abs=1e-12)
        assert att[0]["llf"] < f["llf"] - 1e-6


def test_batch_leaves_interpolating_designs_to_fit() -> None:
    # [X Z] can reach rank n (9 groups of 2 rows, 1 of 3; p=3, q=2): the ML likelihood
    # is unbounded. fit() says so; the batch must not return an "ok" optimum for it.
    rng = np.random.default_rng(3)
    one = pd.DataFrame({"g": np.r_[np.repeat(np.arange(9), 2), [9, 9, 9]],
                        "x": rng.normal(size=21), "x2": rng.normal(size=21),
                        "y": rng.normal(size=21)})
    spec = ms.ModelSpec("y ~ x + x2", groups="g", re_formula="~x", reml=False)
    df = pd.concat([one.assign(s=f"s{i}") for i in range(4)], ignore_index=True)
    out = _batch(df, spec, key="s")[0]
    assert out.fallback == [0, 1, 2, 3] and out.fits.num_rows == 0
    res = ms.fit(one, spec)
    assert res.fit["status"] == "error" and "interpolate the data" in res.fit["error_message"]


def _cell_means(offset: float, n_slices: int = 4) -> pd.DataFrame:
    """Slices of one design with a response far from 0, coded without an intercept."""
    r = np.random.default_rng(0)
    g = np.repeat(np.arange(12), 8)
    x, c = r.normal(size=96), np.tile(list("abcd"), 24)
    base = 0.5 * x + (c == "b") + r.normal(size=12)[g] + r.normal(size=96)
    return pd.concat([pd.DataFrame({"y": base + offset + k, "x": x, "c": c, "g": g,
                                    "gene": f"g{k}"}) for k in range(n_slices)])


@pytest.mark.parametrize("offset", [1e5, 1e7, 1e8])
def test_a_response_offset_under_a_formula_without_intercept_keeps_the_optimum(
        offset: float) -> None:
    """``y ~ 0 + C(c)`` is ``y ~ C(c)`` coded otherwise. Only a literal intercept column
    used to centre y, so sums of squares of y near 1e7 cancelled every digit: wrong
    variances marked ok (statsmodels engine), or not_converged by a false local optimum."""
    df = _cell_means(offset)
    one = df[df["gene"] == "g0"]
    want = ms.fit(one.assign(y=one["y"] - offset), ms.ModelSpec("y ~ C(c) + x", groups="g",
                                                                reml=False))
    spec = ms.ModelSpec("y ~ 0 + C(c) + x", groups="g", reml=False)
    for engine in ("fast", "statsmodels", "auto"):
        got = ms.fit(one, spec.replace(engine=engine))
        assert got.fit["status"] == "ok", (engine, got.fit["message"])
        assert got.fit["llf"] == pytest.approx(want.fit["llf"], abs=1e-6), engine
        np.testing.assert_allclose(got.variance["estimate"], want.variance["estimate"],
                                   rtol=1e-5)
        # the cell means: the intercept-coded model's intercept plus its contrasts
        b = want.params.set_index("term")["estimate"]
        cells = [b["Intercept"]] + [b["Intercept"] + b[f"C(c)[T.{k}]"] for k in "bcd"]
        np.testing.assert_allclose(got.params["estimate"].iloc[:4],
                                   np.array(cells) + offset, rtol=0, atol=1e-6)
    assert _compare(df, spec) == 4


def test_hessian_pd_is_null_where_no_parameter_is_free() -> None:
    """A zero random-intercept variance leaves no free parameter: there is no Hessian
    to check, so hessian_pd is null (not True), in both paths and in the attempts."""
    rng = np.random.default_rng(1)
    frames = []
    for s in range(4):
        g = np.repeat(np.arange(10), 8)
        x = rng.normal(size=g.size)
        u = rng.normal(size=10) * (1.0 if s % 2 else 0.0)  # odd slices: a real variance
        frames.append(pd.DataFrame({"s": s, "g": g, "x": x,
                                    "y": 1 + x + u[g] + rng.normal(size=g.size)}))
    spec = ms.ModelSpec("y ~ x", groups="g")
    fits = _batch(pd.concat(frames, ignore_index=True), spec, key="s")[0].fits.to_pandas()
    assert (fits["status"] == "ok").all()
    for s, f in fits.iterrows():
        want = None if s % 2 == 0 else True
        assert bool(f["singular"]) is (s % 2 == 0)
        assert f["hessian_pd"] is want or (want is None and pd.isna(f["hessian_pd"]))
        assert [a["hessian_pd"] for a in f["attempts"]] == [want]
        one = ms.fit(frames[s], spec)
        assert one.status == "ok" and one.fit["hessian_pd"] is want
        assert {a["hessian_pd"] for a in one.fit["attempts"]} == {want}


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "Int8"])
def test_small_int_columns_do_not_wrap_in_formula_arithmetic(dtype: str) -> None:
    """numpy wraps int8 silently: I(t * 100) read 200 as -56 and the fit was 'ok'
    with a wrong slope. Both paths must equal the float column's fit."""
    rng = np.random.default_rng(0)
    frames = []
    for s in range(4):
        g = np.repeat(np.arange(10), 8)
        t = np.tile(np.arange(4), 20)
        y = 0.005 * t * 100 + np.repeat(rng.normal(size=10), 8) + 0.1 * rng.normal(size=80)
        frames.append(pd.DataFrame({"s": s, "g": g, "t": t, "y": y}))
    df = pd.concat(frames, ignore_index=True)
    spec = ms.ModelSpec("y ~ I(t * 100)", groups="g")
    want = _batch(df.assign(t=df["t"].astype(float)), spec, key="s")[0].params.to_pandas()
    got = _batch(df.assign(t=df["t"].astype(dtype)), spec, key="s")[0].params.to_pandas()
    np.testing.assert_allclose(got["estimate"], want["estimate"], rtol=1e-9)
    one = ms.fit(frames[0].assign(t=frames[0]["t"].astype(dtype)), spec)
    assert one.params["estimate"].iloc[1] == pytest.approx(want["estimate"].iloc[1], rel=1e-9)


def _random_batch(q: int, diagonal: bool, singletons: bool) -> BatchProblem:
    """Sufficient statistics of random slices; with ``singletons``, one row per group
    (rank-1 Z'Z, where a 2x2 closed form can lose digits to cancellation)."""
    rng = np.random.default_rng(q * 10 + diagonal + 2 * singletons)
    F, G, m, p = 7, 12, 1 if singletons else 5, 3
    Z = rng.normal(size=(F, G, m, q))
    Z[..., 0] = 1.0
    X = rng.normal(size=(F, G, m, p))
    y = 3 * rng.normal(size=(F, G, m)) + 10
    return BatchProblem(np.einsum("fgnq,fgnr->fgqr", Z, Z), np.einsum("fgnq,fgnp->fgqp", Z, X),
                        np.einsum("fgnq,fgn->fgq", Z, y), np.einsum("fgnp,fgnr->fpr", X, X),
                        np.einsum("fgnp,fgn->fp", X, y), np.einsum("fgn,fgn->f", y, y),
                        np.full(F, G * m), True, diagonal)


@pytest.mark.parametrize(("q", "diagonal"), [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("singletons", [False, True])
def test_closed_form_deviance_matches_the_general_cholesky_path(q: int, diagonal: bool,
                                                                singletons: bool) -> None:
    prob = _random_batch(q, diagonal, singletons)
    rng = np.random.default_rng(5)
    for scale in (0.01, 1.0, 30.0):
        th = rng.normal(size=(prob.F, prob.k)) * scale
        ld_c, ldx_c, _, _, r2_c, ok_c = prob.solve(th)
        ld_g, S = prob._general(th)
        assert ok_c.all()
        np.testing.assert_allclose(ld_c, ld_g, rtol=1e-10, atol=1e-9)
        rhs = prob.Xty - S[:, 1:, 0]
        beta = np.linalg.solve(prob.XtX - S[:, 1:, 1:], rhs[..., None])[..., 0]
        np.testing.assert_allclose(ldx_c, np.linalg.slogdet(prob.XtX - S[:, 1:, 1:])[1],
                                   rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r2_c, prob.yty - S[:, 0, 0] - (rhs * beta).sum(axis=1),
                                   rtol=1e-8)


@pytest.mark.parametrize(("q", "diagonal"), [(1, False), (2, False), (2, True)])
def test_stacked_stencils_equal_one_point_per_call(q: int, diagonal: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    prob = _random_batch(q, diagonal, False)
    th = np.abs(np.random.default_rng(2).normal(size=(prob.F, prob.k))) + 0.1
    off, _ = _offsets(prob.k, "central")
    stacked = _at(prob, th, off)
    monkeypatch.setattr(batch_mod, "_STACK_MAX", 0)
    np.testing.assert_allclose(stacked, _at(prob, th, off), rtol=1e-13)
    one = prob.subset(np.array([3]))  # a fit of one: all points in one matrix product
    np.testing.assert_allclose(_at(one, th[3:4], off), stacked[3:4], rtol=1e-13)


def test_a_restart_that_rejoins_the_optimum_it_has_stops_there() -> None:
    prob = _random_batch(2, False, False)
    th1, conv1, _ = batch_mod.newton(prob)
    dev1 = prob.deviance(th1)
    assert conv1.all()
    quarter = np.tile(batch_mod._scaled(prob.lower, 0.25), (prob.F, 1))
    th2, conv2, n_full = batch_mod.newton(prob, start=quarter)
    assert conv2.all()
    np.testing.assert_allclose(th2, th1, atol=1e-5)  # every restart finds th1 again
    # Told th1, each stops once within reach of it, unconverged: it cannot replace th1.
    _, conv3, n_short = batch_mod.newton(prob, start=quarter, known=(th1, dev1))
    assert not conv3.any() and n_short < n_full
    # Where the iterate's deviance is already below the known one (here: said to be
    # 1 higher), the restart found better: it goes on.
    th4, conv4, _ = batch_mod.newton(prob, start=quarter, known=(th1, dev1 + 1.0))
    assert conv4.all()
    np.testing.assert_allclose(th4, th2, rtol=1e-12)


def test_backtracking_evaluates_only_the_fits_still_searching(
        monkeypatch: pytest.MonkeyPatch) -> None:
    prob = _random_batch(2, False, False)
    prob.yty = prob.yty * np.linspace(1.0, 4.0, prob.F)  # fits that need different steps
    alone = [batch_mod.newton(prob.subset(np.array([i])), start=4.0) for i in range(prob.F)]
    sizes: list[int] = []
    real = BatchProblem.deviance

    def spy(self: BatchProblem, th: np.ndarray) -> np.ndarray:
        if th.ndim == 2:  # a step tried (stencils are stacked: 3-d)
            sizes.append(self.F)
        return real(self, th)

    monkeypatch.setattr(BatchProblem, "deviance", spy)
    th, conv, _ = batch_mod.newton(prob, start=4.0)
    # Halvings are tried on the fits that have not descended yet, not on all of them
    # (which took 131 fit evaluations here, against 89).
    assert max(sizes) == prob.F and sum(sizes) < 0.75 * prob.F * len(sizes)
    # Each fit's path is its own: the batch reaches what each fit reaches alone (to
    # rounding: a fit alone takes the one-fit product path, whose sums round otherwise).
    np.testing.assert_allclose(th, np.concatenate([a[0] for a in alone]), rtol=1e-7,
                               atol=1e-9)
    assert conv.tolist() == [bool(a[1][0]) for a in alone]


def test_restarts_are_verified_only_where_they_lower_the_deviance(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    real = batch_mod.verify

    def spy(prob: BatchProblem, th: np.ndarray):
        sizes.append(prob.F)
        return real(prob, th)

    monkeypatch.setattr(batch_mod, "verify", spy)
    # _TWO_OPTIMA: 3 restarts a slice (each face, 4 x lme4's start), 2 of them lower.
    spec = ms.ModelSpec("y ~ x", groups="g", re_formula="~x", reml=False,
                        cov_structure="diagonal")
    wins = pd.concat([_TWO_OPTIMA.assign(s=f"s{i}") for i in range(4)], ignore_index=True)
    _batch(wins, spec, key="s")
    assert sizes == [4, 8]
    sizes.clear()
    df = make_genes(n_genes=12, n_subjects=15, n_times=4, seed=3)
    spec = ms.ModelSpec("y ~ time", groups="subject", re_formula="~time")
    assert _compare(df, spec) == 12  # the estimates fit() finds, slice by slice
    assert sizes == [12]  # no restart re-verified: none was lower


def test_a_single_level_factor_is_named_in_warnings_by_both_paths() -> None:
    # patsy drops a one-level factor without a word; lme4 refuses it. The fit goes on
    # without the term, and every row says so.
    df = make_genes(n_genes=8)
    df["site"] = "A"
    spec = ms.ModelSpec("y ~ time + C(site)", groups="subject")
    single = ms.fit(df[df.gene == df.gene.iloc[0]], spec)
    want = ("formula term 'C(site)' has a single level in these rows, so it has no column "
            "to estimate and was left out of the model")
    assert single.fit["warnings"] == [want]
    assert single.params.term.tolist() == ["Intercept", "time"]
    keys = sorted(df.gene.unique())
    sl = pd.Categorical(df.gene, categories=keys).codes.astype(np.intp)
    out = fit_slices(df, sl, spec, len(keys))
    assert out is not None and out.fits.num_rows == len(keys)
    assert all(w[0] == want for w in out.fits.column("warnings").to_pylist())


def test_text_holding_numbers_in_a_formula_is_named_unless_wrapped_in_c() -> None:
    df = make_genes(n_genes=8)
    df["dose"] = (df["subject"] % 3).map({0: "0.5", 1: "1", 2: "2"})  # read as text
    keys = sorted(df.gene.unique())
    sl = pd.Categorical(df.gene, categories=keys).codes.astype(np.intp)
    one = df[df.gene == keys[0]]
    bare = ms.ModelSpec("y ~ time + dose", groups="subject")
    want = ("column 'dose' is text holding numbers ('0.5', '1', '2'), so it was fitted as "
            "categorical, one coefficient per level; cast it to numbers for a slope, or "
            "write C(dose) if categorical is meant")
    assert ms.fit(one, bare).fit["warnings"] == [want]
    out = fit_slices(df, sl, bare, len(keys))
    assert out is not None and all(w == [want] for w in out.fits.column("warnings").to_pylist())
    meant = ms.ModelSpec("y ~ time + C(dose)", groups="subject")
    assert ms.fit(one, meant).fit["warnings"] == []
    assert ms.fit(one.assign(dose=one["dose"].astype(float)), bare).fit["warnings"] == []


def test_a_component_with_an_intercept_column_is_named_in_warnings() -> None:
    # vc_formula={"cask": "C(cask)"}: patsy adds a ones column to the k-1 contrasts and
    # they share one variance, not a random effect per cask (statsmodels fits it too;
    # lme4 users write it meaning (1 | batch:cask)).
    df = make_genes(n_genes=1)
    df["cond"] = np.where(df["time"] > df["time"].median(), "hi", "lo")
    slip = ms.fit(df, ms.ModelSpec("y ~ time", groups="subject", vc_formula={"c": "C(cond)"}))
    assert slip.fit["warnings"][0] == (
        "vc_formula['c'] = 'C(cond)' has an intercept column beside its others, so they "
        "share one variance; for one random effect per level write '0 + C(cond)'")
    for vc in ("0 + C(cond)", "1"):  # a random intercept as a component is fine
        meant = ms.fit(df, ms.ModelSpec("y ~ time", groups="subject", vc_formula={"c": vc}))
        assert not any("intercept column" in w for w in meant.fit["warnings"])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bound_verdicts_are_lme4_verdict_fit_by_fit(k: int) -> None:
    """The batch's verdict for fits with parameters on their bound, vectorized by bound
    pattern, equals lme4_verdict on each fit: PD, near-singular, indefinite and
    non-finite Hessians, every pattern."""
    rng = np.random.default_rng(k)
    F = 600
    A = rng.normal(size=(F, k, k))
    shift = rng.choice([0.0, 1e-9, -0.3, -5.0], size=F)
    H = A @ np.swapaxes(A, 1, 2) + shift[:, None, None] * np.eye(k)
    H[::50] = np.nan
    H[7::50, 0, 0] = np.inf
    grads = rng.normal(size=(F, k)) * rng.choice([1e-6, 1e-3, 1.0], size=(F, 1))
    on_bound = rng.random((F, k)) < 0.4
    gmax, pd_ = bound_verdicts(grads, H, on_bound)
    for f in range(F):
        g, p = lme4_verdict(grads[f], H[f], on_bound[f])
        assert gmax[f] == pytest.approx(g, rel=1e-12, abs=0), f
        assert pd_[f] == (p is not False), f


def test_bound_patterns_group_rows_as_numpy_unique_does() -> None:
    from mixedscale.batch import _row_patterns

    rng = np.random.default_rng(5)
    for n, k in [(0, 3), (1, 1), (50, 3), (1000, 6), (20, 0), (30, 64)]:
        mask = rng.random((n, k)) < 0.3
        patterns, which = _row_patterns(mask)
        expect = np.unique(mask, axis=0)
        assert sorted(map(tuple, patterns.tolist())) == sorted(map(tuple, expect.tolist()))
        if n:
            np.testing.assert_array_equal(patterns[which], mask)


@pytest.mark.parametrize("re_formula", ["1", "~time"])
def test_rows_in_any_order_fit_as_rows_laid_out_by_slice_and_group(re_formula: str) -> None:
    """Rows already ordered by slice and group are used as they are (no sort, no
    copies); the same rows shuffled are sorted first. Both give the same fits."""
    df = make_genes(n_genes=12, n_subjects=15, n_times=4, seed=3)
    df["time"] = df["time"] + np.random.default_rng(0).normal(0, 0.1, len(df))  # own designs
    spec = ms.ModelSpec("y ~ time", groups="subject", re_formula=re_formula)
    laid_out = df.sort_values(["gene", "subject"], kind="stable").reset_index(drop=True)
    shuffled = df.sample(frac=1, random_state=1).reset_index(drop=True)
    a, uniq_a = _batch(laid_out, spec)
    b, uniq_b = _batch(shuffled, spec)
    assert uniq_a == uniq_b and len(a.records) == len(b.records) >= 10
    fa, fb = a.fits.to_pandas(), b.fits.to_pandas()
    np.testing.assert_allclose(fa["llf"], fb["llf"], rtol=1e-10)
    pa_, pb = _frames(a)[0], _frames(b)[0]
    np.testing.assert_allclose(pa_["estimate"], pb["estimate"], rtol=1e-6, atol=1e-9)
    assert list(fa["n_groups"]) == list(fb["n_groups"]) == [15] * len(fa)


def _deviance_through_solve(prob: BatchProblem, th: np.ndarray) -> np.ndarray:
    """BatchProblem.deviance as it was computed before _terms: from solve()'s matrices."""
    with np.errstate(all="ignore"):
        ld, ldx, _, _, r2, ok = prob.solve(th)
        dof = prob.n - prob.p if prob.reml else prob.n
        dev = ld + (ldx if prob.reml else 0.0) + dof * (
            1.0 + batch_mod._LOG2PI + np.log(r2 / dof))
    return np.where(ok & np.isfinite(dev), dev, np.inf)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize(("q", "diagonal"), [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("reml", [True, False])
def test_deviance_entry_by_entry_equals_solves_bit_for_bit(p: int, q: int, diagonal: bool,
                                                          reml: bool) -> None:
    rng = np.random.default_rng(p * 100 + q * 10 + diagonal)
    F, G, m = 9, 6, 4
    Z = rng.normal(size=(F, G, m, q))
    Z[..., 0] = 1.0
    X = rng.normal(size=(F, G, m, p))
    X[..., 0] = 1.0
    y = 3 * rng.normal(size=(F, G, m)) + 10
    y[1] = X[1] @ np.arange(1.0, p + 1)  # fit 1: an exact fit (no residual left)
    prob = BatchProblem(np.einsum("fgnq,fgnr->fgqr", Z, Z), np.einsum("fgnq,fgnp->fgqp", Z, X),
                        np.einsum("fgnq,fgn->fgq", Z, y), np.einsum("fgnp,fgnr->fpr", X, X),
                        np.einsum("fgnp,fgn->fp", X, y), np.einsum("fgn,fgn->f", y, y),
                        np.full(F, G * m), reml, diagonal)
    prob.XtX[0] = -prob.XtX[0]  # fit 0: RX'RX not positive definite
    off, _ = _offsets(prob.k, "central")
    for scale in (0.0, 0.05, 1.0, 30.0):
        th = np.abs(rng.normal(size=(F, prob.k))) * scale
        for at in (th, th[None] + off[:, None, :]):  # one point per fit, and a stencil
            got, want = prob.deviance(at), _deviance_through_solve(prob, at)
            assert np.array_equal(got, want)
            assert np.isfinite(got[..., 2:]).all() and np.isinf(got[..., 0]).all()
