"""Formulas: unquoted non-identifier column names, caret-marked syntax errors, and an
allow-list that stops code in a formula before anything is evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import patsy
import pytest

import mixedscale
from mixedscale import ModelSpec, SpecError
from mixedscale.formula import ALLOWED_FUNCTIONS, parse_formula


def _data(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_groups, size = 10, 8
    g = np.repeat(np.arange(n_groups), size)
    x = rng.uniform(1, 5, size=g.size)
    z = rng.normal(size=g.size)
    plot = rng.integers(0, 3, size=g.size)
    y = (2 + 0.5 * np.log(x) - 0.3 * z + rng.normal(size=n_groups)[g]
         + 0.4 * rng.normal(size=n_groups)[g] * z
         + 0.6 * rng.normal(size=(n_groups, 3))[g, plot] + rng.normal(scale=0.5, size=g.size))
    return pd.DataFrame({"y": y, "x": x, "z": z, "g": [f"s{i}" for i in g],
                         "b": [f"p{i}" for i in plot],
                         "f": rng.choice(["a", "b", "c"], size=g.size)})


# -- non-identifier column names -------------------------------------------------------

ODD = {"y": "reaction time", "x": "body.mass", "z": "yield", "g": "subject id",
       "b": "field plot", "f": "class"}


def test_non_identifier_names_fit_like_plain_names() -> None:
    plain = _data()
    odd = plain.rename(columns=ODD)
    s_plain = ModelSpec("y ~ log(x) + z + C(f)", groups="g", re_formula="z",
                        vc_formula={"plot": "0 + C(b)"})
    s_odd = ModelSpec("reaction time ~ log(body.mass) + yield + C(class)", groups="subject id",
                      re_formula="yield", vc_formula={"plot": "0 + C(field plot)"})
    a, b = mixedscale.fit(plain, s_plain), mixedscale.fit(odd, s_odd)
    assert a.status == b.status == "ok", (a, b)
    assert b.fit["llf"] == pytest.approx(a.fit["llf"], abs=1e-10)
    assert list(b.params["term"]) == [
        "Intercept", "C(class)[T.b]", "C(class)[T.c]", "log(body.mass)", "yield"]
    np.testing.assert_allclose(b.params["estimate"], a.params["estimate"], rtol=1e-10)
    np.testing.assert_allclose(b.variance["estimate"], a.variance["estimate"], rtol=1e-10)
    v = b.variance
    assert list(v["group"]) == ["subject id"] * 3 + ["plot", "Residual"]
    assert list(v["term1"][:3]) == ["Intercept", "yield", "Intercept"]


@pytest.mark.parametrize("formula, term", [
    ("reaction time ~ body.mass", "body.mass"),
    ("reaction time ~ yield", "yield"),
    ("reaction time ~ class", "class[T.b]"),
    ("reaction time ~ I(body.mass ** 2)", "I(body.mass ** 2)"),
    ("reaction time ~ center(yield)", "center(yield)"),
    ("reaction time ~ np.log(body.mass)", "log(body.mass)"),
    ('reaction time ~ Q("body.mass")', "body.mass"),
    ("reaction time ~ C(class, Treatment('c'))", "C(class, Treatment('c'))[T.a]"),
    ("reaction time ~ C(class, Sum)", "C(class, Sum)[S.a]"),
    ("reaction time ~ C(class, levels=['c', 'b', 'a'])",
     "C(class, levels=['c', 'b', 'a'])[T.b]"),
    ("reaction time ~ body.mass:yield", "body.mass:yield"),
])
def test_odd_names_in_terms(formula: str, term: str) -> None:
    df = _data().rename(columns=ODD)
    res = mixedscale.fit(df, ModelSpec(formula, groups="subject id"))
    assert res.status == "ok", res
    assert term in list(res.params["term"])


def test_columns_named_like_functions() -> None:
    df = _data().rename(columns={"x": "log", "z": "C"})
    res = mixedscale.fit(df, ModelSpec("y ~ log + C + log(log)", groups="g"))
    assert res.status == "ok", res
    assert list(res.params["term"]) == ["Intercept", "log", "C", "log(log)"]


def test_parsed_names_in_order() -> None:
    pf = parse_formula("reaction time ~ log(body.mass) * yield + C(class) + body.mass")
    assert pf.names == ("reaction time", "body.mass", "yield", "class")
    assert pf.has_lhs
    assert "reaction" not in pf.render({n: f"v{i}" for i, n in enumerate(pf.names)})


# -- syntax errors: the formula quoted, a caret under the bad token --------------------


def _caret(msg: str) -> tuple[str, int, int]:
    *_, text, marks = msg.splitlines()
    assert text.startswith("    ") and marks.startswith("    ")
    text, marks = text[4:], marks[4:]
    start = marks.index("^")
    assert set(marks[start:]) == {"^"}
    return text, start, len(marks) - start


@pytest.mark.parametrize("formula, token, rule", [
    ("y ~ x +", None, "ends where a term was expected"),
    ("y ~ (x + z", None, "expected ')'"),
    ("y ~ C(x", None, "expected ')'"),
    ("y ~ x )", ")", "unexpected token"),
    ("y ~ x ~ z", "~", "at most one '~'"),
    ("y ~ x * * z", "*", "expected a column name"),
    ("y ~ x $ z", "$", "character that is not allowed"),
    ("y ~ x, z", ",", "unexpected token"),
    ("y ~ x  z", "z", "unexpected token"),
    ("y ~ x + 3x", "x", "unexpected token"),
    ("y ~ log()", ")", "needs an argument"),
    ("y ~ x + 'z'", "'z'", "string literals"),
    ("y ~ x + foo(z)", "foo", "function is not allowed"),
    ("y ~ x + np.random.rand(3)", "np.random.rand", "function is not allowed"),
    ("y ~ Q(x)", "x", "Q() takes one quoted column name"),
    ("y ~ I(x, z=1)", "=", "expected ')'"),
    ("y ~ x + (1 | g)", "|", "groups='g' and re_formula='~x'"),
    ("y ~ `ab", "`", "as Q('a b')"),
    ("y ~ x.1 + z", ".1", "as Q('x.1')"),
])
def test_syntax_error_marks_token(formula: str, token: str | None, rule: str) -> None:
    with pytest.raises(SpecError) as exc:
        ModelSpec(formula, groups="g")
    msg = str(exc.value)
    assert msg.startswith("invalid formula: ")
    assert rule in msg
    text, start, width = _caret(msg)
    assert text == formula
    if token is None:
        assert start == len(formula) and width == 1
    else:
        assert f"={token!r})" in msg
        assert formula[start:start + width] == token
        # The caret sits under this occurrence: the last one for repeated tokens.
        assert start == formula.rindex(token) or formula.count(token) == 1


@pytest.mark.parametrize("role", ["re_formula", "vc_formula['v']"])
def test_syntax_error_names_the_role(role: str) -> None:
    kw = {"re_formula": "x $ z"} if role == "re_formula" else {"vc_formula": {"v": "0 + C(b"}}
    with pytest.raises(SpecError) as exc:
        ModelSpec("y ~ x", groups="g", **kw)
    assert str(exc.value).startswith(f"invalid {role}: ")
    text, start, width = _caret(str(exc.value))
    assert (text, start, width) in {("x $ z", 2, 1), ("0 + C(b", 7, 1)}


def test_empty_formula() -> None:
    with pytest.raises(SpecError, match="formula is empty"):
        ModelSpec("   ", groups="g")


def test_allowed_functions_are_exactly_these() -> None:
    bare = {f for f in ALLOWED_FUNCTIONS if "." not in f}
    assert bare == {"C", "I", "Q", "center", "standardize", "scale", "Treatment", "Sum",
                    "Diff", "Poly", "log", "exp", "sqrt", "log1p", "log2", "log10", "abs",
                    "expm1"}
    assert all(f.split(".")[0] in {"np", "numpy"} for f in ALLOWED_FUNCTIONS - bare)


# -- the allow-list: code in a formula never runs --------------------------------------

# (formula with CANARY where the payload would write a file, the token the error names)
MALICIOUS = [
    ("y ~ I(__import__('os').system('touch CANARY'))", "'.'"),
    ("y ~ __import__('os').system('touch CANARY')", "'.'"),
    ("y ~ __import__('os')", "__import__"),
    ("y ~ os.system('touch CANARY')", "os.system"),
    ("y ~ x + eval(\"open('CANARY','w')\")", "eval"),
    ("y ~ exec(\"open('CANARY','w')\")", "exec"),
    ("y ~ compile('open(1)', 'f', 'eval')", "compile"),
    ("y ~ (lambda: open('CANARY','w'))()", "lambda"),
    ("y ~ lambda x: open('CANARY','w')", "lambda x"),
    ("y ~ getattr(x, 'real')", "getattr"),
    ("y ~ open('CANARY', 'w')", "open"),
    ("y ~ globals()", "globals"),
    ("y ~ breakpoint()", "breakpoint"),
    ("y ~ x.__class__", "x.__class__"),
    ("y ~ __builtins__", "__builtins__"),
    ("y ~ ().__class__.__bases__[0].__subclasses__()", "'.'"),
    ("y ~ np.log(x).__class__", "'.'"),
    ("y ~ I(x).__class__", "'.'"),
    ("y ~ np.random.seed(0)", "np.random.seed"),
    ("y ~ numpy.random.seed(1)", "numpy.random.seed"),
    ("y ~ x + np.random.seed", "np.random.seed"),
    ("y ~ x + np.os", "np.os"),
    ("y ~ f'{open(\"CANARY\",\"w\")}'", "'{open(\"CANARY\",\"w\")}'"),
    ("y ~ x; open('CANARY','w')", "';'"),
    ("y ~ `x`", "'`'"),
    ("y ~ x[0]", "'['"),
    ("y ~ C(x)[0]", "'['"),
    ("y ~ C(x, Treatment)[0]", "'['"),
    ("y ~ x + 'a'", "\"'a'\""),
    ("y ~ C(x, levels=open('CANARY','w'))", "open"),
    ("y ~ C(x, levels=x.__dict__)", "x.__dict__"),
    ("y ~ C(x, Treatment(reference=__import__('os').system('touch CANARY')))", "'.'"),
    ("y ~ C(x, 'a' + __import__('os').name)", "'.'"),
    ("y ~ C(x, contrast=open)", "open"),
    ("y ~ I(x if open('CANARY','w') else x)", "x if open"),
    ("y ~ [open('CANARY','w') for _ in x]", "'['"),
    ("y ~ {open('CANARY','w')}", "'{'"),
    ("y ~ {'a': 1}", "'{'"),
    ("y ~ x\nimport os", "import os"),
    ("y ~ import os", "import os"),
    ("y ~ exec x", "exec x"),
    ("y ~ ｅｖａｌ(\"open('CANARY','w')\")", "ｅｖａｌ"),
    ("y ~ np.log(x, out=x)", "'='"),
    ("y ~ x + I(x := 1)", "'='"),
    ("y ~ x @ x", "'@'"),
    ("y ~ x & open('CANARY','w')", "'&'"),
    ("y ~ x + \\\n open('CANARY','w')", "'\\\\'"),
    ("y ~ x # comment", "'#'"),
    ("y ~ *x", "'*'"),
    ("y ~ x if 1 else 2", "'1'"),
    ("y ~ x + 1j", "'j'"),
    # These parse (the name is just a column name) and fail as missing columns.
    ("y ~ x.real", "x.real"),
    ("y ~ Q(\"x') + __import__('os\")", "__import__('os"),
    ("y ~ x + print", "print"),
]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    return tmp_path / "canary"


def _attempt(formula: str, canary: Path, role: str) -> SpecError:
    df = _data()
    formula = formula.replace("CANARY", str(canary))
    rhs = formula.split("~", 1)[1]
    with pytest.raises(SpecError) as exc:
        if role == "formula":
            spec = ModelSpec(formula, groups="g")
        elif role == "re_formula":
            spec = ModelSpec("y ~ x", groups="g", re_formula=rhs)
        else:
            spec = ModelSpec("y ~ x", groups="g", vc_formula={"v": rhs})
        for engine in ("fast", "statsmodels"):
            mixedscale.fit(df, spec.replace(engine=engine))
    assert not canary.exists(), f"payload ran: {formula!r}"
    assert list(canary.parent.iterdir()) == []
    return exc.value


@pytest.mark.parametrize("formula, token", MALICIOUS, ids=range(len(MALICIOUS)))
def test_malicious_formula_rejected_and_nothing_runs(formula: str, token: str,
                                                     canary: Path) -> None:
    err = _attempt(formula, canary, "formula")
    assert token.replace("CANARY", str(canary)) in str(err), str(err)


@pytest.mark.parametrize("role", ["re_formula", "vc_formula"])
@pytest.mark.parametrize("formula, token", MALICIOUS, ids=range(len(MALICIOUS)))
def test_malicious_re_and_vc_formula_rejected(formula: str, token: str, role: str,
                                              canary: Path) -> None:
    err = _attempt(formula, canary, role)
    assert token.replace("CANARY", str(canary)) in str(err), str(err)


def test_canary_would_fire_without_the_allow_list(canary: Path) -> None:
    """Positive control: patsy alone evaluates a formula's code, so the canary is meaningful."""
    df = _data()
    formula = f"y ~ I(x if open({str(canary)!r}, 'w') else x)"
    patsy.dmatrices(formula, df, eval_env=patsy.EvalEnvironment([{}]))
    assert canary.exists()
    canary.unlink()
    with pytest.raises(SpecError, match="function is not allowed"):
        ModelSpec(formula, groups="g")
    assert not canary.exists()


def test_generated_identifiers_are_all_patsy_sees() -> None:
    pf = parse_formula("reaction time ~ log(body.mass) + C(class, Treatment('b')) + yield")
    text = pf.render({n: f"_ms{i}_" for i, n in enumerate(pf.names)})
    assert text.replace(" ", "") == "_ms0_~log(_ms1_)+C(_ms2_,Treatment('b'))+_ms3_"


# -- resource limits: evaluated Python cannot compute gigantic values ------------------


@pytest.mark.parametrize("formula, token", [
    ("Points ~ I(9**9**9)", "9**9"),
    ("y ~ I(x**2**3)", "2**3"),
    ("y ~ I(x**11)", "11"),
    ("y ~ I(x ** -99)", "-99"),
    ("y ~ I(x**1e400)", "1e400"),
    ("y ~ I(2**x)", "x"),
    ("y ~ I(x**(1/2))", "("),
    ("y ~ log(9**9**9)", "9**9"),
    ("y ~ C(f, levels=9**9**9)", "9**9"),
    ("y ~ I((((((9**10)**10)**10)**10)**10))", "(((9**10)**10)**10)**10"),
    ("y ~ I(abs(abs(abs(abs(9**10)**10)**10)**10)**10)", "abs(abs(abs(9**10)**10)**10)**10"),
    ("y ~ C(f, levels=['a']*10**9)", "*"),
    ("y ~ C(f, 'a'*99999999999)", "*"),
    ("y ~ C(f, levels=99999999*['a'])", "*"),
])
def test_huge_powers_and_repetitions_rejected_with_token_marked(formula: str,
                                                                token: str) -> None:
    with pytest.raises(SpecError) as exc:
        ModelSpec(formula, groups="g")
    msg = str(exc.value)
    text, start, width = _caret(msg)
    assert text == formula
    assert formula[start:start + width] == token, msg
    assert f"={token!r})" in msg


@pytest.mark.parametrize("formula, term", [
    ("y ~ I(x**2)", "I(x ** 2)"),
    ("y ~ I(x ** -1)", "I(x ** -1)"),
    ("y ~ I(x**0.5)", "I(x ** 0.5)"),
    ("y ~ I((x**2)**3)", "I((x ** 2) ** 3)"),
    ("y ~ I(x * 10**3)", "I(x * 10 ** 3)"),
    ("y ~ log(x**2)", "log(x ** 2)"),
    ("y ~ (x + z)**2", "x:z"),
    ("y ~ C(f, levels=['c', 'b', 'a'])", "C(f, levels=['c', 'b', 'a'])[T.b]"),
])
def test_ordinary_powers_still_work(formula: str, term: str) -> None:
    res = mixedscale.fit(_data(), ModelSpec(formula, groups="g"))
    assert res.status == "ok", res
    assert term in list(res.params["term"])


def test_caret_suggests_the_power_operator() -> None:
    with pytest.raises(SpecError, match=r"write powers as I\(x\*\*2\)"):
        ModelSpec("y ~ x ^ 2", groups="g")


# -- design errors speak the user's column names ---------------------------------------


def _design_error(df: pd.DataFrame, formula: str, **kw: object) -> str:
    res = mixedscale.fit(df, ModelSpec(formula, groups="g", **kw))
    assert res.status == "error", res
    msg = str(res.fit["error_message"])
    assert "_ms" not in msg, msg
    return msg


@pytest.mark.parametrize("formula, kw, term, cause", [
    ("y ~ log(x2)", {}, "log(x2)", "missing (NaN) values"),
    ("y ~ sqrt(x2)", {}, "sqrt(x2)", "missing (NaN) values"),
    ("y ~ center(g)", {}, "center(g)", "column 'g' is text"),
    ("y ~ log(f)", {}, "log(f)", "column 'f' is text"),
    ("y ~ C(f, levels=[1, 2])", {}, "C(f, levels=[1, 2])", "list every value"),
    ("y ~ x", {"re_formula": "log(x2)"}, "log(x2)", "missing (NaN) values"),
    ("y ~ x", {"vc_formula": {"v": "0 + log(x2)"}}, "log(x2)", "missing (NaN) values"),
    ("y ~ log(zero one)", {}, "log(zero one)", "infinite values"),
])
def test_design_errors_name_user_columns_and_cause(formula: str, kw: dict, term: str,
                                                    cause: str) -> None:
    df = _data().assign(x2=lambda d: d["z"], **{"zero one": lambda d: (d["x"] > 2) * 1.0})
    msg = _design_error(df, formula, **kw)
    assert cause in msg and f"got (term={term!r}" in msg, msg
    role = "re_formula" if "re_formula" in kw else "vc_formula['v']" if kw else "formula"
    text, start, width = _caret(msg)
    assert f"(from {role} {text!r})" in msg
    assert text[start:start + width] == term, msg
