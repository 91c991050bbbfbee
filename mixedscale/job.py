"""Job files: YAML read with ``yaml.safe_load`` and validated by a pydantic schema.

The schema is published as JSON Schema (``mixedscale schema``). Relative paths
in a job file are resolved against the job file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from .errors import SpecError, read_yaml, suggest
from .spec import ModelSpec, grid

__all__ = ["Job", "job_schema", "load_job"]

_Scalar = str | int | float | bool | None
# pydantic's lax mode would read reml: "yes" as True and maxiter: "10" as 10, which
# ModelSpec refuses: job files and the Python API must accept the same values.
_Bool = Annotated[bool, Strict()]
_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]  # strict floats still take ints


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    path: str = Field(description="Parquet file, folder, glob, hive tree or fsspec URL")
    # One column may be given bare (split_by: gene): the schema says so too.
    split_by: Annotated[list[str], WithJsonSchema({
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        "description": "the column, or columns, that define slices"})] = Field(
        default_factory=list)
    filter: list[tuple[str, str, Any]] | None = Field(
        default=None, description="row filter: [[column, op, value], ...], AND-ed")

    @field_validator("split_by", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ModelConfig(_Strict):
    name: str | None = None
    formula: str
    groups: str | None = None
    re_formula: str | None = None
    vc_formula: dict[str, str] | None = None
    reml: _Bool = True
    cov_structure: Literal["unstructured", "diagonal"] = "unstructured"
    engine: Literal["auto", "fast", "statsmodels"] | None = None
    optimizers: list[str] | None = None
    maxiter: _Int | None = None


class GridConfig(_Strict):
    name: str | None = None
    formula: str | list[str]
    groups: str | list[str | None] | None = None
    re_formula: str | list[str | None] | None = None
    vc_formula: dict[str, str] | list[dict[str, str] | None] | None = None
    reml: _Bool | list[_Bool] = True
    cov_structure: str | list[str] = "unstructured"
    engine: str | list[str] | None = None


class ClusterConfigRef(_Strict):
    address: str | None = Field(default=None, description="scheduler address; none: embedded")
    workers: _Int | None = Field(default=None, ge=1, description="embedded cluster size")
    kind: Literal["local", "slurm", "pbs"] = "local"
    config: str | None = Field(default=None, description="cluster config YAML (jobqueue, TLS)")
    memory_limit: str | None = None

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        from .cluster import check_memory_limit  # `validate` must catch what `run` would

        return check_memory_limit(v)


class FitOptions(_Strict):
    engine: Literal["auto", "fast", "statsmodels"] | None = None
    timeout: _Float | None = Field(default=None, gt=0, description="per-fit timeout, seconds")
    maxiter: _Int | None = Field(default=None, ge=1)
    optimizers: list[str] | None = None


class Job(_Strict):
    # A job lists models, a grid or both (specs() refuses neither).
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "anyOf": [{"required": ["models"]}, {"required": ["grid"]}]})

    name: str | None = None
    data: DataConfig
    models: list[ModelConfig] = Field(default_factory=list)
    grid: GridConfig | None = None
    store: str | None = Field(default=None, description=(
        "results store folder or URL; required, unless given with run --store"))
    cluster: ClusterConfigRef = Field(default_factory=ClusterConfigRef)
    fit: FitOptions = Field(default_factory=FitOptions)

    def specs(self) -> list[ModelSpec]:
        """Every ModelSpec of the job: the listed models, then the expanded grid."""
        out: list[ModelSpec] = []
        defaults: dict[str, Any] = {}
        if self.fit.maxiter is not None:
            defaults["maxiter"] = self.fit.maxiter
        if self.fit.optimizers is not None:
            defaults["optimizers"] = tuple(self.fit.optimizers)
        for i, m in enumerate(self.models):
            kw = {k: v for k, v in m.model_dump().items() if v is not None}
            for k, v in defaults.items():
                kw.setdefault(k, v)
            if "optimizers" in kw:
                kw["optimizers"] = tuple(kw["optimizers"])
            try:
                out.append(ModelSpec(**kw))
            except SpecError as exc:
                raise SpecError(f"models[{i}] ({kw.get('name') or kw.get('formula')!r}): "
                                f"{exc}") from None
        if self.grid is not None:
            axes = {k: v for k, v in self.grid.model_dump().items()
                    if k != "name" and v is not None}
            for k in ("groups", "re_formula", "vc_formula"):
                if k in self.grid.model_fields_set and getattr(self.grid, k) is None:
                    axes[k] = None
            axes.update({k: v for k, v in defaults.items() if k not in axes})
            try:
                out.extend(grid(name=self.grid.name or self.name or "grid", **axes))
            except SpecError as exc:
                raise SpecError(f"grid: {exc}") from None
        if not out:
            raise SpecError("a job needs `models` or `grid`; got (models=[], grid=None)")
        named: dict[str, int] = {}
        for i, sp in enumerate(out):
            j = named.setdefault(sp.label, i)
            if j != i and out[j] != sp:  # the same model twice is unique_specs' to refuse
                where = (f"models[{j}] and models[{i}]" if i < len(self.models)
                         else f"models[{j}] and the grid")
                raise SpecError(f"{where} are both named {sp.label!r}, but are different "
                                "models: spec_name would mix their fits; give each its own "
                                f"name; got (name={sp.label!r})")
        return out


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None or "://" in p:
        return p
    p = os.path.expanduser(p)  # "~/results", as a shell would
    return p if os.path.isabs(p) else str((base / p).resolve())


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "tuple", "none", "literal"}


def _loc(parts: tuple[int | str, ...]) -> str:
    """('models', 0, 'formula') -> 'models[0].formula', without pydantic's union tags
    such as 'bool' or 'list[bool]' (no job field has such a name)."""
    out = ""
    for x in parts:
        if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x):
            continue
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _pretty(err: ValidationError, model: type[BaseModel], where: str) -> SpecError:
    e = err.errors()[0]
    loc = _loc(tuple(e["loc"]))
    if e["type"] == "missing":
        # The input is the parent mapping: name the field, not the mapping.
        parent = _loc(tuple(e["loc"][:-1]))
        at = f"{parent}: " if parent else ""
        return SpecError(f"{where}: {at}missing required field {str(e['loc'][-1])!r}; "
                         f"add it to the job file")
    if e["type"] == "extra_forbidden":
        # Suggest the closest allowed key at that level.
        node: Any = model
        for part in e["loc"][:-1]:
            if isinstance(part, int):
                continue
            f = node.model_fields.get(str(part)) if hasattr(node, "model_fields") else None
            ann = getattr(f, "annotation", None)
            sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                   and issubclass(a, BaseModel)]
            if not sub:
                args = getattr(ann, "__args__", ())
                sub = [b for a in args for b in getattr(a, "__args__", (a,))
                       if isinstance(b, type) and issubclass(b, BaseModel)]
            node = sub[0] if sub else node
        keys = list(getattr(node, "model_fields", {}))
        hint = suggest(str(e["loc"][-1]), keys) or f"; allowed keys: {', '.join(keys)}"
        if e["loc"][0] == "grid" and e["loc"][-1] in ("optimizers", "maxiter"):
            hint = (f"; a grid's models take them from the job's fit section "
                    f"(fit.{e['loc'][-1]}), or list the model under models")
        return SpecError(f"{where}: unknown key {loc!r}{hint}")
    own = e.get("ctx", {}).get("error") if e.get("type") == "value_error" else None
    if own is not None:  # our own validators' messages: already "rule; got (...)"
        return SpecError(f"{where}: {loc}: {own}")
    got = e.get("input")
    shown = repr(got) if not isinstance(got, dict) else "{...}"
    return SpecError(f"{where}: {loc}: {e['msg'].lower()}; got ({loc}={shown})")


def load_job(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Job:
    """Read and validate a job file. Raises SpecError naming the file and the bad key."""
    p = Path(path)
    where = f"job file {str(path)!r}"
    raw = read_yaml(p, where)
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping with `data` and `models`; "
                        f"got ({type(raw).__name__})")
    for k, v in (overrides or {}).items():
        if v is not None:
            section, _, key = k.partition(".")
            if key:
                raw.setdefault(section, {})
                if isinstance(raw[section], dict):
                    raw[section][key] = v
            else:
                raw[section] = v
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        raise _pretty(exc, Job, where) from None
    base = p.resolve().parent
    job.data.path = _resolve(base, job.data.path) or job.data.path
    job.store = _resolve(base, job.store) if not (overrides or {}).get("store") else job.store
    job.cluster.config = _resolve(base, job.cluster.config)
    try:  # the models now, so their errors name the file like every other
        job.specs()
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return job


def job_schema() -> dict[str, Any]:
    return Job.model_json_schema()
