"""Model specs: frozen, validated on construction, with a stable content hash."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import SpecError
from .formula import ParsedFormula, parse_formula

__all__ = ["ENGINES", "OPTIMIZERS", "ModelSpec", "grid"]

CovStructure = Literal["unstructured", "diagonal"]
Engine = Literal["auto", "fast", "statsmodels"]
ENGINES = ("auto", "fast", "statsmodels")
# statsmodels' optimizers, tried in order when a verification check fails.
OPTIMIZERS = ("lbfgs", "bfgs", "powell", "nm", "cg")
DEFAULT_OPTIMIZERS = ("lbfgs", "bfgs", "powell", "nm")
DEFAULT_MAXITER = 1000


@dataclass(frozen=True)
class ModelSpec:
    """One linear mixed model, as statsmodels' MixedLM would take it.

    ``re_formula`` defaults to a random intercept per group, also when
    ``vc_formula`` is given (statsmodels would silently drop it); ``"0"`` means
    no group-level random effects, only variance components.
    """

    formula: str
    groups: str | None = None
    re_formula: str | None = None
    vc_formula: Mapping[str, str] | None = None
    reml: bool = True
    cov_structure: CovStructure = "unstructured"
    name: str | None = None
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    maxiter: int = DEFAULT_MAXITER
    engine: Engine = "auto"
    _parsed: dict[str, ParsedFormula] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _id: str = field(init=False, repr=False, compare=False, hash=False, default="")
    _described: str = field(init=False, repr=False, compare=False, hash=False, default="")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        parsed: dict[str, ParsedFormula] = {}
        parsed["formula"] = parse_formula(self.formula, role="formula")
        if not parsed["formula"].has_lhs:
            raise SpecError(
                f"formula needs a response left of '~'; got (formula={self.formula!r})"
            )
        if self.groups is not None and (not isinstance(self.groups, str) or not self.groups):
            raise SpecError(f"groups must be a column name or None; got (groups={self.groups!r})")
        user_re = self.re_formula
        if user_re is not None and not isinstance(user_re, str):
            raise SpecError(
                f"re_formula must be a formula string or None, e.g. '~x'; "
                f"got (re_formula={user_re!r})"
            )
        re_text = "1" if user_re is None else user_re.strip()
        if self.groups is None:
            if user_re is not None and re_text not in {"0", "-1", "~0"}:
                raise SpecError(
                    "re_formula needs groups; for crossed designs use vc_formula; "
                    f"got (re_formula={user_re!r}, groups=None)"
                )
            re_text = "0"
        if re_text.startswith("~"):
            re_text = re_text[1:].strip()
        set_(self, "re_formula", re_text)
        if re_text not in {"0", "-1"}:
            parsed["re"] = parse_formula(re_text, role="re_formula")
            if parsed["re"].has_lhs:
                raise SpecError(f"re_formula takes no response; got (re_formula={re_text!r})")
        vc: dict[str, str] = {}
        if self.vc_formula is not None:
            if not isinstance(self.vc_formula, Mapping):
                raise SpecError(
                    "vc_formula must map a name to a formula; "
                    f"got (vc_formula={self.vc_formula!r})"
                )
            for k, v in self.vc_formula.items():
                # str() would turn None or 5 into a formula naming a column "None" or "5".
                if not isinstance(k, str) or not k or not isinstance(v, str):
                    raise SpecError(
                        "vc_formula must map a non-empty name to a formula string, e.g. "
                        f"{{'plot': '0 + C(plot)'}}; got (vc_formula={dict(self.vc_formula)!r})"
                    )
            for k in self.vc_formula:
                # The variance table's group column names each component beside the
                # groups column and "Residual": a shared name would make two rows alike.
                if k == "Residual" or k == self.groups:
                    raise SpecError(
                        f"a variance component cannot be named {k!r}, the name of the "
                        f"{'residual' if k == 'Residual' else 'groups column'}'s variance "
                        f"rows; rename it, e.g. {k + '_vc'!r}; got "
                        f"(vc_formula={dict(self.vc_formula)!r})")
            for k, v in sorted(self.vc_formula.items()):
                text = v.strip().lstrip("~").strip()
                pf = parse_formula(text, role=f"vc_formula[{k!r}]")
                if pf.has_lhs:
                    raise SpecError(f"vc_formula takes no response; got (vc_formula[{k!r}]={v!r})")
                parsed[f"vc:{k}"] = pf
                vc[str(k)] = text
        set_(self, "vc_formula", vc or None)
        if self.groups is None and not vc:
            raise SpecError(
                "a mixed model needs groups or variance components: name the grouping "
                "column with groups='<column>' (CLI: --groups, job file: groups:); "
                "got (groups=None, vc_formula=None)"
            )
        if "re" not in parsed and not vc:
            raise SpecError(
                "re_formula='0' leaves no random effects; give vc_formula or a re_formula; "
                f"got (re_formula={self.re_formula!r})"
            )
        if not isinstance(self.reml, bool):
            raise SpecError(f"reml must be true or false; got (reml={self.reml!r})")
        if self.cov_structure not in ("unstructured", "diagonal"):
            raise SpecError(
                "cov_structure must be 'unstructured' or 'diagonal'; "
                f"got (cov_structure={self.cov_structure!r})"
            )
        opts = self.optimizers
        if isinstance(opts, str):
            opts = (opts,)
        if not isinstance(opts, (list, tuple)):
            raise SpecError(
                f"optimizers must be a non-empty list of names from {list(OPTIMIZERS)}; "
                f"got (optimizers={opts!r})"
            )
        opts = tuple(opts)
        bad = [o for o in opts if not isinstance(o, str) or o not in OPTIMIZERS]
        if not opts or bad:
            raise SpecError(
                f"optimizers must be a non-empty list of names from {list(OPTIMIZERS)}; "
                f"got (optimizers={list(opts)!r})"
            )
        set_(self, "optimizers", opts)
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 1:
            raise SpecError(f"maxiter must be a positive integer; got (maxiter={self.maxiter!r})")
        if self.engine not in ENGINES:
            raise SpecError(f"engine must be one of {list(ENGINES)}; got (engine={self.engine!r})")
        if self.name is not None and not isinstance(self.name, str):
            raise SpecError(f"name must be a string; got (name={self.name!r})")
        set_(self, "_parsed", parsed)
        canon = self.canonical()
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":"))
        set_(self, "_id", hashlib.sha256(blob.encode()).hexdigest()[:16])
        # Every fit row carries it (spec_name): built once, like the id.
        set_(self, "_described", self._describe(canon))

    # Identity is the model (spec_id), as the store and fit_many see it: specs that differ
    # only in name or formula spacing are equal (the generated methods compared fields).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelSpec):
            return NotImplemented
        return self.spec_id == other.spec_id

    def __hash__(self) -> int:
        return hash(self.spec_id)

    # -- identity
    def canonical(self) -> dict[str, Any]:
        """The fields that define the model and its fit, normalized; ``name`` is a label only."""
        p = self._parsed

        def norm(pf: ParsedFormula) -> str:
            return pf.template.format(*pf.names)

        return {
            "formula": norm(p["formula"]),
            "groups": self.groups,
            "re_formula": norm(p["re"]) if "re" in p else "0",
            "vc_formula": {k[3:]: norm(v) for k, v in sorted(p.items()) if k.startswith("vc:")},
            "reml": self.reml,
            # Without random slopes there is no covariance to structure: one model, one id.
            "cov_structure": self.cov_structure if self.structured else "unstructured",
            "optimizers": list(self.optimizers),
            "maxiter": self.maxiter,
            "engine": self.engine,
        }

    @property
    def structured(self) -> bool:
        """Whether ``cov_structure`` changes the model: not for a random intercept alone
        (or no group random effects), where diagonal and unstructured are one model."""
        re = self._parsed.get("re")
        return re is not None and re.template.format(*re.names) != "1"

    @property
    def spec_id(self) -> str:
        """Content hash of ``canonical()``, computed once on construction."""
        return self._id

    @property
    def label(self) -> str:
        """``spec_name`` in results: the name, else ``describe()``."""
        return self.name or self.describe()

    def describe(self) -> str:
        """The model in lme4's notation, with what differs from the defaults:
        ``Reaction ~ Days + (Days || Subject), ML``. A readable default name: specs
        that differ in any field of their identity read differently."""
        return self._described

    def _describe(self, c: dict[str, Any]) -> str:
        text = " ".join(self.formula.split())
        if self.groups is not None and c["re_formula"] != "0":
            bar = "||" if self.cov_structure == "diagonal" and self.structured else "|"
            text += f" + ({c['re_formula']} {bar} {self.groups})"
        # A component is nested in groups (when there are any): name them, or a nested
        # model and a crossed one read alike.
        within = "" if self.groups is None else f" | {self.groups}"
        for k, v in c["vc_formula"].items():
            text += f" + vc({k}: {v}{within})"
        extra = [] if self.reml else ["ML"]
        if self.engine != "auto":
            extra.append(f"engine={self.engine}")
        if self.maxiter != DEFAULT_MAXITER:
            extra.append(f"maxiter={self.maxiter}")
        if tuple(self.optimizers) != DEFAULT_OPTIMIZERS:
            extra.append("optimizers=" + "+".join(self.optimizers))
        return ", ".join([text, *extra])

    @property
    def shown(self) -> str:
        """How messages name this model: its name, else its formula (not the hash)."""
        return self.name or self.formula

    # -- structure
    @property
    def parsed(self) -> Mapping[str, ParsedFormula]:
        return self._parsed

    @property
    def response(self) -> str:
        return self._parsed["formula"].names[0]

    @property
    def has_re(self) -> bool:
        return "re" in self._parsed

    @property
    def columns(self) -> tuple[str, ...]:
        """Every data column the spec reads, in a stable order."""
        cols: list[str] = []
        for pf in self._parsed.values():
            cols.extend(n for n in pf.names if n not in cols)
        if self.groups is not None and self.groups not in cols:
            cols.append(self.groups)
        return tuple(cols)

    def check_columns(self, columns: Sequence[str]) -> None:
        """Raise SpecError naming the first referenced column the data lacks."""
        cols = list(columns)
        for key, pf in self._parsed.items():
            role = ("formula" if key == "formula" else "re_formula" if key == "re"
                    else f"vc_formula[{key[3:]!r}]")
            pf.resolve(cols, where=f"(from {role} {pf.text!r})")
        if self.groups is not None and self.groups not in cols:
            from .errors import missing_column_error

            raise missing_column_error(self.groups, cols, f"(from groups={self.groups!r})")

    def replace(self, **changes: Any) -> ModelSpec:
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        kw.update(changes)
        return ModelSpec(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["optimizers"] = list(self.optimizers)
        d["vc_formula"] = dict(self.vc_formula) if self.vc_formula else None
        return d


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value).replace(" ", "")


def grid(name: str | None = None, **axes: Any) -> list[ModelSpec]:
    """Expand lists of values into specs (a cartesian product).

    Scalars are held fixed; lists vary. Names read like ``"sleep[reml=False,re_formula=~Days]"``.
    ``vc_formula`` and ``optimizers`` take a list of values to vary, or one value to fix.
    """
    valid = {f.name for f in fields(ModelSpec) if f.init} - {"name"}
    unknown = sorted(set(axes) - valid)
    if unknown:
        from .errors import suggest

        hint = suggest(unknown[0], valid) or f"; it takes ModelSpec fields {sorted(valid)}"
        raise SpecError(f"grid has no axis {unknown[0]!r}{hint}; got ({unknown[0]}=...)")
    fixed: dict[str, Any] = {}
    varying: dict[str, list[Any]] = {}
    for k, v in axes.items():
        is_list = isinstance(v, list) or (isinstance(v, tuple) and k != "optimizers")
        if k == "optimizers" and isinstance(v, list) and v and isinstance(v[0], str):
            is_list = False  # one optimizer list, not a list of alternatives
        if is_list:
            if not v:
                raise SpecError(f"grid axis is empty; got ({k}=[])")
            varying[k] = list(v)
        else:
            fixed[k] = v
    if "formula" not in axes:
        raise SpecError("grid needs a formula; got (formula=None)")
    specs: list[ModelSpec] = []
    models: dict[str, ModelSpec] = {}
    keys = list(varying)
    for combo in itertools.product(*(varying[k] for k in keys)):
        kw = dict(fixed)
        kw.update(zip(keys, combo, strict=True))
        tag = ",".join(f"{k}={_short(v)}" for k, v in zip(keys, combo, strict=True))
        label = f"{name}[{tag}]" if name and tag else (name or tag or None)
        spec = ModelSpec(name=label, **kw)
        # Combinations that are one model by another cov_structure (a random intercept
        # alone has no covariance to structure: one spec_id) are fitted once, under the
        # first one's name. (The same combination twice stays in, for unique_specs to
        # refuse.)
        prev = models.setdefault(spec.spec_id, spec)
        if prev.cov_structure == spec.cov_structure:
            specs.append(spec)
    return specs


def unique_specs(specs: Iterable[ModelSpec]) -> list[ModelSpec]:
    """Reject two specs that are the same model, since their fit_ids would collide."""
    seen: dict[str, ModelSpec] = {}
    out: list[ModelSpec] = []
    for s in specs:
        if not isinstance(s, ModelSpec):
            raise SpecError(f"specs must be ModelSpec objects; got (spec={s!r})")
        prev = seen.get(s.spec_id)
        if prev is not None:
            raise SpecError(
                f"specs {prev.shown!r} and {s.shown!r} define the same model; "
                f"drop one; got (spec_id={s.spec_id})"
            )
        seen[s.spec_id] = s
        out.append(s)
    return out
