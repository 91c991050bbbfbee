"""ModelSpec: validation messages, the stable spec_id, defaults, grid(), frozen-ness."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from mixedscale import ModelSpec, SpecError, grid
from mixedscale.spec import unique_specs

GOT = re.compile(r"\S; got \((?P<param>[\w\[\]']+)=")

BAD_FIELDS = [
    # (kwargs, param named in "got (param=...)", a phrase of the rule)
    ({"formula": 5}, "formula", "must be a string"),
    ({"formula": "~ x"}, "formula", "needs a response"),
    ({"formula": ""}, "formula", "empty"),
    ({"groups": ""}, "groups", "column name or None"),
    ({"groups": 3}, "groups", "column name or None"),
    ({"groups": None, "re_formula": "x"}, "re_formula", "needs groups"),
    ({"re_formula": "y ~ x"}, "re_formula", "takes no response"),
    ({"re_formula": "0"}, "re_formula", "leaves no random effects"),
    ({"vc_formula": "0 + C(b)"}, "vc_formula", "must map a name"),
    ({"vc_formula": {"b": "y ~ C(b)"}}, "vc_formula['b']", "takes no response"),
    ({"groups": None}, "groups", "needs groups or variance components"),
    ({"reml": "yes"}, "reml", "true or false"),
    ({"reml": 1}, "reml", "true or false"),
    ({"cov_structure": "banded"}, "cov_structure", "'unstructured' or 'diagonal'"),
    ({"optimizers": ("newton",)}, "optimizers", "non-empty list"),
    ({"optimizers": ()}, "optimizers", "non-empty list"),
    ({"optimizers": ("lbfgs", "sgd")}, "optimizers", "non-empty list"),
    ({"maxiter": 0}, "maxiter", "positive integer"),
    ({"maxiter": -5}, "maxiter", "positive integer"),
    ({"maxiter": 2.5}, "maxiter", "positive integer"),
    ({"maxiter": True}, "maxiter", "positive integer"),
    ({"engine": "gpu"}, "engine", "one of"),
    ({"name": 7}, "name", "must be a string"),
    # wrong types: a SpecError in house style, never a bare TypeError
    ({"optimizers": None}, "optimizers", "list of names from"),
    ({"optimizers": 5}, "optimizers", "list of names from"),
    ({"optimizers": [1]}, "optimizers", "list of names from"),
    ({"optimizers": {"lbfgs": 1}}, "optimizers", "list of names from"),
    ({"re_formula": 5}, "re_formula", "formula string or None"),
    ({"re_formula": ["x"]}, "re_formula", "formula string or None"),
    ({"re_formula": ""}, "re_formula", "empty"),
    ({"vc_formula": {"b": None}}, "vc_formula", "formula string"),
    ({"vc_formula": {"b": 5}}, "vc_formula", "formula string"),
    ({"vc_formula": {1: "0 + C(b)"}}, "vc_formula", "non-empty name"),
    ({"vc_formula": {"": "0 + C(b)"}}, "vc_formula", "non-empty name"),
    ({"vc_formula": {"b": "0 + C(b)", 2: "0 + C(c)"}}, "vc_formula", "non-empty name"),
    ({"vc_formula": {"b": ""}}, "vc_formula['b']", "empty"),
    ({"groups": ["g"]}, "groups", "column name or None"),
    ({"name": ["n"]}, "name", "must be a string"),
]


def _spec(**kw) -> ModelSpec:
    base = {"formula": "y ~ x", "groups": "g"}
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize(("kwargs", "param", "rule"), BAD_FIELDS,
                         ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_FIELDS)])
def test_bad_field_raises_rule_and_got(kwargs: dict, param: str, rule: str) -> None:
    with pytest.raises(SpecError) as exc:
        _spec(**kwargs)
    msg = str(exc.value)
    assert rule in msg, msg
    m = GOT.search(msg)
    assert m is not None, f"not 'rule; got (param=value)': {msg!r}"
    assert m.group("param") == param, msg
    value = kwargs.get(param, kwargs.get(param.split("[")[0]))
    if isinstance(value, str) and value and param != "vc_formula['b']":
        assert repr(value) in msg or value in msg


def test_missing_column_names_the_role() -> None:
    s = _spec(re_formula="x", vc_formula={"plot": "0 + C(b)"})
    cases = [("y", "formula 'y ~ x'"), ("x", "formula 'y ~ x'"),
             ("b", "vc_formula['plot'] '0 + C(b)'")]
    for drop, where in cases:
        cols = [c for c in ("y", "x", "b", "g") if c != drop]
        with pytest.raises(SpecError) as exc:
            s.check_columns(cols)
        assert f"(from {where})" in str(exc.value), str(exc.value)
        assert "vc:" not in str(exc.value)


def test_spec_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        _spec(reml="no")


def test_optimizer_string_is_one_optimizer() -> None:
    assert _spec(optimizers="powell").optimizers == ("powell",)
    assert _spec(optimizers=["lbfgs", "nm"]).optimizers == ("lbfgs", "nm")


# -- defaults ------------------------------------------------------------------------


def test_default_re_formula_is_random_intercept() -> None:
    s = _spec()
    assert s.re_formula == "1" and s.has_re
    assert s.spec_id == _spec(re_formula="1").spec_id == _spec(re_formula="~1").spec_id


def test_default_re_formula_kept_with_vc_formula() -> None:
    s = _spec(vc_formula={"b": "0 + C(b)"})
    assert s.re_formula == "1" and s.has_re
    assert s.spec_id == _spec(vc_formula={"b": "0 + C(b)"}, re_formula="1").spec_id


@pytest.mark.parametrize("none", ["0", "-1", "~0", " 0 "])
def test_zero_re_formula_means_no_group_random_effects(none: str) -> None:
    s = _spec(re_formula=none, vc_formula={"b": "0 + C(b)"})
    assert not s.has_re and s.re_formula in {"0", "-1"}
    assert s.canonical()["re_formula"] == "0"


def test_no_groups_with_vc_formula() -> None:
    s = ModelSpec("y ~ x", vc_formula={"a": "0 + C(a)", "b": "0 + C(b)"})
    assert s.groups is None and not s.has_re
    assert s.columns == ("y", "x", "a", "b")


def test_columns_and_response() -> None:
    s = ModelSpec("log(y) ~ x * C(f)", groups="g", re_formula="x", vc_formula={"v": "0 + C(b)"})
    assert s.response == "y"
    assert s.columns == ("y", "x", "f", "b", "g")


def test_vc_formula_tilde_is_optional() -> None:
    a = _spec(vc_formula={"b": "~0 + C(b)"})
    b = _spec(vc_formula={"b": "0 + C(b)"})
    assert a.vc_formula == b.vc_formula == {"b": "0 + C(b)"}
    assert a.spec_id == b.spec_id


# -- spec_id ---------------------------------------------------------------------------


def test_spec_id_is_stable_hex() -> None:
    s = _spec()
    assert re.fullmatch(r"[0-9a-f]{16}", s.spec_id)
    # A golden value: the id is stored in result files, so it must not drift silently.
    assert s.spec_id == ModelSpec("y ~ x", groups="g").spec_id
    assert s.spec_id == ModelSpec(formula="y ~ x", groups="g", reml=True, engine="auto",
                                  optimizers=("lbfgs", "bfgs", "powell", "nm"),
                                  maxiter=1000).spec_id


@pytest.mark.parametrize("a, b", [
    ("y ~ x + z", "y~x+z"),
    ("y ~ x + z", "  y  ~   x   +   z  "),
    ("y ~ x*C(f, Treatment('b'))", "y ~ x * C( f ,Treatment( 'b' ) )"),
    ("reaction time ~ body.mass", "reaction time~body.mass"),
    ("y ~ I(x**2) + log(z)", "y~I( x ** 2 )+log( z )"),
    ("y ~ x +\n z", "y ~ x + z"),
])
def test_spec_id_ignores_formula_whitespace(a: str, b: str) -> None:
    assert ModelSpec(a, groups="g").spec_id == ModelSpec(b, groups="g").spec_id


def test_spec_id_ignores_whitespace_in_re_and_vc() -> None:
    a = _spec(re_formula="1 + x", vc_formula={"b": "0 + C(b)"})
    b = _spec(re_formula=" ~1+x ", vc_formula={"b": "0+C(b)"})
    assert a.spec_id == b.spec_id


def test_spec_id_ignores_name() -> None:
    assert _spec(name="first").spec_id == _spec(name="second").spec_id == _spec().spec_id
    assert _spec(name="first").label == "first"
    assert _spec().label == _spec().describe() == "y ~ x + (1 | g)"


@pytest.mark.parametrize(("kw", "label"), [
    ({"re_formula": "~x"}, "y ~ x + (x | g)"),
    ({"re_formula": "0 + x", "cov_structure": "diagonal"}, "y ~ x + (0 + x || g)"),
    ({"cov_structure": "diagonal"}, "y ~ x + (1 | g)"),  # one model with unstructured
    ({"reml": False, "maxiter": 50}, "y ~ x + (1 | g), ML, maxiter=50"),
    ({"re_formula": "0", "vc_formula": {"v": "0 + C(x)"}}, "y ~ x + vc(v: 0 + C(x) | g)"),
    ({"groups": None, "re_formula": None, "vc_formula": {"v": "0 + C(x)"}},
     "y ~ x + vc(v: 0 + C(x))"),  # crossed: not nested in any groups
    ({"engine": "fast", "optimizers": ["nm"]}, "y ~ x + (1 | g), engine=fast, optimizers=nm"),
])
def test_an_unnamed_spec_reads_as_its_model(kw: dict[str, Any], label: str) -> None:
    # spec_name in results: specs that differ in identity read differently
    assert _spec(**kw).label == label


@pytest.mark.parametrize("change", [
    {"formula": "y ~ x + z"},
    {"formula": "y ~ z"},
    {"groups": "h"},
    {"re_formula": "x"},
    {"re_formula": "0", "vc_formula": {"b": "0 + C(b)"}},
    {"vc_formula": {"b": "0 + C(b)"}},
    {"reml": False},
    {"re_formula": "x", "cov_structure": "diagonal"},
    {"optimizers": ("lbfgs",)},
    {"optimizers": ("bfgs", "lbfgs", "powell", "nm")},
    {"maxiter": 50},
    {"engine": "fast"},
    {"engine": "statsmodels"},
])
def test_spec_id_changes_with_model_fields(change: dict) -> None:
    assert _spec(**change).spec_id != _spec().spec_id


def test_spec_id_distinguishes_vc_names_and_formulas() -> None:
    ids = {
        _spec(vc_formula={"b": "0 + C(b)"}).spec_id,
        _spec(vc_formula={"c": "0 + C(b)"}).spec_id,
        _spec(vc_formula={"b": "0 + C(c)"}).spec_id,
        _spec(vc_formula={"b": "0 + C(b)", "c": "0 + C(c)"}).spec_id,
    }
    assert len(ids) == 4
    # ... but not their order.
    assert (_spec(vc_formula={"b": "0 + C(b)", "c": "0 + C(c)"}).spec_id
            == _spec(vc_formula={"c": "0 + C(c)", "b": "0 + C(b)"}).spec_id)


def test_cov_structure_without_random_slopes_is_not_in_the_id() -> None:
    """A random intercept (or components alone) has no covariance to structure: one
    model, one id, so a job listing it either way fits it once."""
    assert _spec(cov_structure="diagonal").spec_id == _spec().spec_id
    vc = {"re_formula": "0", "vc_formula": {"b": "0 + C(b)"}}
    assert _spec(cov_structure="diagonal", **vc).spec_id == _spec(**vc).spec_id
    assert _spec(cov_structure="diagonal", **vc).canonical()["cov_structure"] == "unstructured"
    with pytest.raises(SpecError, match="define the same model"):
        unique_specs([_spec(), _spec(cov_structure="diagonal")])


# -- frozen ----------------------------------------------------------------------------


def test_frozen() -> None:
    s = _spec()
    for field, value in [("formula", "y ~ z"), ("reml", False), ("name", "x"),
                         ("engine", "fast"), ("re_formula", "x")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s, field, value)
    assert s.formula == "y ~ x" and s.reml is True


def test_hashable_and_equal_by_value() -> None:
    a = _spec(vc_formula={"b": "0 + C(b)"}, name="a")
    b = _spec(vc_formula={"b": "0 + C(b)"}, name="a")
    assert a == b and hash(a) == hash(b)
    assert len({a, b, _spec(name="other")}) == 2


def test_replace_revalidates() -> None:
    s = _spec()
    t = s.replace(reml=False, name="ml")
    assert t.reml is False and t.name == "ml" and s.reml is True
    with pytest.raises(SpecError, match=r"got \(maxiter=0\)"):
        s.replace(maxiter=0)


def test_to_dict_round_trip() -> None:
    s = _spec(re_formula="x", vc_formula={"b": "0 + C(b)"}, optimizers=("nm",), name="n")
    d = s.to_dict()
    assert d["optimizers"] == ["nm"] and d["vc_formula"] == {"b": "0 + C(b)"}
    assert ModelSpec(**d) == s
    assert ModelSpec(**d).spec_id == s.spec_id


# -- grid ------------------------------------------------------------------------------


def test_grid_cartesian_product_with_readable_names() -> None:
    specs = grid(name="sleep", formula="Reaction ~ Days", groups="Subject",
                 reml=[True, False], re_formula=["1", "~Days"])
    assert [s.name for s in specs] == [
        "sleep[reml=True,re_formula=1]",
        "sleep[reml=True,re_formula=~Days]",
        "sleep[reml=False,re_formula=1]",
        "sleep[reml=False,re_formula=~Days]",
    ]
    assert [(s.reml, s.re_formula) for s in specs] == [
        (True, "1"), (True, "Days"), (False, "1"), (False, "Days")]
    assert len({s.spec_id for s in specs}) == 4
    assert all(s.formula == "Reaction ~ Days" and s.groups == "Subject" for s in specs)


def test_grid_three_axes_count_and_order() -> None:
    specs = grid(formula=["y ~ x", "y ~ x + z"], groups="g", engine=["fast", "statsmodels"],
                 maxiter=[10, 100, 1000])
    assert len(specs) == 12
    assert specs[0].name == "formula=y~x,engine=fast,maxiter=10"
    assert specs[-1].name == "formula=y~x+z,engine=statsmodels,maxiter=1000"


def test_grid_scalars_only_gives_one_spec() -> None:
    specs = grid(name="one", formula="y ~ x", groups="g")
    assert len(specs) == 1 and specs[0].name == "one"
    assert grid(formula="y ~ x", groups="g")[0].name is None


def test_grid_optimizers_list_is_one_value_list_of_tuples_varies() -> None:
    fixed = grid(formula="y ~ x", groups="g", optimizers=["lbfgs", "nm"])
    assert len(fixed) == 1 and fixed[0].optimizers == ("lbfgs", "nm")
    varied = grid(formula="y ~ x", groups="g", optimizers=[("lbfgs",), ("powell", "nm")])
    assert [s.optimizers for s in varied] == [("lbfgs",), ("powell", "nm")]
    assert varied[1].name == "optimizers=powell+nm"


def test_grid_vc_formula_dict_fixed_list_varies() -> None:
    fixed = grid(formula="y ~ x", groups="g", vc_formula={"b": "0 + C(b)"})
    assert len(fixed) == 1 and fixed[0].vc_formula == {"b": "0 + C(b)"}
    varied = grid(formula="y ~ x", groups="g",
                  vc_formula=[{"b": "0 + C(b)"}, {"c": "0 + C(c)"}])
    assert len(varied) == 2 and varied[0].name.startswith("vc_formula={b:")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"formula": "y ~ x", "groups": "g", "bogus": [1, 2]}, "bogus"),
    ({"formula": "y ~ x", "groups": "g", "reml": []}, "reml"),
    ({"groups": "g"}, "formula"),
    ({"formula": "y ~ x", "groups": "g", "maxiter": [10, 0]}, "maxiter"),
])
def test_grid_errors(kwargs: dict, param: str) -> None:
    with pytest.raises(SpecError, match=rf"got \({param}="):
        grid(**kwargs)


def test_unique_specs_rejects_same_model() -> None:
    specs = grid(formula="y ~ x", groups="g", re_formula=["1", "~1"])
    with pytest.raises(SpecError, match="define the same model"):
        unique_specs(specs)
    ok = grid(formula="y ~ x", groups="g", reml=[True, False])
    assert unique_specs(ok) == ok
    with pytest.raises(SpecError, match="must be ModelSpec"):
        unique_specs([{"formula": "y ~ x"}])


@pytest.mark.parametrize("name", ["Residual", "batch"])
def test_a_variance_component_named_like_another_variance_row_is_refused(name: str) -> None:
    with pytest.raises(SpecError, match=rf"cannot be named {name!r}.*got \(vc_formula="):
        ModelSpec("y ~ 1", groups="batch", vc_formula={name: "0 + C(cask)"})


def test_grid_fits_a_random_intercept_once_across_cov_structures() -> None:
    """lme4's sleepstudy grid (re 1 / ~Days x unstructured / diagonal x reml) fitted the
    random-intercept model twice per reml: a 1x1 covariance has no structure."""
    specs = grid(name="sleep", formula="y ~ x", groups="g", re_formula=["1", "~x"],
                 cov_structure=["unstructured", "diagonal"], reml=[True, False])
    assert len(specs) == 6 and unique_specs(specs) == specs
    ri = [s for s in specs if s.re_formula == "1"]
    assert [s.cov_structure for s in ri] == ["unstructured", "unstructured"]
    assert {s.cov_structure for s in specs if s.re_formula != "1"} == {"unstructured",
                                                                         "diagonal"}
    # The order of the axis changes neither the models nor their ids.
    again = grid(name="sleep", formula="y ~ x", groups="g", re_formula=["1", "~x"],
                 cov_structure=["diagonal", "unstructured"], reml=[True, False])
    assert sorted(s.spec_id for s in again) == sorted(s.spec_id for s in specs)


def test_specs_equal_by_model_not_by_label() -> None:
    a = ModelSpec("y ~ x", groups="g")
    assert a == ModelSpec("y~x", groups="g") == ModelSpec("y ~ x", groups="g", name="other")
    assert len({a, ModelSpec("y~x", groups="g", name="b")}) == 1
    assert a != _spec(reml=False) and a != "y ~ x"
