"""The batched fast engine: many slices of one spec optimized together.

For a task holding many slices of the same model (one per gene, site, ...), the
design matrices are built once for the whole task, the per-group sufficient
statistics of every slice are computed in one vectorized pass, and lme4's
profiled deviance is evaluated for all slices at once, as arrays shaped
(fits, groups, q, q). A vectorized Newton method with finite-difference
derivatives optimizes every slice together; the derivatives at the optimum
are the lme4 convergence checks, so verification costs nothing extra.

Every slice that is not verified here (or that the shared design does not
fit: missing categorical levels, stateful transforms, a failed sanity check)
goes back to the per-fit path in ``single.fit``, which escalates through more
optimizers and statsmodels. So batching changes speed, never the verdict.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .design import ModelFailure, build_design
from .engines import GRAD_TOL, HESS_RATIO_TOL, lme4_verdict
from .errors import MixedscaleError
from .lmm import ones_columns
from .single import versions, wald
from .spec import ModelSpec
from .store import FIT_SCHEMA, constant

__all__ = ["MIN_BATCH", "BatchOutput", "batchable", "fit_slices"]

_LOG2PI = float(np.log(2 * np.pi))
_H = 1e-4  # lme4's finite-difference step, as in engines.check_optimum
_STATEFUL = ("center(", "standardize(", "scale(", "Poly(")
MIN_BATCH = 4  # below this, the per-fit path is as fast


@dataclass
class BatchOutput:
    """Results for the slices fitted here; ``fallback`` lists slice positions left to fit()."""

    fits: pa.Table  # one row per fitted slice (store.FIT_SCHEMA columns), with "_slice"
    params: pa.Table  # with "_slice"
    variance: pa.Table  # with "_slice"
    fallback: list[int]

    @property
    def records(self) -> list[dict[str, Any]]:
        """The fit rows as dicts, as ``single.fit`` returns them."""
        return self.fits.to_pylist()


class BatchProblem:
    """lme4's profiled deviance for F fits of one structure, vectorized over fits and groups."""

    def __init__(self, ZtZ: np.ndarray, ZtX: np.ndarray, Zty: np.ndarray, XtX: np.ndarray,
                 Xty: np.ndarray, yty: np.ndarray, n: np.ndarray, reml: bool,
                 diagonal: bool) -> None:
        self.ZtZ, self.ZtX, self.Zty = ZtZ, ZtX, Zty
        self.XtX, self.Xty, self.yty = XtX, Xty, yty
        self.n = n.astype(float)
        self.F, self.G, self.q = ZtZ.shape[:3]
        self.p = XtX.shape[1]
        self.reml = reml
        self.diagonal = diagonal
        if diagonal:
            self.rows = self.cols = np.arange(self.q)
        else:
            self.rows, self.cols = np.tril_indices(self.q)
        self.k = len(self.rows)
        self.lower = np.where(self.rows == self.cols, 0.0, -np.inf)
        self.R = np.concatenate([Zty[..., None], ZtX], axis=3)  # (F, G, q, 1+p)
        # For q <= 2 the solve's cross-products are weighted sums, over groups, of
        # fixed outer products of R's rows (upper triangles only): precomputed once,
        # so an evaluation costs O(F G) scalars and one batched matmul.
        self.tri = np.triu_indices(self.p + 1)
        self.tri_col = {(int(i), int(j)): m for m, (i, j) in enumerate(zip(*self.tri,
                                                                          strict=True))}
        self.P: np.ndarray | None = None
        if self.q in (1, 2):
            r0 = self.R[:, :, 0, :]
            i, j = self.tri
            outer = [r0[..., i] * r0[..., j]]
            if self.q == 2:
                r1 = self.R[:, :, 1, :]
                outer += [r0[..., i] * r1[..., j] + r1[..., i] * r0[..., j],
                          r1[..., i] * r1[..., j]]
            self.P = np.concatenate(outer, axis=1)  # (F, len(outer) * G, n_tri)
        # Z'Z's entries as contiguous (F, G) arrays: on strided views of ZtZ, the closed
        # forms made a random-slope deviance ~8 % slower (1,500 fits of genes).
        self.z00 = np.ascontiguousarray(ZtZ[..., 0, 0]) if self.q in (1, 2) else None
        self.z01 = np.ascontiguousarray(ZtZ[..., 0, 1]) if self.q == 2 else None
        self.z11 = np.ascontiguousarray(ZtZ[..., 1, 1]) if self.q == 2 else None
        if self.q == 2:
            z = ZtZ
            self.detC = np.maximum(z[..., 0, 0] * z[..., 1, 1] - z[..., 0, 1] ** 2, 0.0)

    def subset(self, sel: np.ndarray) -> BatchProblem:
        """The same problem for fits ``sel`` only."""
        sub = object.__new__(BatchProblem)
        sub.__dict__.update(self.__dict__)
        for name in ("ZtZ", "ZtX", "Zty", "XtX", "Xty", "yty", "n", "R", "P", "detC", "z00",
                     "z01", "z11"):
            v = getattr(self, name, None)
            setattr(sub, name, None if v is None else v[sel])
        sub.F = int(sub.n.shape[0])
        return sub

    def lam(self, th: np.ndarray) -> np.ndarray:
        L = np.zeros((th.shape[0], self.q, self.q))
        L[:, self.rows, self.cols] = th
        return L

    def solve(self, th: np.ndarray, with_beta: bool = False) -> tuple[Any, ...]:
        """(logdet L^2, logdet RX'RX, RX'RX, beta, penalized RSS, ok) for each fit at
        ``th`` (F, k); beta is None unless ``with_beta``."""
        p = self.p
        ld, up, S = self._products(th)
        if S is None:
            S = np.empty((*up.shape[:-1], p + 1, p + 1))
            S[..., self.tri[0], self.tri[1]] = up
            S[..., self.tri[1], self.tri[0]] = up
        cucu = S[..., 0, 0]
        rhs = self.Xty - S[..., 1:, 0]
        RtR = self.XtX - S[..., 1:, 1:]
        RX, ok = _cholesky(RtR)
        ldx = 2.0 * np.log(np.diagonal(RX, axis1=-2, axis2=-1)).sum(axis=-1)
        cb = _forward(RX, rhs)
        beta = _backward(RX, cb) if with_beta else None
        r2 = self.yty - cucu - (cb * cb).sum(axis=-1)
        ok &= r2 > 0
        return ld, ldx, RtR, beta, r2, ok

    def _products(self, th: np.ndarray) -> tuple[np.ndarray, Any, np.ndarray | None]:
        """(logdet L^2, up, S) at ``th``: for q <= 2 the upper triangle ``up`` (..., n_tri)
        of the cross-products [cu | CX]'[cu | CX] and S None; else up None and S whole."""
        if self.q in (1, 2):
            ld, w = self._weights(th)
            return ld, self._cross(w), None
        ld, S = self._general(th)
        return ld, None, S

    def _cross(self, w: np.ndarray) -> np.ndarray:
        """``up`` from the weights (..., F, n_w): per fit, its weights times P[f]."""
        assert self.P is not None
        if self.P.shape[0] == 1:  # one fit: all thetas in one matrix product
            return w @ self.P[0]
        if w.ndim == 3:  # points x fits: one product per fit for all its points, so F
            # BLAS calls, not points x F (their per-call cost was most of this product)
            return np.matmul(w.transpose(1, 0, 2), self.P).transpose(1, 0, 2)
        return np.matmul(w[..., None, :], self.P)[..., 0, :]

    def _weights(self, th: np.ndarray, out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(logdet L^2, w) at ``th`` for q <= 2: the weights of P's rows, (..., F, n_w),
        written into ``out`` if given."""
        q = self.q
        if q == 1:
            lam2 = th[..., 0:1] ** 2
            m = lam2 * self.z00 + 1.0  # (F, G)
            ld = np.log(m).sum(axis=-1)
            w = np.divide(lam2, m, out=out)
        elif q == 2:
            # Closed forms for a 2x2 lower-triangular factor [[a, 0], [b, c]], with
            # M = I + L'CL per group (C = Z'Z): det M = 1 + tr(CV) + det C (ac)^2, where
            # V = LL', so no sqrt and one log; the weights are W = L M^-1 L' = L adj(M) L'
            # / det M. det M >= 1 always: no cancellation beyond det C's own, clipped once.
            a = th[..., 0:1]
            c = th[..., -1:]
            z00, z01, z11 = self.z00, self.z01, self.z11
            aa, cc, ac = a * a, c * c, a * c
            m11 = cc * z11 + 1.0
            if self.diagonal:
                m00 = aa * z00 + 1.0
                m01 = ac * z01
            else:
                b = th[..., 1:2]
                m00 = aa * z00 + (2 * a * b) * z01 + (b * b) * z11 + 1.0
                m01 = ac * z01 + (b * c) * z11
            det = m00 + m11 - 1.0 + (ac * ac) * self.detC
            ld = np.log(det).sum(axis=-1)
            r = 1.0 / det
            t, u, v = m11 * r, m01 * r, m00 * r
            G = t.shape[-1]
            w = np.empty((*t.shape[:-1], 3 * G)) if out is None else out
            np.multiply(aa, t, out=w[..., :G])
            if self.diagonal:
                np.multiply(-ac, u, out=w[..., G:2 * G])
                np.multiply(cc, v, out=w[..., 2 * G:])
            else:
                w[..., G:2 * G] = (a * b) * t - ac * u
                w[..., 2 * G:] = (b * b) * t - (2 * b * c) * u + cc * v
        return ld, w

    def _terms(self, up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logdet RX'RX, penalized RSS, ok) from ``up``, as ``solve`` computes them, but
        entry by entry on whole arrays: no (p+1)^2 matrices are built, and no numpy
        reduction runs over an axis of length p (its slowest case, ~40 % of genes'
        deviance time). The same operations in the same order (numpy sums an axis this
        short from its first entry on), so the same values, bit for bit. Entries of
        fits that are not ok hold whatever they hold: the deviance ignores them."""
        p, col, XtX = self.p, self.tri_col, self.XtX

        def s(i: int, j: int) -> np.ndarray:  # S[..., i, j], i <= j
            return up[..., col[i, j]]

        L: dict[tuple[int, int], np.ndarray] = {}
        ok: np.ndarray | None = None
        ldx: np.ndarray | None = None
        for j in range(p):
            d = XtX[:, j, j] - s(1 + j, 1 + j)
            if j:
                d = d - _dot([L[j, k] for k in range(j)], [L[j, k] for k in range(j)])
            ok = d > 0 if ok is None else ok & (d > 0)
            L[j, j] = ljj = np.sqrt(np.where(d > 0, d, 1.0))
            lg = np.log(ljj)
            ldx = lg if ldx is None else ldx + lg
            for i in range(j + 1, p):
                a = XtX[:, i, j] - s(1 + j, 1 + i)
                if j:
                    a = a - _dot([L[i, k] for k in range(j)], [L[j, k] for k in range(j)])
                L[i, j] = a / ljj
        cb: list[np.ndarray] = []
        for i in range(p):
            b = self.Xty[:, i] - s(0, 1 + i)
            if i:
                b = b - _dot([L[i, k] for k in range(i)], cb)
            cb.append(b / L[i, i])
        r2 = self.yty - s(0, 0)
        if p:
            r2 = r2 - _dot(cb, cb)
        assert ok is not None and ldx is not None
        return 2.0 * ldx, r2, ok & (r2 > 0)

    def _general(self, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logdet L^2, cross-products S) for q > 2, through batched Cholesky factors."""
        q, p = self.q, self.p
        L = self.lam(th)
        M = np.einsum("fji,fgjk,fkl->fgil", L, self.ZtZ, L, optimize=True)
        M[..., np.arange(q), np.arange(q)] += 1.0
        Rm = np.einsum("fji,fgjm->fgim", L, self.R, optimize=True)
        Lc = np.linalg.cholesky(M)
        ld = 2.0 * np.log(np.diagonal(Lc, axis1=2, axis2=3)).sum(axis=(1, 2))
        sol = np.linalg.solve(Lc, Rm).reshape(self.F, self.G * q, p + 1)
        # sum over groups of [cu | CX]' [cu | CX], as one batched matmul
        return ld, np.matmul(np.swapaxes(sol, 1, 2), sol)

    @property
    def entrywise(self) -> bool:
        """Whether the deviance goes through ``_terms`` (closed forms, few fixed effects)."""
        return 0 < self.p <= _SMALL_P and self.q in (1, 2)

    def deviance(self, th: np.ndarray) -> np.ndarray:
        """Profiled deviance at ``th`` (F, k), or ([T,] F, k), for each fit."""
        with np.errstate(all="ignore"):
            if self.entrywise:
                ld, up, _ = self._products(th)
                return self._deviance(ld, *self._terms(up))
            ld, ldx, _, _, r2, ok = self.solve(th)
            return self._deviance(ld, ldx, r2, ok)

    def deviance_points(self, th: np.ndarray, off: np.ndarray) -> np.ndarray:
        """Deviance at th + off[t] for every offset, (T, F), where ``entrywise``: the
        weights one point at a time (arrays of one point stay in cache), then ``up`` for
        all points in one product per fit."""
        assert self.P is not None
        with np.errstate(all="ignore"):
            w = np.empty((len(off), self.F, self.P.shape[1]))  # filled in place, not stacked
            ld = np.stack([self._weights(th + o, out=w[t])[0] for t, o in enumerate(off)])
            return self._deviance(ld, *self._terms(self._cross(w)))

    def _deviance(self, ld: np.ndarray, ldx: np.ndarray, r2: np.ndarray, ok: np.ndarray
                  ) -> np.ndarray:
        """The deviance from its parts (callers hold np.errstate(all="ignore"))."""
        n = self.n
        if self.reml:
            dof = n - self.p
            dev = ld + ldx + dof * (1.0 + _LOG2PI + np.log(r2 / dof))
        else:
            dev = ld + n * (1.0 + _LOG2PI + np.log(r2 / n))
        return np.where(ok & np.isfinite(dev), dev, np.inf)


_SMALL_P = 4  # up to this many fixed effects, unrolled numpy beats batched LAPACK calls


def _dot(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """sum_k a[k] * b[k], added left to right from the first product (as numpy's sum
    over a short axis does)."""
    out = a[0] * b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        out = out + x * y
    return out


def _cholesky(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of a stack of SPD matrices, and which ones are PD; a
    non-PD matrix gets the identity (its fit is then marked not ok)."""
    p = A.shape[-1]
    if p > _SMALL_P:
        try:
            return np.linalg.cholesky(A), np.ones(A.shape[:-2], dtype=bool)
        except np.linalg.LinAlgError:
            L = np.zeros_like(A)
            ok = np.ones(A.shape[:-2], dtype=bool)
            for idx in np.ndindex(*A.shape[:-2]):
                try:
                    L[idx] = np.linalg.cholesky(A[idx])
                except np.linalg.LinAlgError:
                    ok[idx] = False
                    L[idx] = np.eye(p)
            return L, ok
    L = np.zeros_like(A)
    ok = np.ones(A.shape[:-2], dtype=bool)
    with np.errstate(all="ignore"):
        for j in range(p):
            d = A[..., j, j] - (L[..., j, :j] ** 2).sum(axis=-1)
            ok &= d > 0
            ljj = np.sqrt(np.where(d > 0, d, 1.0))
            L[..., j, j] = ljj
            for i in range(j + 1, p):
                L[..., i, j] = (A[..., i, j] - (L[..., i, :j] * L[..., j, :j]).sum(axis=-1)) / ljj
    if not ok.all():
        L[~ok] = np.eye(p)
    return L, ok


def _forward(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve L x = b for stacks of lower-triangular L."""
    p = L.shape[-1]
    if p > _SMALL_P:
        return np.linalg.solve(L, b[..., None])[..., 0]
    x = np.empty_like(b)
    for i in range(p):
        x[..., i] = (b[..., i] - (L[..., i, :i] * x[..., :i]).sum(axis=-1)) / L[..., i, i]
    return x


def _backward(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve L' x = b for stacks of lower-triangular L."""
    p = L.shape[-1]
    if p > _SMALL_P:
        return np.linalg.solve(np.swapaxes(L, -1, -2), b[..., None])[..., 0]
    x = np.empty_like(b)
    for i in reversed(range(p)):
        x[..., i] = (b[..., i] - (L[..., i + 1:, i] * x[..., i + 1:]).sum(axis=-1)) / L[..., i, i]
    return x


def _offsets(k: int, mixed: str) -> tuple[np.ndarray, list[tuple[int, int, list[int]]]]:
    """Finite-difference points: 0, +-h e_i, then the mixed ones per (i, j), j < i:
    "central" (4 points: ++, +-, -+, --) or "forward" (1 point: ++)."""
    eye = np.eye(k) * _H
    pts = [np.zeros(k)] + [eye[i] for i in range(k)] + [-eye[i] for i in range(k)]
    mixed_idx = []
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)] if mixed == "central" else [(1, 1)]
    for i in range(k):
        for j in range(i):
            mixed_idx.append((i, j, list(range(len(pts), len(pts) + len(signs)))))
            pts += [si * eye[i] + sj * eye[j] for si, sj in signs]
    return np.array(pts), mixed_idx


_STACK_MAX = 65_536  # points x fits x groups: about where stacking stopped paying (micro-benchmark)


def _at(prob: BatchProblem, th: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Deviance at th + off[t] for every offset, (F, T). Small batches take every point
    in one call (numpy's per-call cost dominates there); large ones one point at a time,
    as stacked arrays outgrow the cache (with the closed forms, all points then share
    one matrix product per fit: ``deviance_points``)."""
    if prob.P is not None and len(off) * prob.F * prob.G <= _STACK_MAX:
        return prob.deviance(th[None] + off[:, None, :]).T
    if prob.entrywise:
        return prob.deviance_points(th, off).T
    return np.stack([prob.deviance(th + o) for o in off], axis=1)


def _derivs(prob: BatchProblem, th: np.ndarray) -> tuple[np.ndarray, ...]:
    """Central-difference gradient and Hessian, plus forward differences, for all fits."""
    F, k = th.shape
    off, mixed = _offsets(k, "central")
    v = _at(prob, th, off)
    f0, fp, fm = v[:, 0], v[:, 1:1 + k], v[:, 1 + k:1 + 2 * k]
    grad = (fp - fm) / (2 * _H)
    H = np.empty((F, k, k))
    for i in range(k):
        H[:, i, i] = (fp[:, i] - 2 * f0 + fm[:, i]) / _H**2
    for i, j, (pp, pm, mp, mm) in mixed:
        H[:, i, j] = H[:, j, i] = (v[:, pp] - v[:, pm] - v[:, mp] + v[:, mm]) / (4 * _H * _H)
    return f0, grad, H, fp


def _derivs_newton(prob: BatchProblem, th: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cheaper derivatives for the Newton steps (verification uses ``_derivs``): central
    gradient and diagonal, forward mixed partials reusing f(th + h e_i)."""
    F, k = th.shape
    off, mixed = _offsets(k, "forward")
    v = _at(prob, th, off)
    f0, fp, fm = v[:, 0], v[:, 1:1 + k], v[:, 1 + k:1 + 2 * k]
    grad = (fp - fm) / (2 * _H)
    H = np.empty((F, k, k))
    for i in range(k):
        H[:, i, i] = (fp[:, i] - 2 * f0 + fm[:, i]) / _H**2
    for i, j, (pp,) in mixed:
        H[:, i, j] = H[:, j, i] = (v[:, pp] - fp[:, i] - fp[:, j] + f0) / _H**2
    return f0, grad, H


def _canonical(prob: BatchProblem, th: np.ndarray) -> np.ndarray:
    """The deviance is even in each column of the factor; pick the non-negative diagonal."""
    th = th.copy()
    if prob.diagonal:
        return np.abs(th)
    L = prob.lam(th)
    sign = np.where(np.diagonal(L, axis1=1, axis2=2) < 0, -1.0, 1.0)
    L = L * sign[:, None, :]
    return L[:, prob.rows, prob.cols]


def _scaled(lower: np.ndarray, v: float) -> np.ndarray:
    """The identity factor times ``v`` (relative SDs ``v``, no correlation)."""
    return np.where(np.isfinite(lower), v, 0.0)


def _faces(lower: np.ndarray) -> list[np.ndarray]:
    """One start per relative SD: that one zero, the others 1 (with a single SD, none)."""
    diag = np.flatnonzero(np.isfinite(lower))
    out = []
    for j in diag if diag.size > 1 else []:
        face = _scaled(lower, 1.0)
        face[j] = 0.0
        out.append(face)
    return out


def start_bank(lower: np.ndarray) -> np.ndarray:
    """Starting thetas (one per row) for a multi-start: lme4's (the identity factor),
    scaled identities, and each face where one relative SD is zero (diagonal) or
    correlations of either sign (unstructured: Newton drifts off a face slowly there;
    faces doubled a 30-group fit(), 38 -> 75 ms). Each start reaches one local optimum of the
    deviance; in audits against 50-start brute force, each of these was, for some
    slice, one of the few to reach the highest."""
    rows = [_scaled(lower, v) for v in (1.0, 0.25, 4.0)]
    if np.isfinite(lower).all():
        rows += _faces(lower)
    else:
        rows += [np.where(np.isfinite(lower), 1.0, r) for r in (0.5, -0.5)]
    return np.array(rows)


_JOIN_RADIUS = 1e-3  # see newton's ``known``
_SCREEN_SLACK = 1e-12  # relative; see fit_slices' restarts


def newton(prob: BatchProblem, maxiter: int = 50, start: float | np.ndarray = 1.0,
           known: tuple[np.ndarray, np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """Vectorized damped Newton on all fits: (theta, converged, evaluations per fit).

    It starts where lme4 does (identity factor), times ``start``, or at ``start``
    itself when that is a full (F, k) theta. Only fits still
    moving are evaluated: the problem shrinks as fits converge. A relative SD heading
    to zero (a boundary optimum, where the even deviance is flat and Newton only
    halves it) is snapped to exactly zero when that lowers the deviance.

    ``known``: (theta, deviance) of an optimum already verified for each fit (canonical;
    NaN rows for none), for restarts. A restart whose iterate comes within
    ``_JOIN_RADIUS`` of it, no lower, is stopped and reported not converged: descent
    from there stays in that optimum's basin, so it could only find it again.
    """
    F, k = prob.F, prob.k
    start = np.asarray(start, dtype=float)
    if start.ndim == 2:
        th = start.copy()
    else:
        scale = np.broadcast_to(start, (F,))[:, None]
        th = np.where(np.isfinite(prob.lower)[None, :], scale, 0.0)
    done = np.zeros(F, dtype=bool)
    rejoined = np.zeros(F, dtype=bool)
    diag = np.isfinite(prob.lower)
    evals = 0
    per_iter = 1 + 2 * k + k * (k - 1) // 2
    cur = np.arange(F)  # fits of ``sub``
    sub = prob
    for _ in range(maxiter):
        live = cur[~done[cur]]
        if live.size == 0:
            break
        if live.size < 0.6 * cur.size:
            sub, cur = prob.subset(live), live
        x = th[cur]
        f0, g, H = _derivs_newton(sub, x)
        evals += per_iter
        if known is not None:
            near = ((np.abs(_canonical(sub, x) - known[0][cur]).max(axis=1) < _JOIN_RADIUS)
                    & (f0 >= known[1][cur] - 1e-9))
            if near.any():
                done[cur[near]] = rejoined[cur[near]] = True
                if near.all():
                    continue
        bad = ~np.isfinite(f0) | ~np.isfinite(g).all(axis=1) | ~np.isfinite(H).all(axis=(1, 2))
        w, V = np.linalg.eigh(np.where(bad[:, None, None], np.eye(k), H))
        floor = 1e-8 * np.maximum(np.abs(w).max(axis=1, keepdims=True), 1.0)
        w = np.maximum(np.abs(w), floor)
        d = -np.einsum("fij,fj,fkj,fk->fi", V, 1.0 / w, V, g)
        dec = -np.einsum("fi,fi->f", g, d)  # Newton decrement, >= 0
        conv = (dec < 1e-12) & ~bad
        act = ~conv & ~bad & ~done[cur]
        done[cur[conv | bad]] = True
        if not act.any():
            continue
        # Backtracking on the fits still searching only (positions in ``cur``): after
        # the full step most have descended, and each halving evaluating every fit was
        # a third of Newton's deviances.
        t = 1.0
        pend = np.flatnonzero(act)
        psub = sub if pend.size == len(cur) else sub.subset(pend)
        for _ls in range(30):
            trial = x[pend] + t * d[pend]
            ft = psub.deviance(trial)
            evals += 1
            ok = ft <= f0[pend] - 1e-4 * t * dec[pend]
            x[pend[ok]], f0[pend[ok]] = trial[ok], ft[ok]
            if ok.all():
                pend = pend[:0]
                break
            if ok.any():
                pend, psub = pend[~ok], psub.subset(np.flatnonzero(~ok))
            t *= 0.5
        done[cur[pend]] = True  # no descent from here: verification judges
        tiny = act & ((np.abs(x) < 1e-3) & (x != 0) & diag[None, :]).any(axis=1)
        if tiny.any():
            snap = np.where((np.abs(x) < 1e-3) & diag[None, :], 0.0, x)
            fs = sub.deviance(snap)
            evals += 1
            take = tiny & (fs <= f0)
            x[take] = snap[take]
        th[cur] = x
    return _canonical(prob, th), done & ~rejoined, evals


def _on_bound(prob: BatchProblem, th: np.ndarray) -> np.ndarray:
    return np.isfinite(prob.lower)[None, :] & (th - prob.lower[None, :] < _H)


def no_free(prob: BatchProblem, th: np.ndarray) -> np.ndarray:
    """Fits with every parameter on its bound: no Hessian to check (hessian_pd null)."""
    return np.asarray(_on_bound(prob, th).all(axis=1))


def verify(prob: BatchProblem, th: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lme4's checks for all fits at theta: (llf-scale deviance, grad_max, hessian_pd).

    hessian_pd is True where ``no_free``: the gradient decides alone there."""
    f0, grad_c, H, fp = _derivs(prob, th)
    on_bound = _on_bound(prob, th)
    gmax = np.full(prob.F, np.inf)
    pd_ = np.zeros(prob.F, dtype=bool)
    need_probe = on_bound.any(axis=0)
    far = {}
    for j in np.flatnonzero(need_probe):
        e = np.zeros(prob.k)
        e[j] = 1e-2
        far[j] = (prob.deviance(th + e) - f0) / 1e-2
    # The common case, no parameter on a bound: lme4_verdict vectorized over fits.
    fast = np.flatnonzero(~on_bound.any(axis=1) & np.isfinite(f0)
                          & np.isfinite(H).all(axis=(1, 2)))
    if fast.size:
        Hf, gf = H[fast], grad_c[fast]
        eig = np.linalg.eigvalsh(Hf)
        pd_[fast] = eig[:, 0] > HESS_RATIO_TOL * np.maximum(1.0, np.abs(eig[:, -1]))
        ok = fast[pd_[fast]]
        notpd = fast[~pd_[fast]]
        gmax[notpd] = np.abs(gf[~pd_[fast]]).max(axis=1)
        try:
            if ok.size:
                Lc = np.linalg.cholesky(H[ok])
                # lme4's solve(chol(H), g), with R's upper factor: L' here
                sc = np.linalg.solve(np.swapaxes(Lc, -1, -2), grad_c[ok][..., None])[..., 0]
                gmax[ok] = np.minimum(np.abs(sc), np.abs(grad_c[ok])).max(axis=1)
        except np.linalg.LinAlgError:
            fast = notpd  # borderline Hessians: the per-fit loop below decides
    done = np.zeros(prob.F, dtype=bool)
    done[fast] = True
    # One-sided gradients for parameters on their bound.
    grads = grad_c.copy()
    for j in far:
        one_sided = np.minimum(np.minimum((fp[:, j] - f0) / _H, far[j]), 0.0)
        grads[:, j] = np.where(on_bound[:, j], one_sided, grad_c[:, j])
    rest = np.flatnonzero(~done & np.isfinite(f0))
    gmax[rest], pd_[rest] = bound_verdicts(grads[rest], H[rest], on_bound[rest])
    return f0, gmax, pd_


def _row_patterns(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a boolean (F, k) array, and each row's index among them:
    ``np.unique(mask, axis=0, return_inverse=True)``, with rows as bit codes (numpy
    sorts rows as opaque bytes: 4.6 ms against 0.14 ms for 5,000 rows)."""
    k = mask.shape[1]
    if k > 62:
        patterns, which = np.unique(mask, axis=0, return_inverse=True)
        return patterns, np.ravel(which)
    bits = mask.astype(np.int64) @ (np.int64(1) << np.arange(k, dtype=np.int64))
    s = np.sort(bits)
    u = s[np.r_[True, s[1:] != s[:-1]]] if s.size else s
    return ((u[:, None] >> np.arange(k)) & 1).astype(bool), np.searchsorted(u, bits)


def bound_verdicts(grads: np.ndarray, H: np.ndarray, on_bound: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``lme4_verdict`` for many fits, some parameters on their bound (singular fits,
    often a third of a batch): vectorized over the fits of each bound pattern, on the
    free block. (grad_max, hessian_pd), with True where the gradient decides alone."""
    F = grads.shape[0]
    gmax = np.full(F, np.inf)
    pd_ = np.zeros(F, dtype=bool)
    patterns, which = _row_patterns(on_bound)
    loop: list[np.ndarray] = []
    for i, pattern in enumerate(patterns):
        idx = np.flatnonzero(which.ravel() == i)
        free = np.flatnonzero(~pattern)
        if free.size == 0:  # no free Hessian: the largest one-sided gradient decides
            gmax[idx] = np.abs(grads[idx]).max(axis=1, initial=0.0)
            pd_[idx] = True
            continue
        Hf = H[idx][:, free][:, :, free]
        gf = grads[idx][:, free]
        finite = np.isfinite(Hf).all(axis=(1, 2))
        eig = np.full((idx.size, free.size), -np.inf)
        eig[finite] = np.linalg.eigvalsh(Hf[finite])
        odd = finite & ~(eig[:, 0] > 0)
        if odd.any():  # a Hessian not PD: rare and borderline; fit by fit, as lme4_verdict
            loop.append(idx[odd])
            idx, Hf, gf, eig, finite = (v[~odd] for v in (idx, Hf, gf, eig, finite))
        mingrad = np.abs(gf)
        try:  # lme4's solve(chol(H), g), with R's upper factor: L' here
            Lc = np.linalg.cholesky(Hf[finite])
        except np.linalg.LinAlgError:
            loop.append(idx)
            continue
        sc = np.linalg.solve(np.swapaxes(Lc, -1, -2), gf[finite][..., None])[..., 0]
        mingrad[finite] = np.minimum(np.abs(sc), mingrad[finite])
        bound_g = np.abs(grads[idx][:, pattern]).max(axis=1, initial=0.0)
        gmax[idx] = np.where(finite, np.maximum(mingrad.max(axis=1, initial=0.0), bound_g),
                             np.abs(grads[idx]).max(axis=1))
        pd_[idx] = finite & (eig[:, 0] > HESS_RATIO_TOL * np.maximum(1.0, np.abs(eig[:, -1])))
    for f in (np.concatenate(loop) if loop else ()):
        gmax[f], pdf = lme4_verdict(grads[f], H[f], on_bound[f])
        pd_[f] = pdf is not False
    return gmax, pd_


# -- from a task's rows to per-slice statistics ---------------------------------------
def _segments(codes: np.ndarray, n: int) -> np.ndarray:
    return np.searchsorted(codes, np.arange(n))


def batchable(spec: ModelSpec) -> bool:
    if spec.vc_formula or spec.groups is None or not spec.has_re or spec.engine == "statsmodels":
        return False
    texts = [pf.template for pf in spec.parsed.values()]
    return not any(s in t for t in texts for s in _STATEFUL)


@dataclass(frozen=True)
class _Prep:
    """Everything a batch needs before optimizing: per-slice sufficient statistics of
    the scaled design, and what maps estimates back. Shared by specs that differ only
    in ``reml`` (see ``_prep_key``)."""

    d: Any
    ZtZ: Any
    ZtX: Any
    Zty: Any
    XtX: Any
    Xty: Any
    yty: Any
    n_rows: Any
    dropped: Any
    good: Any
    diagonal: Any
    cx: Any
    dx: Any
    cz: Any
    dz: Any
    xi: Any
    zi: Any
    b0: Any
    sy: Any
    n_groups: Any
    starts: Any
    sizes: Any
    seg_slice: Any


def _prep_key(spec: ModelSpec) -> tuple[Any, ...]:
    return (spec.formula, spec.re_formula, spec.groups, spec.cov_structure, spec.columns)


def _prepare(df: pd.DataFrame, sl: np.ndarray, spec: ModelSpec, n_slices: int,
             shared: bool = False) -> _Prep | None:
    spec.check_columns(list(map(str, df.columns)))
    cols = list(spec.columns)
    sub = df.loc[:, cols]
    sl = np.asarray(sl, dtype=np.intp)
    F = n_slices
    na = sub.isna().any(axis=1).to_numpy()
    dropped = np.bincount(sl[na], minlength=F)
    if na.any():  # else the frame as it is: a boolean take copies every row
        sub, sl = sub.loc[~na], sl[~na]
    # Categorical columns must show every level in every slice, or per-slice patsy
    # would code them differently; else fall back.
    for c in cols:
        if c == spec.groups:
            continue
        s = sub[c]
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s) or any(
                f"C({{{spec.parsed[k].names.index(c)}}}" in spec.parsed[k].template
                for k in spec.parsed if c in spec.parsed[k].names):
            codes, levels = pd.factorize(s)  # missing rows are gone: every code >= 0
            total = max(len(levels), 1)
            per = np.bincount(np.unique(sl.astype(np.int64) * total + codes) // total,
                              minlength=F)
            if (per != len(levels)).any():
                return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = build_design(sub, spec, source=df if shared else None, complete=True)
    except (ModelFailure, MixedscaleError):
        return None
    n_rows = np.bincount(sl, minlength=F)
    if (n_rows == 0).any():
        return None  # a slice with no complete row: fit() words that error
    # Rows sorted by (slice, group): one segment per slice-group. Data laid out by
    # slice and group (long format, as most is) is already in that order: the same
    # rows then, not copies (the sort and gathers were ~10 % of this function on tiny).
    pair = sl.astype(np.int64) * (d.n_groups + 1) + d.group_codes
    if (pair[1:] >= pair[:-1]).all():
        sl_o, X, Z, y = sl, d.X, d.Z, d.y
    else:
        order = np.lexsort((d.group_codes, sl))
        sl_o, pair = sl[order], pair[order]
        X, Z, y = d.X[order], d.Z[order], d.y[order]
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    seg_slice = sl_o[starts]
    first_seg = _segments(seg_slice, F)
    seg_local = np.arange(len(starts)) - first_seg[seg_slice]
    n_groups = np.bincount(seg_slice, minlength=F)
    sizes = np.diff(np.r_[starts, len(pair)])
    # Per-slice scaling, as lmm.make_scaling: centre and scale non-intercept columns.
    p, q = X.shape[1], Z.shape[1]
    xi = np.flatnonzero(ones_columns(d.X))
    zi = np.flatnonzero(ones_columns(d.Z)) if q else np.zeros(0, dtype=int)
    s_start = _segments(sl_o, F)
    cnt = np.maximum(n_rows, 1)[:, None]

    def scale(M: np.ndarray, icpt: np.ndarray, center: bool) -> tuple[np.ndarray, ...]:
        k = M.shape[1]
        mean = np.add.reduceat(M, s_start, axis=0) / cnt if len(M) else np.zeros((F, k))
        c = mean if (center and icpt.size) else np.zeros_like(mean)
        if icpt.size:
            c[:, icpt] = 0.0
        dev = M - c[sl_o]
        sd = np.sqrt(np.add.reduceat(dev * dev, s_start, axis=0) / cnt)
        if icpt.size:
            sd[:, icpt] = 1.0
        sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        return dev / sd[sl_o], c, sd

    Xs, cx, dx = scale(X, xi, True)
    diagonal = spec.cov_structure == "diagonal"
    Zs, cz, dz = scale(Z, zi, not diagonal)
    # Slices with the same design (covariates, groups, row order; only the response
    # differs, as per gene) share X'X, Z'Z and Z'X: computed once per distinct design.
    g_row = np.repeat(seg_local, sizes)
    rep = _shared_designs(Xs, Zs, g_row, sl_o, s_start, n_rows)
    first = rep == np.arange(F)  # a design's first slice is its own representative
    # Every slice its own design (covariates per slice, as tiny): all rows, no takes.
    every = bool(first.all())
    own_rows = first[sl_o]  # rows of distinct designs
    own: np.ndarray | slice = slice(None) if every else own_rows
    distinct = np.flatnonzero(first)
    XtX = np.zeros((F, p, p))
    XtX[distinct] = np.add.reduceat((Xs[:, :, None] * Xs[:, None, :])[own],
                                    s_start if every else _segments(sl_o[own], F)[distinct],
                                    axis=0)
    if not every:
        XtX = XtX[rep]
    # y's offset in the fixed effects' span, per slice (as lmm.response_shift, in the
    # scaled coefficients): the mean on an intercept, else least squares.
    b0 = np.zeros((F, p))
    if xi.size:
        b0[:, int(xi[0])] = np.add.reduceat(y, s_start) / n_rows
    elif p:
        Xty0 = np.add.reduceat(Xs * y[:, None], s_start, axis=0)
        b0 = np.einsum("fij,fj->fi", np.linalg.pinv(XtX), Xty0)
    yc = y - np.einsum("ij,ij->i", Xs, b0[sl_o]) if p else y
    sy = np.sqrt(np.add.reduceat(yc * yc, s_start) / n_rows)
    sy = np.where(sy > 0, sy, 1.0)
    ys = yc / sy[sl_o]
    # Sanity checks per slice; failures go to fit() for its exact error message.
    ptp = np.maximum.reduceat(y, s_start) - np.minimum.reduceat(y, s_start)
    eig = np.linalg.eigvalsh(XtX)
    full_rank = eig[:, 0] > 1e-11 * np.maximum(eig[:, -1], 1e-300)
    # design.check_design's rules, per slice (lme4's nobs-vs-levels checks included);
    # a slice failing one goes to fit(), which words the error.
    # design._check_residual_df's cheap bound: [X Z] may interpolate the data (an
    # unbounded likelihood) only if n <= p + sum(min(group size, q)); fit() decides.
    interp_bound = p + np.bincount(seg_slice, weights=np.minimum(sizes, q), minlength=F)
    good = ((n_groups >= 2) & (ptp > 0) & (n_rows > p) & full_rank & (n_groups < n_rows)
            & (n_groups * q < n_rows) & (n_rows > interp_bound))
    Gm = int(n_groups.max())
    ZtZ = np.zeros((F, Gm, q, q))
    ZtX = np.zeros((F, Gm, q, p))
    Zty = np.zeros((F, Gm, q))
    own_seg = slice(None) if every else first[seg_slice]
    pos_own = starts if every else np.searchsorted(np.flatnonzero(own_rows), starts[own_seg])
    ZtZ[seg_slice[own_seg], seg_local[own_seg]] = np.add.reduceat(
        (Zs[:, :, None] * Zs[:, None, :])[own], pos_own, axis=0)
    ZtX[seg_slice[own_seg], seg_local[own_seg]] = np.add.reduceat(
        (Zs[:, :, None] * Xs[:, None, :])[own], pos_own, axis=0)
    if not every:
        ZtZ, ZtX = ZtZ[rep], ZtX[rep]
    Zty[seg_slice, seg_local] = np.add.reduceat(Zs * ys[:, None], starts, axis=0)
    Xty = np.add.reduceat(Xs * ys[:, None], s_start, axis=0)
    yty = np.add.reduceat(ys * ys, s_start)
    return _Prep(d, ZtZ, ZtX, Zty, XtX, Xty, yty, n_rows, dropped, good, diagonal, cx, dx,
                 cz, dz, xi, zi, b0, sy, n_groups, starts, sizes, seg_slice)


def fit_slices(df: pd.DataFrame, sl: np.ndarray, spec: ModelSpec, n_slices: int,
               cache: dict[tuple[Any, ...], Any] | None = None) -> BatchOutput | None:
    """Fit ``spec`` to every slice at once; row ``r`` of ``df`` belongs to slice ``sl[r]``.

    Returns None when batching does not apply. Raises SpecError for input errors.
    ``cache``: pass the same dict for specs fitted on the same rows (and an unchanged
    ``df``), so the design and its statistics are built once for all of them.
    """
    if n_slices < MIN_BATCH or not batchable(spec):
        return None
    t0 = time.perf_counter()
    key = _prep_key(spec)
    if cache is not None and key in cache:
        prep = cache[key]
    else:
        prep = _prepare(df, sl, spec, n_slices, shared=cache is not None)
        if cache is not None:
            cache[key] = prep
    if prep is None:
        return None
    (d, ZtZ, ZtX, Zty, XtX, Xty, yty, n_rows, dropped, good, diagonal, cx, dx, cz, dz, xi,
     zi, b0, sy, n_groups, starts, sizes, seg_slice) = (
        getattr(prep, f) for f in _Prep.__dataclass_fields__)
    idx = np.flatnonzero(good)
    fallback = [int(i) for i in np.flatnonzero(~good)]
    fits: pa.Table | None = None
    params: list[pa.Table] = []
    variance: list[pa.Table] = []
    def problem(sel: np.ndarray) -> BatchProblem:
        return BatchProblem(ZtZ[sel], ZtX[sel], Zty[sel], XtX[sel], Xty[sel], yty[sel],
                            n_rows[sel], spec.reml, diagonal)

    if idx.size:
        prob = problem(idx)
        th, conv, n_evals = newton(prob, maxiter=min(spec.maxiter, 50))
        dev, gmax, hpd = verify(prob, th)
        # the first Newton's optimum; hessian_pd as stored: null without a free parameter
        first = (dev.copy(), gmax.copy(), np.ma.array(hpd, mask=no_free(prob, th)))
        restarted = np.zeros(idx.size, dtype=bool)
        singular_s: np.ndarray = np.asarray((th[:, np.isfinite(prob.lower)] < 1e-4).any(axis=1))
        # The deviance may have several local optima (an interior one below a boundary
        # one, or the reverse): restart from other starting points and keep the lowest
        # verified deviance; all restarts run in one Newton.
        # - Boundary fits: 0.25 and 4 times lme4's start and, with correlated effects, a
        #   correlation of the fit's own sign (an audit case: all other starts reached a
        #   rank-deficient point 1.25e-3 llf below the interior optimum).
        # - Interior fits, diagonal covariance: each face where one relative SD is zero
        #   (an audit case had its optimum 0.23 llf higher on a face; the deviance is
        #   even in each SD, so Newton stays on the face), and 4 times lme4's start (an
        #   audit slice of 91 groups had its optimum, 9.2 llf higher, at relative SDs
        #   near 5, which only starts from 4 up reached).
        # - Interior fits, correlated effects: 0.25 times lme4's start. Faces drift off
        #   slowly there (they doubled genes' fit time) and 4 times added a quarter;
        #   without them, no fit of the 720 correlated slices of the first audit was
        #   found below its optimum.
        # - One parameter: only interior fits the boundary beats (a deviance at 0).
        sing = np.flatnonzero(singular_s & conv)
        regular = np.flatnonzero(~singular_s & conv)
        if prob.k == 1 and regular.size:
            at0 = prob.subset(regular).deviance(np.zeros((regular.size, 1)))
            regular = regular[at0 < dev[regular] - 1e-9]
        diag_k = np.isfinite(prob.lower)
        groups = [(sing, _scaled(prob.lower, 0.25)), (sing, _scaled(prob.lower, 4.0))]
        if not diag_k.all():
            groups.append((sing, np.where(diag_k, 1.0, np.where(th[sing] < 0, -0.5, 0.5))))
        interior = ([*_faces(prob.lower), _scaled(prob.lower, 4.0)] if diagonal
                    else [_scaled(prob.lower, 0.25)])
        groups += [(regular, start) for start in interior]
        rj = np.concatenate([g for g, _ in groups])
        if rj.size:
            p2 = problem(idx[rj])
            start = [np.broadcast_to(v, (g.size, prob.k)) for g, v in groups]
            # A restart rejoining its fit's first optimum stops there (see newton):
            # only where that optimum passed lme4's checks with a positive definite
            # Hessian (a strict local minimum).
            was = np.concatenate([dev[g] for g, _ in groups])
            th1 = th[rj].copy()
            th1[~(hpd[rj] & (gmax[rj] <= GRAD_TOL) & np.isfinite(was))] = np.nan
            th2, conv2, n2 = newton(p2, maxiter=min(spec.maxiter, 50),
                                    start=np.concatenate(start), known=(th1, was))
            n_evals += n2
            # Only a restart that lowered its fit's deviance can replace the optimum kept:
            # lme4's checks (19 deviances a fit for 3 parameters) run on those alone.
            # Its deviance is taken only where it converged (a rejoined one cannot
            # win); the screen's slack covers the rounding between this evaluation and
            # verify()'s of the same point.
            dev2 = np.full(rj.size, np.inf)
            live2 = np.flatnonzero(conv2)
            if live2.size:
                dev2[live2] = (p2 if live2.size == rj.size else p2.subset(live2)).deviance(
                    th2[live2])
            slack = _SCREEN_SLACK * np.maximum(np.abs(was), 1.0)
            cand = np.flatnonzero(conv2 & (dev2 < was - 1e-9 + slack))
            g2, h2 = np.full(rj.size, np.inf), np.zeros(rj.size, dtype=bool)
            if cand.size:
                dev2[cand], g2[cand], h2[cand] = verify(p2.subset(cand), th2[cand])
            s2: np.ndarray = np.asarray((th2[:, np.isfinite(p2.lower)] < 1e-4).any(axis=1))
            ok2 = conv2 & (g2 <= GRAD_TOL) & (h2 | s2)
            at = 0
            for g, _ in groups:
                sl_ = slice(at, at + g.size)
                at += g.size
                better = ok2[sl_] & (dev2[sl_] < dev[g] - 1e-9)
                j, b = g[better], np.flatnonzero(better) + sl_.start
                restarted[j] = True
                th[j], dev[j], gmax[j], hpd[j], singular_s[j] = (th2[b], dev2[b], g2[b],
                                                                   h2[b], s2[b])
        verified = conv & np.isfinite(dev) & (gmax <= GRAD_TOL) & (hpd | singular_s)
        ok = np.flatnonzero(verified)
        fallback += [int(idx[j]) for j in np.flatnonzero(~verified)]
        if ok.size:
            p_ok = problem(idx[ok])
            out = _outputs(p_ok, th[ok], idx[ok], d, spec, cx, dx, cz, dz, xi, zi,
                           b0, sy, n_rows, dropped, n_groups, starts, sizes, seg_slice,
                           gmax[ok], np.ma.array(hpd[ok], mask=no_free(p_ok, th[ok])))
            fit_cols, params, variance = out
            # Seconds per fit, tidy rows included (as fit() counts them).
            per_fit = (time.perf_counter() - t0) / max(len(idx), 1)
            # A fit a restart moved records the first optimum too, as fit()'s attempts
            # do; the deviance is -2 llf plus a constant per slice.
            r = restarted[ok]
            fit_cols["method"] = np.where(r, "newton-multistart", "newton-batch")
            fit_cols["n_attempts"] = 1 + r.astype(np.int64)
            llf = np.asarray(fit_cols["llf"], dtype=float)
            fits = _fits_table(fit_cols, per_fit, n_evals, d.warnings, restarted=(
                r, llf + (dev[ok] - first[0][ok]) / 2, first[1][ok], first[2][ok]))
    return BatchOutput(fits=fits if fits is not None else FIT_SCHEMA.empty_table(),
                       params=pa.concat_tables(params) if params else pa.table({}),
                       variance=pa.concat_tables(variance) if variance else pa.table({}),
                       fallback=sorted(fallback))


def _fits_table(cols: dict[str, Any], per_fit: float, n_evals: int,
                design_warnings: list[str] | None = None,
                restarted: tuple[np.ndarray, ...] | None = None) -> pa.Table:
    """The batch's fit rows, built column by column (store.FIT_SCHEMA plus ``_slice``).

    ``design_warnings``: the shared design's, listed first in every fit's warnings.

    ``restarted``: (mask, llf, grad_max, hessian_pd) of each fit's first optimum, listed
    before the kept one in ``attempts`` where a restart beat it."""
    F = len(cols["_slice"])
    one = np.arange(F + 1, dtype=np.int32)
    seconds = np.full(F, per_fit)
    method = np.broadcast_to(np.asarray(cols.get("method", "newton-batch"), dtype=object), F)
    llf = np.asarray(cols["llf"], dtype=float)
    gm = np.asarray(cols["grad_max"], dtype=float)
    hp = np.ma.asarray(cols["hessian_pd"])  # masked: null
    if restarted is not None and restarted[0].any():
        r = restarted[0]
        ri = np.flatnonzero(r)
        # entries: each restarted fit's first optimum, then every fit's kept one
        where = np.arange(F) + np.cumsum(r)  # the kept entry's position
        n = F + ri.size
        first_at = where[ri] - 1

        def merged(kept: np.ndarray, earlier: np.ndarray) -> np.ndarray:
            out = (np.ma.empty(n, dtype=kept.dtype) if np.ma.isMaskedArray(kept)
                   else np.empty(n, dtype=kept.dtype))
            out[where], out[first_at] = kept, earlier
            return out
        e_method = merged(method.astype(object), np.full(ri.size, "newton-batch", dtype=object))
        e_llf = merged(llf, restarted[1][ri])
        e_gm = merged(gm, restarted[2][ri])
        e_hp = merged(hp, restarted[3][ri])
        offsets = np.r_[0, np.cumsum(1 + r)].astype(np.int32)
    else:
        n, e_method, e_llf, e_gm, e_hp, offsets = F, method, llf, gm, hp, one
    attempt = pa.StructArray.from_arrays(
        [constant("fast", n, pa.string()), pa.array(e_method, type=pa.string()), pa.array(e_llf),
         pa.array(np.ones(n, dtype=bool)), pa.array(e_gm),
         pa.array(e_hp), pa.array(np.full(n, n_evals, dtype=np.int64)),
         pa.array(np.full(n, per_fit)), constant("", n, pa.string())],
        fields=list(FIT_SCHEMA.field("attempts").type.value_type))
    sing = np.asarray(cols["singular"], dtype=bool)
    th = np.asarray(cols.pop("theta"))
    cols.update(
        attempts=pa.ListArray.from_arrays(pa.array(offsets), attempt),
        theta=pa.ListArray.from_arrays(pa.array(one * th.shape[1]), pa.array(th.ravel())),
        warnings=_warnings_column(sing, design_warnings or []),
        fit_seconds=seconds)
    out = {"_slice": pa.array(cols["_slice"])}
    for f in FIT_SCHEMA:
        v = cols.get(f.name)
        if v is None:
            out[f.name] = pa.nulls(F, type=f.type)
        elif isinstance(v, (str, bool, int)) and not isinstance(v, np.ndarray):
            out[f.name] = constant(v, F, f.type)
        else:
            out[f.name] = pa.array(v, type=f.type)
    return pa.table(out)


def _warnings_column(singular: np.ndarray, shared: list[str]) -> pa.ListArray:
    """Each fit's warnings: the shared ones, then the singular-fit note where it applies."""
    note = "boundary (singular) fit: see isSingular"
    per = len(shared) + singular.astype(np.int32)
    values = ([w for s in singular for w in [*shared, *([note] if s else [])]] if shared
              else [note] * int(singular.sum()))
    return pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(per)].astype(np.int32)),
                                    pa.array(values, type=pa.string()))


def _shared_designs(Xs: np.ndarray, Zs: np.ndarray, g_row: np.ndarray, sl_o: np.ndarray,
                    s_start: np.ndarray, n_rows: np.ndarray) -> np.ndarray:
    """rep[f]: the first slice whose (scaled) design rows equal slice f's, exactly.

    Candidates come from a fingerprint (a fixed projection of each row, summed two
    ways); every candidate is then compared row by row, so a collision cannot merge
    two different designs."""
    F = len(n_rows)
    if F == 0:
        return np.arange(0)
    rng = np.random.default_rng(20261125)  # a fixed projection, not randomness
    proj = Xs @ rng.standard_normal(Xs.shape[1]) + g_row * np.pi
    if Zs.shape[1]:
        proj = proj + Zs @ rng.standard_normal(Zs.shape[1])
    pos = np.arange(len(sl_o)) - s_start[sl_o]
    keys = np.stack([n_rows.astype(float), np.add.reduceat(proj, s_start),
                     np.add.reduceat(proj * (1.0 + pos), s_start)], axis=1)
    # Each slice's first slice with the same keys. A lexsort, not np.unique(axis=0):
    # that sorts rows as opaque bytes, 3-4x slower (3 % of tiny's fit time).
    order = np.lexsort(keys.T[::-1])
    ks = keys[order]
    starts = np.flatnonzero(np.r_[True, (ks[1:] != ks[:-1]).any(axis=1)])
    rep = np.empty(F, dtype=np.intp)
    # lexsort is stable: a run's first entry is its lowest slice index
    rep[order] = np.repeat(order[starts], np.diff(np.r_[starts, F]))
    cand = rep[sl_o] != sl_o
    if not cand.any():
        return np.arange(F)
    at = np.flatnonzero(cand)
    partner = s_start[rep[sl_o[at]]] + pos[at]
    # Column by column: .all(axis=1) over a row of p + q values was ~6x slower.
    eq = g_row[at] == g_row[partner]
    for M in (Xs, Zs):
        for j in range(M.shape[1]):
            eq &= M[at, j] == M[partner, j]
    same = np.ones(len(sl_o), dtype=bool)
    same[at] = eq
    exact = np.logical_and.reduceat(same, s_start)
    return np.where(exact, rep, np.arange(F))


def _affine_stack(c: np.ndarray, d: np.ndarray, icpt: np.ndarray) -> np.ndarray:
    """Per-fit T with M_s = M @ T (see lmm._affine): T[j,j] = 1/d_j, T[i,j] = -c_j/d_j."""
    F, k = c.shape
    T = np.zeros((F, k, k))
    T[:, np.arange(k), np.arange(k)] = 1.0 / d
    if icpt.size:
        i0 = int(icpt[0])
        T[:, i0, :] -= c / d
        T[:, i0, i0] = 1.0
    return T


def _outputs(prob: BatchProblem, th: np.ndarray, which: np.ndarray, d: Any, spec: ModelSpec,
             cx: np.ndarray, dx: np.ndarray, cz: np.ndarray, dz: np.ndarray, xi: np.ndarray,
             zi: np.ndarray, b0: np.ndarray, sy: np.ndarray, n_rows: np.ndarray,
             dropped: np.ndarray, n_groups: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
             seg_slice: np.ndarray, gmax: np.ndarray, hpd: np.ndarray
             ) -> tuple[dict[str, Any], list[pa.Table], list[pa.Table]]:
    """Estimates in the scaled problem, mapped back exactly to each slice's data scale."""
    sub = prob
    _, _, RtR, beta_s, r2, _ = sub.solve(th, with_beta=True)
    p, q = sub.p, sub.q
    dof = sub.n - p if sub.reml else sub.n
    s2 = r2 / dof
    cov_s = s2[:, None, None] * np.linalg.inv(RtR)
    B = _affine_stack(cx[which], dx[which], xi)
    A = _affine_stack(cz[which], dz[which], zi) if q else np.zeros((len(which), 0, 0))
    syw = sy[which]
    beta = np.einsum("fij,fj->fi", B, syw[:, None] * beta_s + b0[which])
    cov = (syw**2)[:, None, None] * np.einsum("fij,fjk,flk->fil", B, cov_s, B)
    L = sub.lam(th)
    re_s = np.einsum("fij,fkj->fik", L, L) * s2[:, None, None]
    re_cov = (syw**2)[:, None, None] * np.einsum("fij,fjk,flk->fil", A, re_s, A)
    sigma2 = syw**2 * s2
    dev_s = sub.deviance(th)
    llf = -0.5 * dev_s - dof * np.log(syw)
    if sub.reml and p:
        llf = llf + np.linalg.slogdet(B)[1]
    # theta in the original parametrization (for isSingular and the record)
    M = np.einsum("fij,fjk->fik", A, L)
    if prob.diagonal:
        th_o = np.abs(np.diagonal(M, axis1=1, axis2=2))
    else:
        _, Rq = np.linalg.qr(np.swapaxes(M, 1, 2))
        Lo = np.swapaxes(Rq, 1, 2)
        sign = np.where(np.diagonal(Lo, axis1=1, axis2=2) < 0, -1.0, 1.0)
        Lo = Lo * sign[:, None, :]
        th_o = Lo[:, prob.rows, prob.cols]
    singular = (th_o[:, np.isfinite(prob.lower)] < 1e-4).any(axis=1)
    se = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
    n_par = p + prob.k + 1
    # group sizes per slice
    gs_min = np.minimum.reduceat(sizes, _segments(seg_slice, len(n_rows)))
    gs_max = np.maximum.reduceat(sizes, _segments(seg_slice, len(n_rows)))
    nr, ng = n_rows[which], n_groups[which]
    cols: dict[str, Any] = {
        "_slice": np.asarray(which), "spec_name": spec.label, "status": "ok",
        "converged": True, "singular": singular, "llf": llf, "aic": -2 * llf + 2 * n_par,
        "bic": -2 * llf + np.log(nr) * n_par, "scale": sigma2, "n_obs": nr,
        "n_dropped": dropped[which], "n_groups": ng, "group_size_min": gs_min[which],
        "group_size_mean": nr / ng, "group_size_max": gs_max[which], "engine": "fast",
        "method": "newton-batch", "n_attempts": 1, "grad_max": gmax, "hessian_pd": hpd,
        "theta": th_o, **versions()}
    F = len(which)
    stat, pval, lo, hi = wald(beta, se)
    text = pa.string()
    params = pa.table({
        "_slice": np.repeat(which, p),
        "term": pa.array(np.tile(np.asarray(d.x_names, dtype=object), F), type=text),
        "estimate": beta.ravel(), "std_error": se.ravel(), "statistic": stat.ravel(),
        "p_value": pval.ravel(), "conf_low": lo.ravel(), "conf_high": hi.ravel()})
    g = spec.groups or "all"
    vrows: list[tuple[str, str | None, str | None, str]] = []
    vals: list[np.ndarray] = []
    for i in range(q):
        vrows.append((g, d.z_names[i], None, "re"))
        vals.append(re_cov[:, i, i])
    if not prob.diagonal:
        for i in range(q):
            for k in range(i + 1, q):
                vrows.append((g, d.z_names[i], d.z_names[k], "re"))
                vals.append(re_cov[:, i, k])
    vrows.append(("Residual", None, None, "residual"))
    vals.append(sigma2)
    nv = len(vrows)
    variance = pa.table({
        "_slice": np.repeat(which, nv),
        **{name: pa.array([r[j] for r in vrows], type=text).take(np.tile(np.arange(nv), F))
           for j, name in enumerate(("group", "term1", "term2", "kind"))},
        "estimate": np.stack(vals, axis=1).ravel()})
    return cols, [params], [variance]
