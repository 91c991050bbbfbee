"""Formula parsing against an allow-list, before patsy ever sees the text.

patsy evaluates every term as Python. To keep job files on a shared cluster
from running code, a formula is tokenized and parsed here; every name atom is
replaced by a generated identifier bound to one data column, so the text patsy
finally evaluates holds only those identifiers, numbers, operators and a fixed
set of transform functions.

Column names need no quoting: a run of words separated by single spaces or
dots ("reaction time", "body.mass", "yield") is one name atom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SpecError, missing_column_error

__all__ = ["ALLOWED_FUNCTIONS", "ParsedFormula", "parse_formula"]

# Transform functions a formula may call, mapped to what patsy evaluates.
_NUMPY_FUNCS = {"log", "exp", "sqrt", "log1p", "log2", "log10", "abs", "expm1"}
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    {"C", "I", "Q", "center", "standardize", "scale", "Treatment", "Sum", "Diff", "Poly"}
    | _NUMPY_FUNCS
    | {f"np.{f}" for f in _NUMPY_FUNCS}
    | {f"numpy.{f}" for f in _NUMPY_FUNCS}
)
# Calls whose arguments may hold string literals and keyword arguments (contrasts, levels).
_STRING_CALLS = {"C", "Treatment", "Sum", "Diff", "Poly", "Q"}
_KWARGS = {"reference", "levels", "contrast", "omit", "scores", "ddof", "rescale"}

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'[^'\\]*'|"[^"\\]*")
  | (?P<name>{w}(?:(?:\.|\x20){w})*)
  | (?P<op>\*\*|[~+\-*/:(),=\[\]])
    """.replace("{w}", r"[A-Za-z_\u00c0-\uffff][\w\u00c0-\uffff]*"),
    re.VERBOSE,
)

_BINOPS = {"+", "-", "*", "/", ":", "**"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class ParsedFormula:
    """A formula checked against the allow-list.

    ``names`` are the raw column names it references, in order of appearance;
    ``template`` is the formula with each name replaced by ``{0}``, ``{1}`` ...
    """

    text: str
    template: str
    names: tuple[str, ...]
    has_lhs: bool

    def render(self, identifiers: dict[str, str]) -> str:
        """The formula patsy evaluates, with each column replaced by its identifier."""
        return self.template.format(*(identifiers[n] for n in self.names))

    def resolve(self, columns: list[str], *, where: str = "") -> None:
        """Raise SpecError naming any referenced column that is not in ``columns``."""
        present = set(columns)
        for n in self.names:
            if n not in present:
                raise missing_column_error(n, columns, where or f"in formula {self.text!r}")


def _mark(text: str, start: int, end: int) -> str:
    width = max(1, end - start)
    return f"\n    {text}\n    {' ' * start}{'^' * width}"


def _error(text: str, tok: _Tok | None, rule: str, what: str) -> SpecError:
    if tok is None:
        return SpecError(f"{rule}; got (formula={text!r}){_mark(text, len(text), len(text) + 1)}")
    return SpecError(f"{rule}; got ({what}={tok.text!r}){_mark(text, tok.start, tok.end)}")


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            bad = _Tok("bad", text[pos], pos, pos + 1)
            raise _error(text, bad, "formula contains a character that is not allowed", "token")
        kind = m.lastgroup or "bad"
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return toks


class _Parser:
    """Recursive-descent check of patsy's formula grammar plus I() arithmetic."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.out: list[str] = []
        self.names: list[str] = []
        self.has_lhs = False

    # -- helpers
    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> _Tok:
        tok = self.peek()
        if tok is None or tok.text != text:
            raise _error(self.text, tok, f"expected {text!r} here", "token")
        self.out.append(text)
        return self.take()

    def emit_name(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
        self.out.append("{" + str(self.names.index(name)) + "}")

    # -- grammar
    def parse(self) -> None:
        if not self.toks:
            raise SpecError(f"formula is empty; got (formula={self.text!r})")
        tildes = [t for t in self.toks if t.text == "~"]
        if len(tildes) > 1:
            raise _error(self.text, tildes[1], "a formula has at most one '~'", "token")
        if self.toks[0].text == "~":
            self.out.append("~ ")
            self.take()
        elif tildes:
            self.has_lhs = True
            self.expr(in_call=None)
            self.expect("~")
            self.out.append(" ")
        self.expr(in_call=None)
        tok = self.peek()
        if tok is not None:
            raise _error(self.text, tok, "unexpected token", "token")

    def expr(self, in_call: str | None) -> None:
        self.unary(in_call)
        while (tok := self.peek()) is not None and tok.text in _BINOPS:
            self.out.append(f" {self.take().text} ")
            self.unary(in_call)

    def unary(self, in_call: str | None) -> None:
        while (tok := self.peek()) is not None and tok.text in {"-", "+"}:
            self.out.append(self.take().text)
        self.atom(in_call)

    def atom(self, in_call: str | None) -> None:
        tok = self.peek()
        if tok is None:
            raise _error(self.text, None, "formula ends where a term was expected", "formula")
        if tok.kind == "number":
            self.out.append(self.take().text)
            return
        if tok.text == "(":
            self.out.append(self.take().text)
            self.expr(in_call)
            self.expect(")")
            return
        if tok.kind == "string":
            if in_call not in _STRING_CALLS:
                raise _error(
                    self.text, tok, "string literals are allowed only inside C(...)", "token"
                )
            self.out.append(repr(self.take().text[1:-1]))
            return
        if tok.text == "[" and in_call in _STRING_CALLS:
            self.out.append(self.take().text)
            while (nxt := self.peek()) is not None and nxt.text != "]":
                if nxt.text == ",":
                    self.out.append(self.take().text)
                    continue
                self.atom(in_call)
            self.expect("]")
            return
        if tok.kind != "name":
            raise _error(self.text, tok, "expected a column name, number or '('", "token")
        self.name_or_call(in_call)

    def name_or_call(self, in_call: str | None) -> None:
        tok = self.take()
        name = tok.text
        parts = re.split(r"[. ]", name)
        if any(p.startswith("__") or p.endswith("__") for p in parts):
            raise _error(self.text, tok, "dunder names are not allowed in a formula", "token")
        first = name.split(" ")[0]
        if first == "lambda" or (first in {"import", "exec", "eval"} and " " in name):
            raise _error(self.text, tok, "Python statements are not allowed in a formula", "token")
        nxt = self.peek()
        if nxt is not None and nxt.text == "(":
            if name not in ALLOWED_FUNCTIONS:
                allowed = ", ".join(sorted(f for f in ALLOWED_FUNCTIONS if "." not in f))
                raise _error(
                    self.text, tok, f"function is not allowed; allowed functions: {allowed}",
                    "function",
                )
            self.call(name)
            return
        if "." in name and name.split(".")[0] in {"np", "numpy"}:
            raise _error(self.text, tok, "attribute access is not allowed in a formula", "token")
        if in_call in _STRING_CALLS and (n2 := self.peek()) is not None and n2.text == "=":
            if name not in _KWARGS:
                raise _error(self.text, tok, "keyword argument is not allowed", "token")
            self.out.append(name)
            self.out.append(self.take().text)
            self.unary(in_call)
            return
        if in_call == "C" and name in {"Treatment", "Sum", "Diff", "Poly"}:
            self.out.append(name)  # bare contrast class, e.g. C(x, Sum)
            return
        self.emit_name(name)

    def call(self, name: str) -> None:
        if name == "Q":
            # Q("col name") is patsy's quoting: treat the string as a column name.
            self.take()
            tok = self.peek()
            if tok is None or tok.kind != "string":
                raise _error(self.text, tok, "Q() takes one quoted column name", "token")
            self.take()
            close = self.peek()
            if close is None or close.text != ")":
                raise _error(self.text, close, "Q() takes one quoted column name", "token")
            self.take()
            self.emit_name(tok.text[1:-1])
            return
        self.out.append(name.split(".")[-1] if "." in name else name)
        self.out.append(self.take().text)  # "("
        if (tok := self.peek()) is not None and tok.text == ")":
            raise _error(self.text, tok, f"{name}() needs an argument", "token")
        self.expr(name)
        while (tok := self.peek()) is not None and tok.text == ",":
            self.out.append(self.take().text + " ")
            self.expr(name)
        self.expect(")")


def parse_formula(text: str, *, role: str = "formula") -> ParsedFormula:
    """Parse and allow-list one formula; raise SpecError naming the bad token."""
    if not isinstance(text, str):
        raise SpecError(f"{role} must be a string; got ({role}={text!r})")
    try:
        p = _Parser(text)  # tokenizes: a bad character raises here
        p.parse()
    except SpecError as exc:
        raise SpecError(f"invalid {role}: {exc}") from None
    return ParsedFormula(text=text, template="".join(p.out), names=tuple(p.names),
                         has_lhs=p.has_lhs)


def eval_namespace() -> dict[str, Any]:
    """The only names patsy can see besides the column identifiers."""
    ns: dict[str, Any] = {f: getattr(np, f) for f in _NUMPY_FUNCS}
    return ns
