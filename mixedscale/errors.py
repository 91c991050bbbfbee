"""The one exception hierarchy of mixedscale.

Input problems raise before any cluster work; model failures never raise but
become result rows. Messages follow "rule; got (param=value)" and suggest a fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataError",
    "MixedscaleError",
    "RunIncomplete",
    "SpecError",
    "StoreError",
    "StoreUnusable",
    "one_line",
    "suggest",
]


class MixedscaleError(Exception):
    """Base class of every error mixedscale raises on purpose."""

    exit_code = 1


class SpecError(MixedscaleError, ValueError):
    """A model spec, formula or job file is invalid."""

    exit_code = 2


class DataError(MixedscaleError, ValueError):
    """The input data cannot be used: missing file, bad schema, corrupt file."""

    exit_code = 2


class StoreError(MixedscaleError):
    """The results store cannot be read or written."""

    exit_code = 3


class StoreUnusable(StoreError):
    """The store's URL names nothing this installation can open (an unknown protocol, a
    backend not installed): a configuration error, which no rerun can mend."""

    exit_code = 2


class RunIncomplete(MixedscaleError):
    """A run stopped before every planned fit was committed (interrupted, lost cluster)."""

    exit_code = 3


def one_line(exc: BaseException | str) -> str:
    """An exception's text on one line: Arrow's and others' messages can span several."""
    return " ".join(str(exc).split())


def suggest(name: str, candidates: Iterable[str]) -> str:
    """Return a "did you mean ...?" hint, case-insensitive first, then fuzzy."""
    cands = [str(c) for c in candidates]
    lower = {c.lower(): c for c in cands}
    hits: list[str] = []
    if name.lower() in lower:
        hits.append(lower[name.lower()])
    for c in difflib.get_close_matches(name, cands, n=3, cutoff=0.6):
        if c not in hits:
            hits.append(c)
    if not hits:
        folded = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
        hits = [lower[f] for f in folded]
    if not hits:
        return ""
    return "; did you mean " + " or ".join(repr(h) for h in hits[:3]) + "?"


def missing_column_error(name: str, columns: Iterable[str], where: str = "") -> SpecError:
    cols = list(columns)
    hint = suggest(name, cols)
    if not hint:
        shown = ", ".join(repr(c) for c in cols[:12]) + (" ..." if len(cols) > 12 else "")
        hint = f"; available columns: {shown}"
    ctx = f" {where}" if where else ""
    return SpecError(f"no column {name!r}{ctx}{hint}")


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: where, and what (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """safe_load (no Python tags), refusing a key given twice: YAML would keep the
    last silently, so ``store:`` written twice ran with whichever came second."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader words that error
                break
            if dup:
                raise _DuplicateKey(f"gives key {key!r} twice (at line "
                                    f"{key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, where: str) -> Any:
    """A job or cluster file's YAML; SpecError naming ``where`` for any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise SpecError(f"{where} {exc}") from None
    except yaml.constructor.ConstructorError as exc:
        raise SpecError(f"{where} is not valid YAML for mixedscale (tags such as "
                        f"!!python/... are refused): {yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{where} is not valid YAML {yaml_problem(exc)}") from None
