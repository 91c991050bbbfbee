"""From a DataFrame and a spec to numeric design matrices, shared by both engines.

Columns are renamed to generated identifiers before patsy evaluates anything
(see formula.py), rows with missing values in the used columns are dropped and
counted, and term names are mapped back to the user's column names.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import patsy

from .formula import ParsedFormula, eval_namespace
from .spec import ModelSpec

__all__ = ["Design", "ModelFailure", "build_design"]


class ModelFailure(Exception):
    """A model-level failure: becomes an ``error`` row, never escapes ``fit``.

    ``counts``: the row's data counts (n_obs, n_dropped, n_groups) where the failure
    came before a Design held them."""

    counts: dict[str, int] | None = None


@dataclass
class Design:
    y: np.ndarray
    X: np.ndarray
    x_names: list[str]
    Z: np.ndarray  # group-level random effects design, (n, q_re); q_re may be 0
    z_names: list[str]
    vc: list[tuple[str, np.ndarray]]  # (name, indicator-like matrix) per variance component
    group_codes: np.ndarray  # int codes 0..G-1
    group_labels: list[str]
    n_dropped: int
    warnings: list[str] = field(default_factory=list)
    # Derived matrices shared by the checks and the engines (see lmm.scaled_x).
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.group_labels)

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.group_codes, minlength=self.n_groups)


_IDENT = re.compile(r"_ms(\d+)_")


def _rename_back(name: str, names: list[str]) -> str:
    return _IDENT.sub(lambda m: names[int(m.group(1))], name)


# Matrices already built for a frame, so the specs of one task that share a formula
# (a grid over re_formula/reml/cov_structure, RI and RS on the same genes) build it
# once. Keyed by the id of the caller's frame, checked through a weak reference, and
# by the columns used (they fix which rows are dropped for missing values).
_CACHE: dict[int, tuple[weakref.ref[Any], dict[tuple[Any, ...], Any]]] = {}


def _cached(source: Any, key: tuple[Any, ...], build: Any) -> Any:
    if source is None:
        return build()
    for k in [k for k, (ref, _) in _CACHE.items() if ref() is None]:
        del _CACHE[k]
    ref_entries = _CACHE.get(id(source))
    if ref_entries is None or ref_entries[0]() is not source:
        ref_entries = (weakref.ref(source), {})
        _CACHE[id(source)] = ref_entries
    entries = ref_entries[1]
    if key not in entries:
        value = build()
        for arr in value[:2]:  # shared between specs: must never be changed in place
            if isinstance(arr, np.ndarray):
                arr.flags.writeable = False
        entries[key] = value
    return entries[key]


_IDENT_TERM = re.compile(r"_ms\d+_")


def _plain_matrix(formula: str, data: pd.DataFrame, lhs: bool
                  ) -> tuple[np.ndarray, np.ndarray | None, list[str]] | None:
    """What patsy builds for a sum of plain numeric columns with an intercept (``y ~ x
    + z``, ``~ x``), without patsy: its term machinery was a fifth of a 100k-row fit.
    None for anything else (patsy then builds it)."""
    left, sep, right = formula.rpartition("~")  # patsy reads "x" as "~ x"
    if bool(left.strip()) != lhs or (lhs and not sep):
        return None
    terms = [t.strip() for t in right.split("+")]
    names = [t for t in terms if t != "1"]
    if len(set(names)) != len(names) or not all(_IDENT_TERM.fullmatch(t) for t in names):
        return None
    used = [*names, left.strip()] if lhs else names
    if lhs and not _IDENT_TERM.fullmatch(used[-1]):
        return None
    cols = {}
    for c in used:
        arr = np.asarray(data[c])
        if arr.dtype.kind not in "fiu":  # text, bool, categorical: patsy codes them
            return None
        cols[c] = arr
    X = np.empty((len(data), len(names) + 1))
    X[:, 0] = 1.0
    for j, c in enumerate(names, start=1):
        X[:, j] = cols[c]
    y = cols[used[-1]].astype(float).reshape(-1, 1) if lhs else None
    return X, y, ["Intercept", *names]


def _matrix(formula: str, data: pd.DataFrame, env: patsy.EvalEnvironment, lhs: bool,
            ctx: _Context) -> tuple[np.ndarray, np.ndarray | None, list[str], list[str]]:
    """(X, y or None, column names, warnings)."""
    plain = _plain_matrix(formula, data, lhs)
    if plain is not None:
        X, y, names = plain
        if y is not None:
            ctx.check_finite(y, [formula.partition("~")[0].strip()])
        ctx.check_finite(X, names)
        return X, y, names, []
    try:
        if lhs:
            yv, xm = patsy.dmatrices(formula, data, eval_env=env, NA_action="raise")
            X, y = np.asarray(xm, dtype=float), np.asarray(yv, dtype=float)
            names = list(xm.design_info.column_names)
            ctx.check_finite(y, list(yv.design_info.column_names))
        else:
            xm = patsy.dmatrix(formula, data, eval_env=env, NA_action="raise")
            X, y, names = np.asarray(xm, dtype=float), None, list(xm.design_info.column_names)
    except patsy.PatsyError as exc:
        raise ctx.explain(exc) from None
    ctx.check_finite(X, names)
    return X, y, names, ctx.empty_terms(xm.design_info)


@dataclass(frozen=True)
class _Context:
    """Which user formula a matrix comes from, to word patsy's errors in its terms.

    patsy only ever sees the generated identifiers (``_ms0_`` ...), so its messages
    and term names are mapped back to the user's columns here."""

    parsed: ParsedFormula
    role: str
    columns: list[str]  # column i is identifier _ms{i}_
    text_columns: frozenset[str]  # columns patsy sees as categorical

    def locate(self, term: str) -> tuple[str, str]:
        """The term as the user wrote it, and a caret mark under it in their formula.

        patsy's text is whitespace-normalized, so the term is matched loosely; a term
        not found (Q("...") quoting) is shown as patsy has it, unmarked."""
        text = self.parsed.text
        chars = [re.escape(c) for c in term if not c.isspace()]
        m = re.search(r"\s*".join(chars), text) if chars else None
        if m is None:
            return term, ""
        return m.group(), f"\n    {text}\n    {' ' * m.start()}{'^' * (m.end() - m.start())}"

    def fail(self, rule: str, mark: str, got: str) -> ModelFailure:
        return ModelFailure(f"design matrix could not be built: {rule}; got ({got}) "
                            f"(from {self.role} {self.parsed.text!r}){mark}")

    def empty_terms(self, info: Any) -> list[str]:
        """Warnings for terms that came out with no column: a factor with one level in
        these rows (lme4 refuses it: "contrasts can be applied only to factors with 2
        or more levels"; patsy drops it without a word)."""
        out = []
        for term, sl in info.term_slices.items():
            if term.factors and sl.stop == sl.start:
                name = self.locate(_rename_back(term.name(), self.columns))[0]
                out.append(f"{self.role} term {name!r} has a single level in these rows, so "
                           "it has no column to estimate and was left out of the model")
        return out

    def check_finite(self, M: np.ndarray, names: list[str]) -> None:
        bad = ~np.isfinite(M)
        if not bad.any():
            return
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        term, mark = self.locate(_rename_back(names[j], self.columns))
        raise self.fail(f"{term} has infinite values (log of 0, or division by 0?); "
                        "transform differently or filter those rows", mark,
                        f"term={term!r}, n_rows={int(bad[:, j].sum())}")

    def explain(self, exc: patsy.PatsyError) -> ModelFailure:
        message = _rename_back(exc.message, self.columns)
        origin = exc.origin
        raw = origin.code[origin.start:origin.end] if origin is not None else ""
        if not raw:
            return self.fail(message, "", f"{self.role}={self.parsed.text!r}")
        term, mark = self.locate(_rename_back(raw, self.columns))
        used = [self.columns[int(i)] for i in _IDENT.findall(raw)]
        text = [c for c in used if c in self.text_columns]
        func = raw.split("(")[0].strip() if "(" in raw else ""
        if "factor contains missing values" in message:
            rule = (f"{term} produced missing (NaN) values for some rows, where the "
                    "transform is undefined (log or sqrt of values <= 0?); filter those "
                    "rows or transform differently")
        elif text and func not in {"C", "Q"}:
            rule = (f"{term} needs numbers but column {text[0]!r} is text; use "
                    f"C({text[0]}) for a categorical term or recode it as numbers")
        elif "Error converting data to categorical" in message:
            rule = (f"{term}: {message.split(': ', 1)[-1]}; list every value of the "
                    "column in levels=[...], or drop levels=")
        else:
            rule = f"{term}: {message}"
        return self.fail(rule, mark, f"term={term!r}")


def _patsy_column(s: pd.Series) -> np.ndarray | pd.Categorical:
    """Text columns as a sorted Categorical: patsy then reads codes instead of sniffing
    every value in Python (which dominates small fits). Its levels are the sorted
    distinct values, as patsy would find them."""
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s) or isinstance(
            s.dtype, pd.CategoricalDtype):
        if isinstance(s.dtype, pd.CategoricalDtype):
            # As R's model.frame for lme4 (drop.unused.levels): a level no row of this
            # fit holds (a slice without it; a Parquet dictionary's full value list)
            # would be an all-zero column, a rank-deficient design.
            return s.array.remove_unused_categories()
        arr = s.to_numpy()
        # A nullable dtype may come out as objects: Python ints, which ** would let grow
        # without bound (formula.py bounds only constants).
        if arr.dtype == object and not pd.api.types.is_bool_dtype(s):
            return arr.astype(float)
        if arr.dtype.kind in "iu" and arr.dtype.itemsize < 8:
            # numpy wraps small ints silently: I(t * 100) on int8 gave -56 for 200. int64,
            # like R's doubles for such arithmetic, holds what formulas compute.
            return arr.astype(np.int64)
        return arr
    try:
        # From the Series itself: an Arrow-backed text column factorizes in Arrow, 5x
        # faster than through Python objects, with the same codes and sorted levels.
        return pd.Categorical(s)
    except TypeError:  # values that do not sort together: let patsy decide
        return s.to_numpy()


def _numeric_text(sub: pd.DataFrame, frame: pd.DataFrame, idents: dict[str, str],
                  text_cols: frozenset[str], spec: ModelSpec) -> list[str]:
    """Warnings for text columns that hold only numbers and enter a formula bare: they
    are fitted as categorical (a coefficient per level), likely not what was meant
    ("1.5" read from a CSV as text). ``C(col)`` says categorical is meant."""
    out = []
    for c in sorted(text_cols):
        if c == spec.groups or isinstance(sub[c].dtype, pd.CategoricalDtype):
            continue
        bare = False
        for pf in spec.parsed.values():
            for i in (i for i, n in enumerate(pf.names) if n == c):
                ph = "{" + str(i) + "}"
                bare |= ph in pf.template.replace("C(" + ph, "")
        levels = frame[idents[c]].cat.categories
        if bare and len(levels) and pd.to_numeric(pd.Series(levels), errors="coerce").notna().all():
            shown = ", ".join(repr(v) for v in levels[:3]) + (", ..." if len(levels) > 3 else "")
            out.append(f"column {c!r} is text holding numbers ({shown}), so it was fitted as "
                       f"categorical, one coefficient per level; cast it to numbers for a "
                       f"slope, or write C({c}) if categorical is meant")
    return out


def build_design(data: pd.DataFrame, spec: ModelSpec, source: Any = None,
                 complete: bool = False) -> Design:
    """Build every matrix the spec needs. Raises SpecError for missing columns.

    ``source``: a frame that ``data`` was derived from (or ``data`` itself) and that
    stays unchanged while specs are fitted on it; matrices are then built once per
    formula for all of them.

    ``complete``: ``data`` holds the spec's columns and no missing value in them (the
    batch engine's rows): used as it is, not selected and checked again."""
    spec.check_columns(list(map(str, data.columns)))
    cols = list(spec.columns)
    if complete:
        return _build(data, spec, source, cols, 0, [])
    sub = data.loc[:, cols]
    n_in = len(sub)
    allnan = [c for c in cols if n_in and sub[c].isna().all()]
    sub = sub.dropna()
    n_dropped = n_in - len(sub)
    try:
        return _build(sub, spec, source, cols, n_dropped, allnan)
    except ModelFailure as exc:  # the row's counts agree with its message
        if exc.counts is None:
            ng = int(sub[spec.groups].nunique()) if spec.groups is not None else 1
            exc.counts = {"n_obs": len(sub), "n_dropped": n_dropped,
                          "n_groups": ng if len(sub) else 0}
        raise


def _build(sub: pd.DataFrame, spec: ModelSpec, source: Any, cols: list[str], n_dropped: int,
           allnan: list[str]) -> Design:
    if len(sub) == 0:
        why = f"column {allnan[0]!r} is all missing" if allnan else "the data is empty"
        raise ModelFailure(f"no rows to fit: {why} (n_obs=0, n_dropped={n_dropped})")
    for c in cols:
        s = sub[c]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            arr = s.to_numpy(dtype=float, na_value=np.nan)
            if np.isinf(arr).any():
                raise ModelFailure(
                    f"column {c!r} holds infinite values; remove or recode them "
                    f"(got {int(np.isinf(arr).sum())} rows with +/-inf)"
                )
    idents = {c: f"_ms{i}_" for i, c in enumerate(cols)}
    frame = pd.DataFrame({idents[c]: _patsy_column(sub[c]) for c in cols})
    env = patsy.EvalEnvironment([eval_namespace()])
    p = spec.parsed
    ck = tuple(cols)
    text_cols = frozenset(c for c in cols
                          if isinstance(frame[idents[c]].dtype, pd.CategoricalDtype))

    def ctx(key: str) -> _Context:
        role = ("formula" if key == "formula" else "re_formula" if key == "re"
                else f"vc_formula[{key[3:]!r}]")
        return _Context(p[key], role, cols, text_cols)

    fx = p["formula"].render(idents)
    X, y, x_names, warns = _cached(source, ("x", ck, fx),
                                   lambda: _matrix(fx, frame, env, lhs=True,
                                                   ctx=ctx("formula")))
    warns = [*warns, *_numeric_text(sub, frame, idents, text_cols, spec)]
    if y is None:
        raise ModelFailure("the formula has no response")
    y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise ModelFailure("the response must be one numeric column; got a factor response")
    if "re" in p:
        fz = p["re"].render(idents)
        Z, _, z_names, z_warns = _cached(source, ("z", ck, fz),
                                         lambda: _matrix(fz, frame, env, lhs=False,
                                                         ctx=ctx("re")))
        warns += z_warns
    else:
        Z, z_names = np.zeros((len(sub), 0)), []
    vc: list[tuple[str, np.ndarray]] = []
    for key, pf in p.items():
        if key.startswith("vc:"):
            m, _, m_names, vc_warns = _matrix(pf.render(idents), frame, env, lhs=False,
                                              ctx=ctx(key))
            warns += vc_warns
            if "Intercept" in m_names and len(m_names) > 1:
                # Likely a slip (statsmodels fits it too): one variance shared by a ones
                # column and k-1 contrasts, not one random effect per level.
                text = " ".join(pf.text.split())
                warns.append(f"vc_formula[{key[3:]!r}] = {text!r} has an intercept column "
                             "beside its others, so they share one variance; for one random "
                             f"effect per level write '0 + {text}'")
            vc.append((key[3:], m))
    if spec.groups is not None:
        codes, uniques = pd.factorize(sub[spec.groups], sort=True)
        labels = [str(u) for u in uniques]
    else:
        codes, labels = np.zeros(len(sub), dtype=np.intp), ["all"]
    orig = cols
    return Design(
        y=np.ascontiguousarray(y, dtype=float),
        X=np.ascontiguousarray(X),
        x_names=[_rename_back(n, orig) for n in x_names],
        Z=np.ascontiguousarray(Z),
        z_names=[_rename_back(n, orig) for n in z_names],
        vc=vc,
        group_codes=np.asarray(codes, dtype=np.intp),
        group_labels=labels,
        n_dropped=n_dropped,
        warnings=warns,
    )


def check_design(d: Design, spec: ModelSpec | None = None) -> None:
    """Model-level sanity checks that make a fit meaningless; raise ModelFailure.
    ``spec`` words the messages in its columns."""
    groups = spec.groups if spec is not None and spec.groups is not None else "groups"
    if d.n_groups < 2 and d.Z.shape[1] > 0:
        raise ModelFailure(
            f"only one group; a random effect needs at least 2 groups (n_groups={d.n_groups})"
        )
    # lme4's default identifiability checks (check.nobs.vs.nlev, check.nobs.vs.nRE):
    # otherwise random effects can interpolate the data and the fit is meaningless.
    terms = []
    if d.Z.shape[1] > 0:
        shown = d.z_names if len(d.z_names) <= 4 else [*d.z_names[:3], "..."]
        hint = ""
        if spec is not None and spec.groups in (spec.parsed["re"].names if spec.has_re else ()):
            hint = (f"; re_formula uses the groups column {spec.groups!r} itself, which "
                    "gives every group its own effect per level")
        elif d.n_groups >= d.n:
            hint = (f"; every {groups!r} group has a single observation, so a group's "
                    "effect cannot be told from the residual")
        terms.append(("(" + " + ".join(shown) + f" | {groups})", d.n_groups,
                      d.n_groups * d.Z.shape[1], hint))
    for name, M in d.vc:
        used = pd.DataFrame(M != 0).groupby(d.group_codes).any().to_numpy()
        hint = "" if spec is None or spec.groups is None else (
            f"; components are nested in groups={spec.groups!r}: for crossed effects "
            "(lme4's (1 | a) + (1 | b)) give groups=None and one component per factor")
        terms.append((f"vc_formula[{name!r}]", int(used.sum()), int(used.sum()), hint))
    for name, nlev, n_re, hint in terms:
        if nlev >= d.n or n_re >= d.n:
            raise ModelFailure(
                f"random effects {name} are unidentifiable: they need fewer levels and "
                f"random effects than observations (n_levels={nlev}, "
                f"n_random_effects={n_re}, n_obs={d.n}){hint}"
            )
    _check_residual_df(d)
    if np.ptp(d.y) == 0:
        raise ModelFailure(f"the response is constant (all values = {d.y[0]:g})")
    p = d.X.shape[1]
    # On centred and scaled columns, as the engines fit them: a time in Unix seconds
    # (1.7e9 + a few thousand) is raw X's second singular value at ~1e-6 of its first.
    from .lmm import scaled_x

    _, Xs, R = scaled_x(d)
    if p and _rank(Xs, R) < p:
        # Name the first column that is a linear combination of earlier ones.
        bad = next(d.x_names[j - 1] for j in range(1, p + 1)
                   if np.linalg.matrix_rank(Xs[:, :j]) < j)
        raise ModelFailure(
            f"fixed-effects design is rank deficient; drop or recode {bad!r} (rank < p={p})"
        )
    if d.n <= p:
        raise ModelFailure(f"too few observations for the fixed effects (n_obs={d.n}, p={p})")
    # p columns span at most p groups' (disjoint, nonzero) columns: with fewer than
    # n_groups, only a random effect that is zero in whole groups could be spanned,
    # and that case is left unchecked rather than add a QR of X to every fit.
    if p >= d.n_groups and d.Z.shape[1]:
        _check_re_identified(d, Xs)


def _rank(M: np.ndarray, R: np.ndarray | None) -> int:
    """``np.linalg.matrix_rank(M)``, from the R of M's QR when given: the same singular
    values and tolerance, without an SVD of all n rows."""
    if R is None:
        return int(np.linalg.matrix_rank(M))
    sv = np.linalg.svd(R, compute_uv=False)
    if not sv.size:
        return 0
    tol = sv.max() * max(M.shape) * np.finfo(sv.dtype).eps
    return int(np.count_nonzero(sv > tol))


def _check_re_identified(d: Design, Xs: np.ndarray) -> None:
    """Each random-effect column, taken per group, must leave the span of X: otherwise
    its variance does not change the fit (the REML deviance is flat in it: the groups
    column as a fixed-effect factor beside a random intercept), and any estimate, or
    none, is as good. Exact and O(n p) per column: with Q an orthonormal basis of X,
    the per-group columns z_g lie in span(X) iff sum_g |z_g|^2 = sum_g |Q' z_g|^2."""
    Q, _ = np.linalg.qr(Xs)
    G = d.n_groups
    for j, name in enumerate(d.z_names):
        z = d.Z[:, j]
        total = float(z @ z)
        if total == 0:
            continue
        Qz = Q * z[:, None]
        proj = sum(float(np.square(np.bincount(d.group_codes, weights=Qz[:, k],
                                               minlength=G)).sum())
                   for k in range(Q.shape[1]))
        if total - proj <= 1e-9 * total:
            raise ModelFailure(
                f"random effect {name!r} is not identifiable: the fixed effects already "
                "hold a term for every group (is the groups column also in the formula?), "
                "so its variance leaves the fit unchanged; drop the groups column from the "
                "formula, or the random effect")


def _check_residual_df(d: Design, max_cells: int = 4_000_000) -> None:
    """Fixed and random effects together must not interpolate the data.

    If rank([X Z]) == n, the residual variance can shrink to 0 while the random
    effects absorb the data: the likelihood is unbounded (ML) and any optimum is
    arbitrary. The exact rank is computed only when a cheap bound cannot rule it out.
    """
    n, p = d.X.shape
    q = d.Z.shape[1]
    sizes = d.group_sizes()
    bound = p + int(np.minimum(sizes, q).sum()) + sum(int((M != 0).any(axis=0).sum())
                                                      * d.n_groups for _, M in d.vc)
    if n > bound or n * (p + d.n_groups * (q + sum(M.shape[1] for _, M in d.vc))) > max_cells:
        return
    blocks = [d.X]
    rows = np.arange(n)
    if q:
        Zf = np.zeros((n, d.n_groups * q))
        Zf[rows[:, None], d.group_codes[:, None] * q + np.arange(q)] = d.Z
        blocks.append(Zf)
    for _, M in d.vc:
        k = M.shape[1]
        Mf = np.zeros((n, d.n_groups * k))
        Mf[rows[:, None], d.group_codes[:, None] * k + np.arange(k)] = M
        blocks.append(Mf[:, (Mf != 0).any(axis=0)])
    rank = int(np.linalg.matrix_rank(np.concatenate(blocks, axis=1)))
    if rank >= n:
        raise ModelFailure(
            "fixed and random effects together interpolate the data, leaving no residual "
            f"degrees of freedom; the model is unidentifiable (rank of [X Z] = n_obs = {n})"
        )
