"""Peer fitters: statsmodels' MixedLM called plainly, and lme4 through Rscript.

Every function returns long records ``(key, spec, term, value, seconds, status)``;
``term == "__llf__"`` carries the log-likelihood, so estimates from any runner can be
joined on (key, spec, term).
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any

import mixedscale as ms

LLF = "__llf__"
Record = tuple[str, int, str, float, float, str]


def sm_kwargs(spec: ms.ModelSpec) -> dict[str, Any]:
    """The plain ``smf.mixedlm`` call for a spec. A diagonal random-effects covariance
    becomes a random intercept plus one variance component per other term."""
    re_text = spec.re_formula or "1"
    vc = dict(spec.vc_formula or {})
    terms = [t.strip() for t in re_text.split("+")]
    intercept = not any(t in ("0", "-1") for t in terms)
    others = [t for t in terms if t not in ("0", "-1", "1")]
    if spec.cov_structure == "diagonal" and others:
        if not intercept:
            raise NotImplementedError("diagonal random effects without an intercept")
        re_formula = "1"
        vc.update({f"re_{t}": f"0 + {t}" for t in others})
    else:
        re_formula = "~" + re_text if re_text != "1" else "1"
    return {"formula": spec.formula, "groups": spec.groups, "re_formula": re_formula,
            "vc_formula": vc or None, "reml": spec.reml}


def fit_sm(sub: Any, kw: dict[str, Any], key: str, spec: int) -> list[Record]:
    """One plain statsmodels fit: ``smf.mixedlm(...).fit(reml=...)``."""
    import statsmodels.formula.api as smf

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = smf.mixedlm(kw["formula"], sub, groups=sub[kw["groups"]],
                                re_formula=kw["re_formula"], vc_formula=kw["vc_formula"])
            res = model.fit(reml=kw["reml"])
        dt = time.perf_counter() - t0
        status = "ok" if res.converged else "not_converged"
        out: list[Record] = [(key, spec, str(t), float(v), dt, status)
                             for t, v in res.fe_params.items()]
        out.append((key, spec, LLF, float(res.llf), dt, status))
        return out
    except Exception as exc:
        return [(key, spec, "__error__", float("nan"), time.perf_counter() - t0,
                 f"error: {type(exc).__name__}")]


def fit_pair(args: tuple[Any, dict[str, Any], str, int]) -> list[Record]:
    """ProcessPoolExecutor work item: one (slice, spec) pair."""
    sub, kw, key, spec = args
    return fit_sm(sub, kw, key, spec)


def warm_process(_: int = 0) -> int:
    """Import statsmodels in a pool process (done before timing)."""
    import os

    import statsmodels.formula.api  # noqa: F401

    time.sleep(0.2)
    return os.getpid()


def dask_group(sub: Any, kws: list[dict[str, Any]], specs: list[int], key: str) -> Any:
    """The function a naive ``groupby(key).apply`` runs on each group."""
    import pandas as pd

    k = sub.name if getattr(sub, "name", None) is not None else sub[key].iloc[0]
    if isinstance(k, tuple):
        k = k[0]
    recs: list[Record] = []
    for i in specs:
        recs.extend(fit_sm(sub, kws[i], str(k), i))
    return pd.DataFrame(recs, columns=["key", "spec", "term", "value", "seconds", "status"])


# -- lme4 ----------------------------------------------------------------------------------
def lme4_formula(spec: ms.ModelSpec) -> str:
    """``y ~ x + (1 + x | g)``; ``||`` for a diagonal covariance."""
    if spec.vc_formula:
        raise NotImplementedError("variance components are not translated to lme4")
    re_text = spec.re_formula or "1"
    terms = [t.strip() for t in re_text.split("+")]
    intercept = not any(t in ("0", "-1") for t in terms)
    others = [t for t in terms if t not in ("0", "-1", "1")]
    inner = " + ".join((["1"] if intercept else ["0"]) + others)
    bar = "||" if spec.cov_structure == "diagonal" and len(others) + intercept > 1 else "|"
    return f"{spec.formula} + ({inner} {bar} {spec.groups})"


_TERM_T = re.compile(r"\[T\.([^\]]*)\]")


def norm_term(term: str) -> str:
    """One name per fixed effect across patsy (``group[T.treated]``) and R
    (``grouptreated``, ``(Intercept)``)."""
    if term == "(Intercept)":
        return "Intercept"
    return _TERM_T.sub(r"\1", term)
