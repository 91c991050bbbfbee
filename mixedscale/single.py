"""One fit: data + spec -> FitResult with a diagnostics record and tidy tables.

Model failures never raise here; they become ``status == "error"`` records.
Only input errors (SpecError: unknown columns, bad formulas) raise.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ._blas import one_blas_thread
from .design import Design, ModelFailure, build_design, check_design
from .engines import HESS_RATIO_TOL, Attempt, fit_fast, fit_statsmodels
from .errors import MixedscaleError
from .lmm import Estimates, Problem, Scaling, make_scaling, transform_theta
from .spec import ModelSpec

__all__ = ["FIT_COLUMNS", "PARAM_COLUMNS", "VARIANCE_COLUMNS", "FitResult", "fit"]

FIT_COLUMNS = [
    "spec_id", "spec_name", "status", "converged", "singular", "llf", "aic", "bic", "scale",
    "n_obs", "n_dropped", "n_groups", "group_size_min", "group_size_mean", "group_size_max",
    "engine", "method", "n_attempts", "attempts", "grad_max", "hessian_pd", "theta",
    "warnings", "error_type", "error_message", "fit_seconds",
    "mixedscale_version", "statsmodels_version", "numpy_version", "scipy_version",
]
PARAM_COLUMNS = ["term", "estimate", "std_error", "statistic", "p_value", "conf_low", "conf_high"]
VARIANCE_COLUMNS = ["group", "term1", "term2", "kind", "estimate"]


@cache
def versions() -> dict[str, str]:
    import scipy
    import statsmodels

    from . import __version__

    return {"mixedscale_version": __version__, "statsmodels_version": statsmodels.__version__,
            "numpy_version": np.__version__, "scipy_version": scipy.__version__}


@dataclass(frozen=True)
class FitResult:
    """``fit``: one diagnostics record; ``params`` and ``variance``: tidy tables."""

    fit: dict[str, Any]
    params: pd.DataFrame
    variance: pd.DataFrame

    @property
    def status(self) -> str:
        return str(self.fit["status"])

    def __repr__(self) -> str:
        f = self.fit
        head = f"FitResult({f['spec_name']!r}, status={f['status']!r}"
        if f["llf"] is not None:
            head += f", llf={f['llf']:.4f}, engine={f['engine']!r}, method={f['method']!r}"
        if f["error_message"]:
            head += f", error={f['error_message']!r}"
        return head + ")"


def _empty_record(spec: ModelSpec) -> dict[str, Any]:
    rec: dict[str, Any] = dict.fromkeys(FIT_COLUMNS)
    rec.update(spec_id=spec.spec_id, spec_name=spec.label, converged=False, singular=None,
               n_attempts=0, attempts=[], warnings=[], n_dropped=0, n_obs=0, n_groups=0)
    rec.update(versions())
    return rec


def _error(spec: ModelSpec, exc: BaseException, t0: float, design: Design | None = None,
           attempts: list[Attempt] | None = None) -> FitResult:
    rec = _empty_record(spec)
    if design is not None:
        rec.update(_counts(design))
    elif getattr(exc, "counts", None):
        rec.update(exc.counts)  # type: ignore[attr-defined]
    rec.update(status="error", error_type=type(exc).__name__, error_message=str(exc),
               fit_seconds=time.perf_counter() - t0)
    if attempts:
        rec.update(attempts=[a.record() for a in attempts], n_attempts=len(attempts))
    return FitResult(rec, pd.DataFrame(columns=PARAM_COLUMNS),
                     pd.DataFrame(columns=VARIANCE_COLUMNS))


def _counts(d: Design) -> dict[str, Any]:
    sizes = d.group_sizes()
    return {"n_obs": d.n, "n_dropped": d.n_dropped, "n_groups": d.n_groups,
            "group_size_min": int(sizes.min()), "group_size_mean": float(sizes.mean()),
            "group_size_max": int(sizes.max())}


def fit(data: pd.DataFrame, spec: ModelSpec) -> FitResult:
    """Fit one model to a DataFrame. Raises SpecError/DataError for input errors only:
    the same checks as ``fit_many``'s planner (columns, their types, names)."""
    if isinstance(data, pd.DataFrame) and isinstance(spec, ModelSpec):
        from .source import open_source

        src = open_source(data)
        src.check_specs([spec], [])
        if src.decimals(spec.columns):
            data, _ = src.read(spec.columns)  # decimals as floats, as fit_many reads them
    with one_blas_thread():
        return fit_shared(data, spec, None)


def fit_shared(data: pd.DataFrame, spec: ModelSpec, source: Any) -> FitResult:
    """``fit``, reusing design matrices built for earlier specs on ``source`` (see
    ``design.build_design``). Only for frames that nobody changes meanwhile: the
    worker's slices within a task, never a user's DataFrame."""
    if not isinstance(spec, ModelSpec):
        from .errors import SpecError

        raise SpecError(f"spec must be a ModelSpec; got (spec={type(spec).__name__})")
    if not isinstance(data, pd.DataFrame):
        from .errors import SpecError

        raise SpecError(f"data must be a pandas DataFrame; got (data={type(data).__name__})")
    t0 = time.perf_counter()
    design: Design | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            design = build_design(data, spec, source=source)
        check_design(design, spec)
        return _fit_design(design, spec, t0)
    except MixedscaleError:
        raise
    except ModelFailure as exc:
        return _error(spec, exc, t0, design)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, MemoryError, TypeError,
            KeyError, IndexError) as exc:
        return _error(spec, exc, t0, design)


def _run_engine(engine: str, d: Design, spec: ModelSpec) -> tuple[Problem, Any, list[Attempt]]:
    diagonal = spec.cov_structure == "diagonal"
    sc = make_scaling(d, diagonal)
    prob = Problem(d, reml=spec.reml, diagonal=diagonal, scaling=sc)
    if engine == "fast":
        return prob, sc, fit_fast(prob, spec.optimizers, spec.maxiter)
    Xs, Zs = d.X @ sc.B, d.Z @ sc.A
    ys = (d.y - d.X @ sc.b0) / sc.sy
    return prob, sc, fit_statsmodels(d, prob, Xs, Zs, ys, spec.reml, spec.optimizers,
                                     spec.maxiter)


# A kept optimum this much below another point's log-likelihood is not the maximum.
LLF_TOL = 1e-3


def _fit_design(d: Design, spec: ModelSpec, t0: float) -> FitResult:
    engines = ["fast", "statsmodels"] if spec.engine == "auto" else [spec.engine]
    runs: list[tuple[Problem, Any, list[Attempt]]] = []
    for eng in engines:
        runs.append(_run_engine(eng, d, spec))
        if any(a.verified for a in runs[-1][2]):
            break
    all_attempts = [a for _, _, atts in runs for a in atts]
    candidates = [(p, s, a) for p, s, atts in runs for a in atts if np.isfinite(a.llf)]
    if not candidates:
        return _error(spec, ModelFailure("no optimizer reached a finite likelihood; "
                                         + "; ".join(a.message for a in all_attempts if
                                                     a.message)), t0, d, all_attempts)
    verified = [c for c in candidates if c[2].verified]
    prob_s, sc, best = max(verified or candidates, key=lambda c: c[2].llf)
    if spec.engine == "statsmodels" and best.verified:
        # statsmodels' optimizers can pass every check at a lower local optimum than
        # lme4's: cross-check with the fast engine (7 ms of a 25 ms 20-row fit). Its
        # attempts are recorded; they are not kept, as the engine asked for is.
        check = _run_engine("fast", d, spec)[2]
        all_attempts += check
        candidates += [(prob_s, sc, a) for a in check if a.verified and np.isfinite(a.llf)]
    # Any point with a higher likelihood means the kept fit is no maximum, whatever its
    # checks say (scaled llfs of one design differ from the data's by one constant).
    top = max(candidates, key=lambda c: c[2].llf)[2]
    beaten = top.llf - best.llf > LLF_TOL
    orig = prob_s  # same structure; only its theta layout is used for the original scale
    theta = transform_theta(prob_s, orig, best.theta, sc.A)
    est = _data_scale_estimates(d, prob_s, sc, best.theta, theta)
    rec = _empty_record(spec)
    rec.update(_counts(d))
    n_par = orig.p + orig.n_theta + 1
    warns = list(dict.fromkeys([*d.warnings, *(w for a in all_attempts for w in a.warnings)]))
    singular = orig.is_singular(theta)
    rec.update(
        status="ok" if best.verified and not beaten else "not_converged",
        converged=bool(best.converged), singular=singular, llf=est.llf,
        aic=-2 * est.llf + 2 * n_par, bic=-2 * est.llf + float(np.log(d.n)) * n_par,
        scale=est.sigma2, engine=best.engine, method=best.method,
        n_attempts=len(all_attempts), attempts=_records(all_attempts, est.llf - best.llf),
        grad_max=float(best.grad_max),
        hessian_pd=None if best.hessian_pd is None else bool(best.hessian_pd),
        theta=[float(t) for t in theta], warnings=warns,
    )
    if singular:
        rec["warnings"] = [*warns, "boundary (singular) fit: see isSingular"]
    if not best.verified or beaten:
        why = [] if best.converged else ["the optimizer did not report convergence"]
        if best.grad_max > 2e-3:
            why.append(f"scaled gradient {best.grad_max:.3g} > 2e-3")
        if best.hessian_pd is False and not best.singular:
            why.append("Hessian is singular or not positive definite (an eigenvalue "
                       f"below {HESS_RATIO_TOL:g} of the largest): the variance parameters "
                       "are not uniquely determined; a random effect may not vary within "
                       "groups, or the model may be too complex for the data")
        if beaten:
            why.append(f"a local optimum: {top.engine} {top.method} reached a log-likelihood "
                       f"higher by {top.llf - best.llf:.3g}")
        rec["error_message"] = "not verified: " + "; ".join(why)
    params, variance = _params_table(d, est), _variance_table(d, spec, orig, est)
    rec["fit_seconds"] = time.perf_counter() - t0  # tidy rows included, as in a batch
    return FitResult(rec, params, variance)


def _data_scale_estimates(d: Design, prob_s: Problem, sc: Scaling, theta_s: np.ndarray,
                          theta: np.ndarray) -> Estimates:
    """Estimates computed in the engines' well-conditioned scaled problem, mapped back exactly.

    Recomputing them from the raw design instead loses about cond(X)^2 * eps to
    rounding: with near-collinear fixed effects, enough to reorder two engines' llf.
    """
    es = prob_s.estimates(theta_s)
    sy2 = sc.sy**2
    beta = sc.sy * (sc.B @ es.beta) + sc.b0
    dof = prob_s.n - prob_s.p if prob_s.reml else prob_s.n
    llf = es.llf - dof * np.log(sc.sy)
    if prob_s.reml and prob_s.p:
        llf += np.linalg.slogdet(sc.B)[1]
    return Estimates(theta=theta, llf=float(llf), beta=beta,
                     cov_beta=sy2 * (sc.B @ es.cov_beta @ sc.B.T), sigma2=float(sy2 * es.sigma2),
                     re_cov=sy2 * (sc.A @ es.re_cov @ sc.A.T), vc_var=sy2 * es.vc_var)


def _records(attempts: list[Attempt], offset: float) -> list[dict[str, Any]]:
    """Attempt records with llf moved from the engines' scaled problem to the data's scale.

    Every engine optimizes the same internally scaled problem, whose log-likelihood
    differs from the reported one by a constant (the Jacobian of the scaling).
    """
    recs = [a.record() for a in attempts]
    for r in recs:
        if r["llf"] is not None:
            r["llf"] = float(r["llf"] + offset)
    return recs


def _params_table(d: Design, est: Estimates) -> pd.DataFrame:
    se = np.sqrt(np.clip(np.diag(est.cov_beta), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = est.beta / se
    crit = stats.norm.ppf(0.975)
    return pd.DataFrame({
        "term": d.x_names, "estimate": est.beta, "std_error": se, "statistic": z,
        "p_value": 2 * stats.norm.sf(np.abs(z)), "conf_low": est.beta - crit * se,
        "conf_high": est.beta + crit * se,
    })


def _variance_table(d: Design, spec: ModelSpec, prob: Problem, est: Estimates) -> pd.DataFrame:
    rows: list[tuple[str, str | None, str | None, str, float]] = []
    g = spec.groups or "all"
    q = prob.q_re
    for i in range(q):
        rows.append((g, d.z_names[i], None, "re", float(est.re_cov[i, i])))
    if not prob.diagonal:
        for i in range(q):
            for j in range(i + 1, q):
                rows.append((g, d.z_names[i], d.z_names[j], "re", float(est.re_cov[i, j])))
    vc = dict(d.vc)
    for k, name in enumerate(prob.vc_names):
        rows.append((name, _vc_term(vc[name], (spec.vc_formula or {}).get(name, "")), None,
                     "vc", float(est.vc_var[k])))
    rows.append(("Residual", None, None, "residual", est.sigma2))
    # Text columns typed as such, so a column of only None reads like the others.
    return pd.DataFrame(rows, columns=VARIANCE_COLUMNS).astype(
        dict.fromkeys(VARIANCE_COLUMNS[:4], pd.StringDtype(na_value=np.nan)))


def _vc_term(M: np.ndarray, formula: str) -> str:
    """What a variance component varies: "Intercept" when its columns are level
    indicators (``0 + C(cask)``, lme4's ``(1 | batch:cask)``), else its formula's
    terms (``0 + x`` is a slope on x, as lme4's ``(0 + x | g)``)."""
    if M.size == 0 or (np.isin(M, (0.0, 1.0)).all() and (M.sum(axis=1) <= 1).all()):
        return "Intercept"
    terms = [t.strip() for t in formula.split("+")]
    return " + ".join(t for t in terms if t not in ("0", "-1", "")) or formula


def wald(beta: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, ...]:
    """z statistic, two-sided p-value and normal 95% interval, as statsmodels' MixedLM
    computes them from an estimate and its standard error (here lme4's, see README)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = beta / se
    crit = stats.norm.ppf(0.975)
    return z, 2 * stats.norm.sf(np.abs(z)), beta - crit * se, beta + crit * se
