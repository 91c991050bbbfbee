"""The two optimizers of the profiled deviance and the verification they share.

- ``fast``: scipy's bounded optimizers directly on lme4's profiled deviance.
- ``statsmodels``: MixedLM.fit on internally scaled arrays, each optimum then
  re-evaluated and verified through the same deviance.

An attempt counts as verified only when lme4's convergence checks pass on it:
scaled gradient <= 2e-3 and a positive-definite Hessian unless singular.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from .design import Design
from .lmm import Problem

__all__ = ["GRAD_TOL", "Attempt", "check_optimum", "fit_fast", "fit_statsmodels"]

GRAD_TOL = 2e-3  # lme4's check.conv.grad tolerance, on the deviance scale
# lme4's check.conv.hess tol: a Hessian whose smallest eigenvalue is below this
# share of its largest is numerically singular ("nearly unidentifiable"): the
# deviance is flat along a line, so the variance parameters are not unique.
HESS_RATIO_TOL = 1e-6
_FD_STEP = 1e-4  # lme4's deriv12 delta
_POLISH_BELOW = 1e-5  # scaled gradient under which Newton polishing gains nothing measurable
_BOUND_PROBE = 1e-2  # step into the interior from a parameter on its bound

# statsmodels' optimizer names mapped to scipy's bounded methods for the fast engine.
_SCIPY = {"lbfgs": "L-BFGS-B", "bfgs": "SLSQP", "powell": "Powell", "nm": "Nelder-Mead",
          "cg": "TNC"}


# statsmodels' optimizers stop at their default tolerances, a little short of the
# optimum lme4 reaches; tighter ones cost a few iterations and close the gap.
_SM_TOLERANCES: dict[str, dict[str, Any]] = {
    "lbfgs": {"pgtol": 1e-10, "factr": 10.0},
    "bfgs": {"gtol": 1e-9},
    "cg": {"gtol": 1e-9},
    "powell": {"xtol": 1e-10, "ftol": 1e-12},
    "nm": {"xtol": 1e-10, "ftol": 1e-12},
}
# From 0.15, MixedLM.fit passes on only these (it drops the others with a FutureWarning
# that says later versions will raise), so lbfgs keeps its defaults there; polishing
# and the fast engine's cross-check close what is left.
_SM_PASSED = frozenset({"gtol", "maxiter", "eps", "maxcor", "ftol", "tol", "disp", "maxls"})


def _sm_tolerances(method: str) -> dict[str, Any]:
    import statsmodels

    tol = _SM_TOLERANCES.get(method, {})
    major, minor = (int(v) for v in statsmodels.__version__.split(".")[:2])
    if (major, minor) >= (0, 15):
        return {k: v for k, v in tol.items() if k in _SM_PASSED}
    return tol


@dataclass
class Attempt:
    engine: str
    method: str
    theta: np.ndarray  # in the scaled parametrization of the engine's Problem
    llf: float
    converged: bool
    grad_max: float
    hessian_pd: bool | None  # None: every parameter on its bound, no Hessian to check
    singular: bool
    n_evals: int
    seconds: float
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        # lme4's checks decide, not the optimizer's own flag: statsmodels' Nelder-Mead,
        # for one, can stop at its iteration limit on a point that passes them (and
        # whether it does depended on the row order of the data).
        return (np.isfinite(self.llf) and self.grad_max <= GRAD_TOL
                and (self.hessian_pd is not False or self.singular))

    def record(self) -> dict[str, Any]:
        return {"engine": self.engine, "method": self.method, "llf": _f(self.llf),
                "converged": bool(self.converged), "grad_max": _f(self.grad_max),
                "hessian_pd": None if self.hessian_pd is None else bool(self.hessian_pd),
                "n_evals": int(self.n_evals),
                "seconds": float(self.seconds), "message": self.message[:200]}


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def check_optimum(prob: Problem, theta: np.ndarray) -> tuple[float, bool | None]:
    """lme4-style checks at theta: (max scaled gradient, Hessian positive definite, or
    None when every parameter is on its bound and no Hessian is left to check).

    Derivatives are central differences of the deviance with lme4's step. A
    parameter sitting on its lower bound is a Karush-Kuhn-Tucker optimum when
    the deviance rises into the feasible side, so it drops out of both checks.
    """
    th = np.asarray(theta, dtype=float)
    k = th.size
    h = _FD_STEP
    on_bound = np.isfinite(prob.lower) & (th - prob.lower < h)
    free = np.flatnonzero(~on_bound)
    # Every stencil point first, then one vectorized evaluation (prob.deviances).
    eye = np.eye(k)
    pts = [th]
    for j in range(k):
        # A relative SD of 0 is a stationary point by symmetry (the deviance is even in
        # it), also when the deviance falls into the interior; so probe further in too.
        pts += [th + h * eye[j], th + _BOUND_PROBE * eye[j]] if on_bound[j] else [
            th + h * eye[j], th - h * eye[j]]
    mixed = [(int(a), int(b)) for i, a in enumerate(free) for b in free[:i]]
    for i, j in mixed:
        ei, ej = h * eye[i], h * eye[j]
        pts += [th + ei + ej, th + ei - ej, th - ei + ej, th - ei - ej]
    v = prob.deviances(np.array(pts))
    f0 = v[0]
    if not np.isfinite(f0):
        return np.inf, False
    fa, fb = v[1:1 + 2 * k:2], v[2:2 + 2 * k:2]  # +h e_j, and -h e_j or the far probe
    grad = np.where(on_bound, np.minimum(np.minimum((fa - f0) / h, (fb - f0) / _BOUND_PROBE),
                                         0.0), (fa - fb) / (2 * h))
    H = np.zeros((k, k))  # only the free block is used
    H[free, free] = (fa[free] - 2 * f0 + fb[free]) / h**2
    for m, (i, j) in enumerate(mixed):
        pp, pm, mp, mm = v[1 + 2 * k + 4 * m: 5 + 2 * k + 4 * m]
        H[i, j] = H[j, i] = (pp - pm - mp + mm) / (4 * h * h)
    return lme4_verdict(grad, H, on_bound)


class _Counter:
    def __init__(self, f: Any) -> None:
        self.f = f
        self.n = 0

    def __call__(self, x: np.ndarray) -> float:
        self.n += 1
        return float(self.f(x))


class _WithGradient:
    """The deviance and its central-difference gradient at once, for scipy's gradient
    methods: the stencil goes through ``prob.deviances`` in one call, where scipy's own
    forward differences take one call per parameter and a step near sqrt(eps), too small
    for deviances in the 1e5s (about 1e-3 of rounding noise in each component)."""

    _STEP = 6e-6  # ~ eps^(1/3): balances rounding and truncation of central differences

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        self.n = 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        x = np.asarray(x, dtype=float)
        k = x.size
        h = self._STEP * np.maximum(1.0, np.abs(x))
        E = np.diag(h)
        # Near a lower bound, one-sided second-order differences stay feasible.
        near = x - h < self.prob.lower
        v = self.prob.deviances(np.concatenate([x[None], x + E, np.where(
            near[:, None], x + 2 * E, x - E)]))
        self.n += len(v)
        f0, fp, fm = v[0], v[1:1 + k], v[1 + k:]
        g = np.where(near, (-3 * f0 + 4 * fp - fm) / (2 * h), (fp - fm) / (2 * h))
        if not np.isfinite(f0):
            return np.inf, np.zeros(k)
        return float(f0), np.where(np.isfinite(g), g, 0.0)


def _finish(prob: Problem, engine: str, method: str, theta: np.ndarray, converged: bool,
            n_evals: int, t0: float, message: str, warns: list[str]) -> Attempt:
    theta = np.maximum(np.asarray(theta, dtype=float), prob.lower)
    llf = -0.5 * prob.deviance(theta)
    gmax, pd_ = check_optimum(prob, theta) if np.isfinite(llf) else (np.inf, False)
    return Attempt(engine=engine, method=method, theta=theta, llf=llf, converged=converged,
                   grad_max=gmax, hessian_pd=pd_, singular=prob.is_singular(theta),
                   n_evals=n_evals, seconds=time.perf_counter() - t0, message=message,
                   warnings=warns)


def fit_fast(prob: Problem, optimizers: tuple[str, ...], maxiter: int) -> list[Attempt]:
    """Optimize lme4's profiled deviance; escalate through optimizers until one verifies.

    Each escalation step restarts from the best point so far, so a later
    optimizer polishes rather than repeats.
    """
    attempts: list[Attempt] = []
    start = prob.theta0.copy()
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in prob.lower]
    for method in optimizers:
        t0 = time.perf_counter()
        sp = _SCIPY[method]
        # Gradient methods take the stencil-at-once gradient; the others, values only.
        fun: _Counter | _WithGradient = (_WithGradient(prob) if sp in ("L-BFGS-B", "SLSQP")
                                         else _Counter(prob.deviance))
        opts: dict[str, Any] = {"maxiter": maxiter}
        if sp == "Nelder-Mead":
            opts.update(xatol=1e-8, fatol=1e-10)
        elif sp == "Powell":
            opts.update(xtol=1e-8, ftol=1e-12)
        elif sp == "L-BFGS-B":
            opts.update(ftol=1e-14, gtol=1e-8)
        elif sp == "SLSQP":
            opts.update(ftol=1e-14)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = optimize.minimize(fun, start, method=sp, bounds=bounds, options=opts,
                                        jac=isinstance(fun, _WithGradient))
            att = _finish(prob, "fast", method, res.x, bool(res.success), fun.n, t0,
                          str(res.message), [str(w.message) for w in caught])
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
            att = Attempt("fast", method, start, -np.inf, False, np.inf, False, False, fun.n,
                          time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        attempts.append(att)
        if att.verified:
            attempts += _restarts(prob, maxiter, att)
            best = max((a for a in attempts if a.verified), key=lambda a: a.llf)
            polished = polish(prob, best)
            if polished is not None:
                attempts.append(polished)
            break
        best = max(attempts, key=lambda a: a.llf)
        if np.isfinite(best.llf):
            start = best.theta.copy()
    return attempts


def polish(prob: Problem, att: Attempt, max_steps: int = 6) -> Attempt | None:
    """Newton steps from a verified interior optimum: lme4's gradient tolerance (2e-3)
    still allows a llf a few 1e-6 short; this closes the gap. None if nothing improved."""
    t0 = time.perf_counter()
    if att.grad_max < _POLISH_BELOW:
        return None
    th = att.theta.copy()
    free = np.flatnonzero(~(th - prob.lower < 1e-6))  # parameters on a bound stay there
    if free.size == 0:
        return None

    def f(subs: np.ndarray) -> np.ndarray:
        full = np.repeat(th[None], len(subs), axis=0)
        full[:, free] = subs
        return prob.deviances(full)

    x = th[free].copy()
    k = x.size
    h = _FD_STEP
    f0 = float(f(x[None])[0])
    n = 1
    eye = np.eye(k) * h
    lower = prob.lower[free]
    mixed = [(i, j) for i in range(k) for j in range(i)]
    for _ in range(max_steps):
        v = f(np.array([*(x + eye), *(x - eye), *(x + eye[i] + eye[j] for i, j in mixed)]))
        fp, fm = v[:k], v[k:2 * k]
        g = (fp - fm) / (2 * h)
        H = np.diag((fp - 2 * f0 + fm) / h**2)
        for m, (i, j) in enumerate(mixed):
            H[i, j] = H[j, i] = (v[2 * k + m] - fp[i] - fp[j] + f0) / h**2
        n += 2 * k + k * (k - 1) // 2
        try:
            w, V = np.linalg.eigh(H)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(w)) or w.min() <= 0:
            break
        d = -V @ ((V.T @ g) / w)
        if -g @ d < 1e-12:
            break
        trials = np.maximum(x + np.array([1.0, 0.5, 0.25])[:, None] * d, lower)
        ft = f(trials)
        n += len(trials)
        better = np.flatnonzero(ft < f0)
        if not better.size:
            break
        x, f0 = trials[better[0]], float(ft[better[0]])  # the longest step that descends
    if not f0 < -2 * att.llf - 1e-12:
        return None
    th[free] = x
    return _finish(prob, att.engine, f"{att.method}+newton", th, att.converged, n, t0, "", [])


# Groups per covariance parameter from which fit() searches only a boundary optimum
# again. The audit's slices with several optima had 4-10 groups; with 2,000 groups the
# full search doubled the time of a 100k-row fit (0.07 -> 0.13 s).
_MULTISTART_GROUPS = 50


def _restarts(prob: Problem, maxiter: int, found: Attempt) -> list[Attempt]:
    """Search again from other starting points: the deviance can have several local
    optima (an interior one below a boundary one, or the reverse), and lme4 starts once.
    The caller keeps the highest verified likelihood.

    Without variance components: a vectorized Newton from every start of
    ``batch.start_bank``, reported as one attempt (its best point). With them:
    Nelder-Mead from lme4's start when the optimum found is on the boundary, and
    L-BFGS-B from the other starts of the bank. With many groups per parameter, only
    a boundary optimum is searched again, from lme4's start."""
    from .batch import newton, start_bank

    t0 = time.perf_counter()
    few = prob.n_groups < _MULTISTART_GROUPS * prob.n_theta
    if not (few or found.singular):
        return []
    bank = start_bank(prob.lower) if few else prob.theta0[None]
    bp = prob.batched()
    if bp is not None:
        many = bp.subset(np.zeros(len(bank), dtype=np.intp))
        th, conv, n = newton(many, maxiter=min(maxiter, 50), start=bank)
        dev = np.where(conv, many.deviance(th), np.inf)
        i = int(np.argmin(dev))
        return [_finish(prob, "fast", "newton-multistart" if few else "newton", th[i],
                        bool(conv[i]), n * len(bank), t0, "", [])]
    out = []
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in prob.lower]
    if found.singular:
        fun = _Counter(prob.deviance)
        res = optimize.minimize(fun, prob.theta0, method="Nelder-Mead", bounds=bounds,
                                options={"maxiter": maxiter, "xatol": 1e-8, "fatol": 1e-10})
        out.append(_finish(prob, "fast", "nm", res.x, bool(res.success), fun.n, t0,
                           str(res.message), []))
    if len(bank) > 1:  # the bank beyond lme4's start, where the first optimizer began
        t1 = time.perf_counter()
        fun = _Counter(prob.deviance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs = [optimize.minimize(fun, start, method="L-BFGS-B", bounds=bounds,
                                      options={"maxiter": maxiter, "ftol": 1e-14,
                                               "gtol": 1e-8}) for start in bank[1:]]
        best = min(runs, key=lambda r: r.fun)
        out.append(_finish(prob, "fast", "lbfgs-multistart", best.x, bool(best.success),
                           fun.n, t1, str(best.message), []))
    return out


def _sm_vc(d: Design, Zs: np.ndarray, diagonal: bool) -> tuple[np.ndarray | None, dict[str, Any]]:
    """statsmodels' exog_re / exog_vc. A diagonal covariance becomes one variance
    component per random-effect column, since MixedLM's free mask fails there."""
    codes = d.group_codes
    rows = [np.flatnonzero(codes == g) for g in range(d.n_groups)]
    vc: dict[str, dict[int, np.ndarray]] = {}
    exog_re: np.ndarray | None = Zs if Zs.shape[1] else None
    if diagonal and Zs.shape[1]:
        exog_re = None
        for j in range(Zs.shape[1]):
            vc[f"re{j:03d}"] = {g: Zs[r][:, [j]] for g, r in enumerate(rows)}
    for k, (_, M) in enumerate(d.vc):
        parts = {}
        for g, r in enumerate(rows):
            block = M[r]
            used = np.flatnonzero((block != 0).any(axis=0))
            parts[g] = block[:, used] if used.size else np.zeros((len(r), 1))
        vc[f"vc{k:03d}"] = parts
    return exog_re, vc


def fit_statsmodels(d: Design, prob: Problem, Xs: np.ndarray, Zs: np.ndarray, ys: np.ndarray,
                    reml: bool, optimizers: tuple[str, ...], maxiter: int) -> list[Attempt]:
    """statsmodels' MixedLM, escalating through its optimizers until one verifies."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    exog_re, vc = _sm_vc(d, Zs, prob.diagonal)
    attempts: list[Attempt] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MixedLM(ys, Xs, groups=d.group_codes, exog_re=exog_re,
                        exog_vc=vc or None, use_sqrt=True)
    n_re = 0 if exog_re is None else exog_re.shape[1]
    # Count the log-likelihood's evaluations: MixedLMResults has no record of them
    # (no mle_retvals), and the optimizers look model.loglike up on every call.
    calls = [0]
    loglike = model.loglike

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return loglike(*args, **kwargs)

    model.loglike = counted  # type: ignore[method-assign]
    for method in optimizers:
        t0 = time.perf_counter()
        calls[0] = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = model.fit(reml=reml, method=method, maxiter=maxiter,
                                **_sm_tolerances(method))
            scale = float(res.scale)
            cov_rel = np.asarray(res.cov_re, dtype=float) / scale if n_re else np.zeros((0, 0))
            vcomp = np.asarray(res.vcomp, dtype=float) / scale
            if prob.diagonal and prob.q_re:
                cov_rel = np.diag(vcomp[: prob.q_re])
                vcomp = vcomp[prob.q_re:]
            theta = prob.theta_from_cov(cov_rel, vcomp)
            att = _finish(prob, "statsmodels", method, theta, bool(res.converged), calls[0], t0,
                          "", [str(w.message) for w in caught])
        except (ValueError, np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError) as exc:
            att = Attempt("statsmodels", method, prob.theta0.copy(), -np.inf, False, np.inf,
                          False, False, calls[0], time.perf_counter() - t0,
                          f"{type(exc).__name__}: {exc}")
        attempts.append(att)
        if att.verified:
            polished = polish(prob, att)
            if polished is not None:
                attempts.append(polished)
            break
    return attempts


def lme4_verdict(grad: np.ndarray, H: np.ndarray, on_bound: np.ndarray
                 ) -> tuple[float, bool | None]:
    """lme4's convergence verdict from derivatives at an optimum: (max scaled gradient, PD).

    ``grad`` has one-sided entries for parameters on their bound, which drop out of the
    Hessian; ``H`` is the full central-difference Hessian. PD is None when no parameter
    is free: there is no Hessian to check, and the gradient decides alone.
    """
    free = np.flatnonzero(~on_bound)
    if free.size == 0:
        return float(np.max(np.abs(grad), initial=0.0)), None
    Hf = H[np.ix_(free, free)]
    g_free = grad[free]
    if not np.all(np.isfinite(Hf)):
        return float(np.max(np.abs(grad))), False
    eig = np.linalg.eigvalsh(Hf)
    pd_ = bool(eig.min() > HESS_RATIO_TOL * max(1.0, abs(eig.max())))
    try:
        # lme4's solve(chol(H), g): R's chol is the upper factor, numpy's L its transpose.
        sc = np.linalg.solve(np.linalg.cholesky(Hf).T, g_free)
        mingrad = np.minimum(np.abs(sc), np.abs(g_free))
    except np.linalg.LinAlgError:
        mingrad = np.abs(g_free)
    gmax = max(float(mingrad.max(initial=0.0)), float(np.abs(grad[on_bound]).max(initial=0.0)))
    return gmax, pd_
