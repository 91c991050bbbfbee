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

# Inside a call the text is Python, so "**" is exponentiation evaluated eagerly on
# constants: 9**9**9 would hold the GIL for hours. Exponents must be literals this
# small, and a constant integer may not grow past _MAX_CONST_BITS (nested powers).
MAX_EXPONENT = 10
_MAX_CONST_BITS = 10_000


@dataclass(frozen=True)
class _Val:
    """What an evaluated sub-expression can be, as far as resource use goes.

    ``bits``: an upper bound on the size of the integer it evaluates to when it is a
    constant (None: it depends on the data, so numpy bounds it); ``seq``: a string
    or list literal, which ``*`` would repeat.
    """

    bits: int | None = None
    seq: bool = False


_DATA = _Val()


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
                err = missing_column_error(n, columns, where or f"in formula {self.text!r}")
                quoted = [c for c in columns if not c.isidentifier() and n in c and c in self.text]
                if quoted:  # e.g. 'a-b', which a formula reads as a minus b
                    err = SpecError(f"{err}; a column name that is not an identifier needs "
                                    f"quoting: Q({quoted[0]!r})")
                at = re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", self.text)
                if at is not None:
                    err = SpecError(f"{err}{_mark(self.text, at.start(), at.end())}")
                raise err


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
            rule = "formula contains a character that is not allowed"
            if bad.text == "^":
                rule += "; write powers as I(x**2) and interactions as (a + b)**2"
            elif bad.text == "|":
                rule += ("; lme4-style terms such as (1 | g) or (x | g) are given apart: "
                         "groups='g' and re_formula='~x' ((x || g): also "
                         "cov_structure='diagonal'; vc_formula for crossed or nested "
                         "effects)")
            elif bad.text in "`'\"":
                rule += "; quote a column name that is not an identifier as Q('a b')"
            raise _error(text, bad, rule, "token")
        kind = m.lastgroup or "bad"
        if kind != "ws":
            toks.append(_Tok(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return toks


class _Parser:
    """Recursive-descent check of patsy's formula grammar plus I() arithmetic."""

    def __init__(self, text: str, role: str = "formula") -> None:
        self.text = text
        self.role = role
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
            raise SpecError(f"formula is empty; got ({self.role}={self.text!r})")
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
            prev = self.toks[self.i - 1] if self.i else None
            rule = "unexpected token"
            if prev is not None and prev.kind == "name" and prev.end == tok.start:
                # e.g. x.1: a column name with characters patsy does not take bare.
                rule += (f"; quote a column name that is not an identifier as "
                         f"Q({self.text[prev.start:tok.end]!r})")
            raise _error(self.text, tok, rule, "token")

    def expr(self, in_call: str | None) -> _Val:
        starts = [self.peek()]
        vals = [self.unary(in_call)]
        ops: list[_Tok] = []  # ops[i] follows operand i (powers are checked apart)
        while (tok := self.peek()) is not None and tok.text in _BINOPS:
            op = self.take()
            self.out.append(f" {op.text} ")
            if op.text == "**" and in_call is not None:
                vals[-1] = self.power(vals[-1], starts[-1], op)
                continue
            ops.append(op)
            starts.append(self.peek())
            vals.append(self.unary(in_call))
        if in_call is not None and ops:
            for i, v in enumerate(vals):
                if v.seq:
                    # 'a' * 10**9 or [1] * 10**9 would allocate gigabytes in patsy.
                    raise _error(self.text, ops[min(i, len(ops) - 1)],
                                 "string literals and lists cannot be combined with "
                                 "operators; write the value out", "operator")
        known = [v.bits for v in vals if v.bits is not None]
        if not known or (len(known) < len(vals) and in_call is not None):
            return _DATA  # an array: numpy bounds the size of every element
        # A sum or product of constants: at most the sum of the sizes (plus carries).
        return _Val(bits=sum(known) + len(known))

    def power(self, base: _Val, base_tok: _Tok | None, op: _Tok) -> _Val:
        """Check ``base ** exponent`` in evaluated Python; the '**' is already emitted."""
        start = self.i
        while (tok := self.peek()) is not None and tok.text in {"-", "+"}:
            self.out.append(self.take().text)
        tok = self.peek()
        if tok is None:
            raise _error(self.text, None, "formula ends where an exponent was expected",
                         "formula")
        hint = (f"the exponent of ** must be a number between -{MAX_EXPONENT} and "
                f"{MAX_EXPONENT}, e.g. I(x**2) or I(x**0.5); for other powers write "
                "exp(k * log(x))")
        if tok.kind != "number":
            raise _error(self.text, tok, hint, "exponent")
        self.take()
        self.out.append(tok.text)
        span = _Tok("span", self.text[self.toks[start].start:tok.end],
                    self.toks[start].start, tok.end)
        if float(tok.text) > MAX_EXPONENT:
            raise _error(self.text, span, hint, "exponent")
        if (nxt := self.peek()) is not None and nxt.text == "**":
            # Python's ** is right-associative: x**2**9 is x**(2**9).
            after = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else nxt
            chain = _Tok("span", self.text[span.start:after.end], span.start, after.end)
            raise _error(self.text, chain,
                         "chained powers are not allowed (Python reads x**2**3 as "
                         "x**(2**3)); add parentheses, e.g. I((x**2)**3)", "exponent")
        if base.bits is None:
            return base
        bits = base.bits * max(1, int(float(tok.text)))
        if bits > _MAX_CONST_BITS:
            whole_start = base_tok.start if base_tok is not None else op.start
            whole = _Tok("span", self.text[whole_start:tok.end], whole_start, tok.end)
            raise _error(self.text, whole,
                         "this constant power is too large to compute; write a smaller "
                         "number", "token")
        return _Val(bits=bits)

    def unary(self, in_call: str | None) -> _Val:
        while (tok := self.peek()) is not None and tok.text in {"-", "+"}:
            self.out.append(self.take().text)
        return self.atom(in_call)

    def atom(self, in_call: str | None) -> _Val:
        tok = self.peek()
        if tok is None:
            raise _error(self.text, None, "formula ends where a term was expected", "formula")
        if tok.kind == "number":
            self.out.append(self.take().text)
            if re.fullmatch(r"\d+", tok.text):
                return _Val(bits=4 * len(tok.text))  # log2(10) < 4 bits per digit
            return _DATA  # a float: overflows instead of growing
        if tok.text == "(":
            self.out.append(self.take().text)
            val = self.expr(in_call)
            self.expect(")")
            return val
        if tok.kind == "string":
            if in_call not in _STRING_CALLS:
                raise _error(
                    self.text, tok, "string literals are allowed only inside C(...)", "token"
                )
            self.out.append(repr(self.take().text[1:-1]))
            return _Val(seq=True)
        if tok.text == "[" and in_call in _STRING_CALLS:
            self.out.append(self.take().text)
            while (nxt := self.peek()) is not None and nxt.text != "]":
                if nxt.text == ",":
                    self.out.append(self.take().text)
                    continue
                self.atom(in_call)
            self.expect("]")
            return _Val(seq=True)
        if tok.kind != "name":
            raise _error(self.text, tok, "expected a column name, number or '('", "token")
        return self.name_or_call(in_call)

    def name_or_call(self, in_call: str | None) -> _Val:
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
            return self.call(name)
        if "." in name and name.split(".")[0] in {"np", "numpy"}:
            raise _error(self.text, tok, "attribute access is not allowed in a formula", "token")
        if in_call in _STRING_CALLS and (n2 := self.peek()) is not None and n2.text == "=":
            if name not in _KWARGS:
                raise _error(self.text, tok, "keyword argument is not allowed", "token")
            self.out.append(name)
            self.out.append(self.take().text)
            return self.unary(in_call)
        if in_call == "C" and name in {"Treatment", "Sum", "Diff", "Poly"}:
            self.out.append(name)  # bare contrast class, e.g. C(x, Sum)
            return _DATA
        self.emit_name(name)
        return _DATA

    def call(self, name: str) -> _Val:
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
            return _DATA
        self.out.append(name.split(".")[-1] if "." in name else name)
        self.out.append(self.take().text)  # "("
        if (tok := self.peek()) is not None and tok.text == ")":
            raise _error(self.text, tok, f"{name}() needs an argument", "token")
        vals = [self.expr(name)]
        while (tok := self.peek()) is not None and tok.text == ",":
            self.out.append(self.take().text + " ")
            vals.append(self.expr(name))
        self.expect(")")
        # abs() or I() of a constant is that constant; a string argument stays inside.
        known = [v.bits for v in vals if v.bits is not None]
        return _Val(bits=max(known)) if known and name not in _STRING_CALLS else _DATA


def parse_formula(text: str, *, role: str = "formula") -> ParsedFormula:
    """Parse and allow-list one formula; raise SpecError naming the bad token."""
    if not isinstance(text, str):
        raise SpecError(f"{role} must be a string; got ({role}={text!r})")
    try:
        p = _Parser(text, role)  # tokenizes: a bad character raises here
        p.parse()
    except SpecError as exc:
        raise SpecError(f"invalid {role}: {exc}") from None
    return ParsedFormula(text=text, template="".join(p.out), names=tuple(p.names),
                         has_lhs=p.has_lhs)


def eval_namespace() -> dict[str, Any]:
    """The only names patsy can see besides the column identifiers."""
    ns: dict[str, Any] = {f: getattr(np, f) for f in _NUMPY_FUNCS}
    return ns
