"""Bad arguments, stores and filters fail before any cluster work, as MixedscaleErrors
that name the problem; odd but usable input (mixed categorical/text files, an unused
mixed-type column) just works."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mixedscale as ms
from mixedscale import api
from mixedscale.errors import DataError, SpecError, StoreError
from mixedscale.source import open_source, read_split_keys
from mixedscale.store import Store

SPEC = ms.ModelSpec("y ~ time", groups="subject")


def _frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"y": rng.normal(size=n), "time": rng.normal(size=n),
                         "subject": rng.choice(list("ABCDEFGH"), n),
                         "site": rng.integers(1, 3, n)})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    _frame().to_parquet(d / "a.parquet", index=False)
    return d


@pytest.mark.parametrize(("kwargs", "err", "words"), [
    ({"split_by": 5}, SpecError, "split_by must be a column name"),
    ({"split_by": [5]}, SpecError, "split_by must be a column name"),
    ({"timeout": "10"}, SpecError, "timeout must be a positive number"),
    ({"workers": 0}, SpecError, "workers"),
    ({"memory_limit": "lots"}, SpecError, "memory_limit"),
    ({"client": "abc"}, SpecError, "client must be a distributed.Client"),
    ({"scheduler": "notaurl"}, SpecError, "scheduler must be an address"),
    ({"store": 5}, StoreError, "got (store=5)"),
    ({"store": "memory://bucket/s"}, SpecError, "memory://"),
])
def test_bad_arguments_fail_before_any_cluster(data_dir: Path, kwargs: dict[str, Any],
                                               err: type[Exception], words: str) -> None:
    # Each would otherwise start (or fail to start) a cluster: the error comes first.
    with pytest.raises(err) as info:
        ms.fit_many(data_dir, SPEC, progress=False, **kwargs)
    assert words in str(info.value)


def test_store_path_that_is_a_file_is_refused_before_any_work(data_dir: Path,
                                                              tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("")
    for store in (f, f / "sub"):
        with pytest.raises(SpecError, match="the store must be a folder"):
            ms.fit_many(data_dir, SPEC, store=str(store), progress=False)


def test_unwritable_store_is_refused_before_any_work(data_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/proc")  # root may write anywhere but here
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    with pytest.raises(SpecError, match="cannot create the store under"):
        api.prepare(data_dir, SPEC, store=str(locked / "results"))
    api.prepare(data_dir, SPEC, store=str(tmp_path / "new" / "results"))
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind


def test_store_inside_the_data_folder_is_refused_unless_hidden(data_dir: Path) -> None:
    with pytest.raises(SpecError, match="the store is inside the data folder"):
        api.prepare(data_dir, SPEC, store=str(data_dir / "results"))
    # A glob is refused when it would match the store's parts, whatever their folder
    # (a glob lists '_' folders too), and only then.
    for store in ("results", "_results"):
        with pytest.raises(SpecError, match="the store is inside the data folder"):
            api.prepare(str(data_dir / "**" / "*.parquet"), SPEC, store=str(data_dir / store))
    api.prepare(str(data_dir / "*.parquet"), SPEC, store=str(data_dir / "results"))
    # A folder the data listing skips (leading "_"), a single file's folder, elsewhere.
    api.prepare(data_dir, SPEC, store=str(data_dir / "_results"))
    api.prepare(data_dir / "a.parquet", SPEC, store=str(data_dir / "results"))
    api.prepare(data_dir, SPEC, store=str(data_dir.parent / "results"))


def test_foreign_file_in_the_store_is_a_store_error(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "store"))
    st.init()
    pq.write_table(pa.table({"x": [1]}), st.path("fits", "part-foreign.parquet"))
    with pytest.raises(StoreError, match="not a mixedscale part"):
        st.fits()


@pytest.mark.parametrize(("flt", "words"), [
    ([["time", ">", "abc"]], "does not match column 'time' of type double"),
    ([["time", ">", "1.5"]], "write numbers unquoted"),
    ([["subject", "==", 1]], "quote text values"),
    ([["subject", "in", "A"]], "needs a list of values"),
    ([["site", "in", ["1", "2"]]], "does not match column 'site'"),
])
def test_filter_values_of_the_wrong_type_fail_at_plan_time(data_dir: Path, flt: list[Any],
                                                           words: str) -> None:
    for data in (data_dir, _frame()):
        with pytest.raises(SpecError, match="filter") as info:
            api.prepare(data, SPEC, filter=flt)
        assert words in str(info.value)


def test_hive_key_filter_quoted_is_named(tmp_path: Path) -> None:
    df = _frame()
    df.to_parquet(tmp_path / "hive", partition_cols=["site"], index=False)
    with pytest.raises(SpecError, match="write numbers unquoted"):
        api.prepare(tmp_path / "hive", SPEC, split_by="site", filter=[["site", "==", "1"]])
    _, plan = api.prepare(tmp_path / "hive", SPEC, split_by="site",
                          filter=[["site", "in", {1}]])
    assert [s.key for s in plan.slices] == [(1,)]


def test_categorical_in_one_file_and_text_in_another_reads_as_text(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    a, b = _frame(seed=1), _frame(seed=2)
    a["subject"] = a["subject"].astype("category")
    a.to_parquet(d / "a.parquet", index=False)
    b.to_parquet(d / "b.parquet", index=False)
    src, plan = api.prepare(d, ms.ModelSpec("y ~ time", groups="site"), split_by="subject")
    assert src.schema.field("subject").type == pa.string()
    df, _ = src.read(plan.columns)
    assert len(df) == len(a) + len(b)
    assert sorted(df["subject"].astype(str).unique()) == sorted(b["subject"].unique())
    keys, _ = read_split_keys(src, ["subject"])
    assert int(keys["_rows"].sum()) == len(a) + len(b)


def test_dataframe_column_checks(tmp_path: Path) -> None:
    df = _frame()
    with pytest.raises(DataError, match=r"column names repeat in the DataFrame: \['time'\]"):
        api.prepare(pd.concat([df, df[["time"]]], axis=1), SPEC)
    mixed = df.assign(junk=[1, "a"] * (len(df) // 2))
    assert api.prepare(mixed, SPEC)[1].n_fits == 1  # unused: harmless
    assert open_source(mixed).untyped.keys() == {"junk"}
    with pytest.raises(DataError, match="column 'junk' mixes value types"):
        api.prepare(mixed, ms.ModelSpec("y ~ junk", groups="subject"))


def test_single_fit_checks_input_like_fit_many() -> None:
    df = _frame()
    with pytest.raises(DataError, match=r"the response must be numeric; got \(y=text\)"):
        ms.fit(df.assign(y="a"), SPEC)
    with pytest.raises(DataError, match="column names repeat"):
        ms.fit(pd.concat([df, df[["time"]]], axis=1), SPEC)
    assert ms.fit(df.assign(junk=[1, "a"] * (len(df) // 2)), SPEC).fit["status"] == "ok"


def test_dataframe_with_a_repeated_index_plans_normally() -> None:
    df = pd.concat([_frame().assign(s=f"s{i}") for i in range(3)])  # index 0..239 x 3
    _, plan = api.prepare(df, SPEC, split_by="s")
    assert plan.n_fits == 3 and sum(s.rows for s in plan.slices) == len(df)


def _task_tables() -> dict[str, pa.Table]:
    def t(**cols: Any) -> pa.Table:
        return pa.table({"fit_id": ["f1"], **{k: [v] for k, v in cols.items()}})
    return {"fits": t(status="ok"), "params": t(term="x"), "variance": t(kind="residual")}


def test_failed_commit_takes_back_its_params_and_variance(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    # A full disk at the fits part: no params/variance rows of uncommitted fits remain
    # for readers of the folders (and no second copy after a rerun under another name).
    import json

    from mixedscale.store import FAULTS_ENV

    st = Store(str(tmp_path / "store"))
    st.init()
    monkeypatch.setenv(FAULTS_ENV, json.dumps([{"at": "publish", "table": "fits",
                                                "do": "enospc", "after_bytes": 10}]))
    with pytest.raises(StoreError, match="No space left"):
        st.publish("t1", _task_tables())
    for table in ("fits", "params", "variance"):
        assert list((tmp_path / "store" / table).iterdir()) == []
    monkeypatch.delenv(FAULTS_ENV)
    assert st.publish("t1", _task_tables())  # the retry commits all three
    assert len(st.params()) == 1 and len(st.fits()) == 1


def test_a_fit_in_two_parts_is_read_once_in_every_table_and_column_subset(
        tmp_path: Path) -> None:
    # Two writers of one fit (an object store's race): the first part's rows win in
    # every table, also when a table is read alone or the fits' status column alone.
    st = Store(str(tmp_path / "store"))
    st.init()
    first, second = _task_tables(), _task_tables()
    second["fits"] = second["fits"].set_column(1, "status", pa.array(["error"]))
    second["params"] = second["params"].set_column(1, "term", pa.array(["z"]))
    assert st.publish("a", first) and st.publish("b", second)
    fits, params, variance = st.run_tables({"a", "b"})
    assert fits["status"].tolist() == ["ok"] and params["term"].tolist() == ["x"]
    assert len(variance) == 1
    (alone,) = st.run_tables({"a", "b"}, names=("params",))
    assert alone["term"].tolist() == ["x"]
    (status,) = st.run_tables({"a", "b"}, ["f1"], names=("fits",), fit_columns=["status"])
    assert list(status.columns) == ["fit_id", "status"] and status["status"].tolist() == ["ok"]
    (none,) = st.run_tables({"b"}, ["f2"], names=("fits",), fit_columns=["status"])
    assert none.empty


def test_a_jobs_tables_come_back_in_its_order_without_other_jobs_fits(tmp_path: Path
                                                                      ) -> None:
    # One lookup of each row's fit id among the job's: it drops other jobs' rows, finds
    # a fit committed twice, and sorts every table by the job's order (a fit's rows in
    # the order written).
    def tables(ids: list[str], status: str = "ok") -> dict[str, pa.Table]:
        return {"fits": pa.table({"fit_id": ids, "status": [status] * len(ids)}),
                "params": pa.table({"fit_id": [f for f in ids for _ in "ab"],
                                    "term": [t for _ in ids for t in "ab"]}),
                "variance": pa.table({"fit_id": ids, "kind": ["residual"] * len(ids)})}

    st = Store(str(tmp_path / "store"))
    st.init()
    assert st.publish("a", tables(["f3", "other", "f1"]))
    assert st.publish("b", tables(["f2", "f1"], status="error"))  # f1 again: "a" wins
    job = ["f1", "f2", "f3"]
    rank = np.array([2, 0, 1])  # the job's order: f2, f3, f1
    fits, params, variance = st.run_tables({"a", "b"}, job, rank=rank, expect=3)
    assert fits["fit_id"].tolist() == ["f2", "f3", "f1"] == variance["fit_id"].tolist()
    assert fits["status"].tolist() == ["error", "ok", "ok"]
    assert list(zip(params["fit_id"], params["term"], strict=True)) == [
        ("f2", "a"), ("f2", "b"), ("f3", "a"), ("f3", "b"), ("f1", "a"), ("f1", "b")]
    assert fits.index.tolist() == [0, 1, 2] and params.index.tolist() == list(range(6))
    # Without an order: as read, the same rows.
    unordered = st.run_tables({"a", "b"}, pa.array(job), expect=3)
    for got, want in zip(unordered, (fits, params, variance), strict=True):
        assert sorted(map(tuple, got.to_numpy())) == sorted(map(tuple, want.to_numpy()))
    with pytest.raises(StoreError, match="found 3 of 4"):
        st.run_tables({"a", "b"}, [*job, "f4"], rank=np.arange(4), expect=4)


def test_commit_restores_parts_another_writer_took_back(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "store"))
    st.init()
    tables = _task_tables()
    st._publish_one("params", "t1", tables["params"])  # a writer that will fail...
    st._publish_one("variance", "t1", tables["variance"])
    real = st._publish_one

    def take_back_then_publish(table: str, name: str, data: pa.Table,
                               staged: str | None = None) -> bool:
        if table == "fits":  # ...takes its parts back just before this commit
            for t in ("params", "variance"):
                (tmp_path / "store" / t / f"part-{name}.parquet").unlink()
        return real(table, name, data, staged)

    st._publish_one = take_back_then_publish  # type: ignore[method-assign]
    assert st.publish("t1", tables)
    assert len(st.params()) == 1 and len(st.variance()) == 1


@pytest.mark.parametrize("name", ["_part", "_win", "_rows", "_"])
def test_a_split_column_named_like_an_internal_column_is_refused(name: str) -> None:
    df = _frame().rename(columns={"site": name})
    with pytest.raises(SpecError, match=rf"split column {name!r} starts with '_', which "
                       r"marks mixedscale's internal columns"):
        api.prepare(df, [SPEC], [name])


def test_retry_errors_needs_a_store() -> None:
    with pytest.raises(SpecError, match=r"got \(retry_errors=True, store=None\)"):
        ms.fit_many(_frame(), SPEC, retry_errors=True, scheduler="tcp://127.0.0.1:1")


@pytest.mark.parametrize("name", ["status", "llf", "term", "estimate", "group", "spec_id",
                                  "Status", "GROUP"])
def test_a_split_column_named_like_a_results_column_is_refused(name: str) -> None:
    df = _frame().rename(columns={"site": name})
    with pytest.raises(SpecError) as exc:
        api.prepare(df, [SPEC], [name])
    msg = str(exc.value)
    assert f"split column {name!r} has the name of a results column" in msg
    assert f"df.rename(columns={{{name!r}: {name + '_key'!r}}})" in msg
    assert msg.endswith(f"got (split_by=[{name!r}])")


@pytest.mark.parametrize("split, role", [("subject", "its groups column"),
                                         ("y", "its response"),
                                         ("time", "a column of its formulas")])
def test_a_split_column_the_model_uses_is_refused(split: str, role: str) -> None:
    with pytest.raises(SpecError) as exc:
        api.prepare(_frame(), [SPEC], ["site", split])
    msg = str(exc.value)
    assert f"split column {split!r} is also {role}" in msg and "no slice could be fitted" in msg
    assert f"got (split_by=['site', {split!r}], groups='subject'" in msg


def test_a_date_in_a_formula_is_refused_unless_a_factor() -> None:
    df = _frame()
    df["when"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(np.arange(len(df)) % 5, unit="D")
    with pytest.raises(SpecError) as exc:
        ms.fit(df, ms.ModelSpec("y ~ when", groups="subject"))
    assert "column 'when' is a timestamp[" in str(exc.value)
    assert "or write C(when) for a factor" in str(exc.value)
    with pytest.raises(SpecError, match="column 'when' is a timestamp"):
        ms.fit(df, ms.ModelSpec("y ~ C(when) + I(when)", groups="subject"))
    r = ms.fit(df, ms.ModelSpec("y ~ C(when)", groups="subject"))
    assert r.status == "ok" and r.params["term"].str.startswith("C(when)").sum() == 4
    # ...and as the groups column it is just a label.
    assert ms.fit(df, ms.ModelSpec("y ~ time", groups="when")).status == "ok"


def test_decimal_columns_are_numbers(tmp_path: Path) -> None:
    import decimal

    df = _frame()
    plain = ms.fit(df, SPEC)
    dec = df.assign(y=[decimal.Decimal(f"{v:.6f}") for v in df["y"]],
                    time=[decimal.Decimal(f"{v:.6f}") for v in df["time"]])
    r = ms.fit(dec, SPEC)
    assert r.status == "ok" and list(r.params["term"]) == ["Intercept", "time"]
    assert r.fit["llf"] == pytest.approx(plain.fit["llf"], abs=1e-3)
    path = tmp_path / "dec.parquet"
    dec.to_parquet(path, index=False)
    assert pq.read_schema(path).field("y").type == pa.decimal128(8, 6) or \
        pa.types.is_decimal(pq.read_schema(path).field("y").type)
    src = open_source(str(path))
    frame, _ = src.read(["y", "time", "subject"])
    assert frame["y"].dtype == "float64" and frame["time"].dtype == "float64"


def test_a_dash_in_a_column_name_suggests_quoting() -> None:
    df = _frame().rename(columns={"time": "time-point"})
    with pytest.raises(SpecError) as exc:
        ms.fit(df, ms.ModelSpec("y ~ time-point", groups="subject"))
    assert "quoting: Q('time-point')" in str(exc.value)
    assert ms.fit(df, ms.ModelSpec("y ~ Q('time-point')", groups="subject")).status == "ok"


def test_hints_for_common_slips(tmp_path: Path) -> None:
    df = _frame()
    with pytest.raises(SpecError, match=r"grid has no axis 'group'; did you mean 'groups'\?"):
        ms.grid(formula=["y ~ time"], group="subject")
    with pytest.raises(SpecError, match=r"'subject' is an index level of the DataFrame, not a "
                       r"column; make it one with df.reset_index\(\); got \(index=\['subject'\]\)"):
        ms.fit(df.set_index("subject"), SPEC)
    with pytest.raises(SpecError, match=r"'site' is an index level"):
        api.prepare(df.set_index(["site", "subject"]).reset_index("subject"), SPEC, "site")
    job = tmp_path / "job.yaml"
    job.write_text("data: {}\n")
    with pytest.raises(DataError, match=r"'.*job.yaml' is not a Parquet file"):
        api.prepare(str(job), SPEC)
    for flt in ([("site", "==", None)], [("site", "in", [1, None])]):
        with pytest.raises(SpecError, match=r"a filter value cannot be None: a comparison with "
                           r"a missing value matches no row"):
            api.prepare(df, SPEC, filter=flt)


def test_a_folder_of_other_files_is_not_taken_for_a_store(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("data: {}\n")
    with pytest.raises(SpecError, match=r"the store folder .* holds other files \(job.yaml\) "
                       r"and no results store; give a new or empty folder"):
        api.prepare(_frame(), SPEC, store=str(tmp_path))
    for ok in (tmp_path / "new", tmp_path / "empty"):
        if ok.name == "empty":
            ok.mkdir()
        api.prepare(_frame(), SPEC, store=str(ok))
    Store(str(tmp_path / "store")).init()
    (tmp_path / "store" / "notes.txt").write_text("mine")  # a store with a user's note
    api.prepare(_frame(), SPEC, store=str(tmp_path / "store"))


def test_cluster_size_with_an_existing_cluster_is_refused() -> None:
    for kw, shown in (({"workers": 2}, "workers=2"), ({"memory_limit": "2GB"},
                                                       "memory_limit='2GB'")):
        with pytest.raises(SpecError, match=rf"sizes the embedded cluster; with scheduler= "
                           rf"the cluster is already there.*got \(scheduler=\.\.\., {shown}\)"):
            ms.fit_many(_frame(), SPEC, scheduler="tcp://127.0.0.1:1", **kw)


def test_a_file_with_an_unreadable_split_column_page_is_left_out_whole(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its readable row groups made slices of part of their rows, fitted and stored as
    "ok" with no word said; the file is left out whole, with one warning line."""
    from .conftest import make_genes

    d = tmp_path / "data"
    d.mkdir()
    df = make_genes(n_genes=4).sort_values(["gene", "subject", "time"])
    two = df[df["gene"].isin(["g000", "g001"])]
    two.to_parquet(d / "bad.parquet", index=False, row_group_size=len(two) // 4,
                   compression=None)
    df[df["gene"].isin(["g002", "g003"])].to_parquet(d / "good.parquet", index=False)
    cc = pq.ParquetFile(d / "bad.parquet").metadata.row_group(0).column(0)  # gene, rg 0
    off = cc.dictionary_page_offset or cc.data_page_offset
    raw = bytearray((d / "bad.parquet").read_bytes())
    raw[off:off + 8] = b"\xff" * 8
    (d / "bad.parquet").write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="mixedscale"):
        src, plan = api.prepare(str(d), [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    assert [s.key for s in plan.slices] == [("g002",), ("g003",)]
    assert list(src.bad_files) == [str(d / "bad.parquet")]
    assert [r.getMessage() for r in caplog.records].count(
        f"unreadable input file left out of the run: {d / 'bad.parquet'}: "
        f"{src.bad_files[str(d / 'bad.parquet')]}") == 1


def _hive(tmp_path: Path, values: dict[int, Any]) -> Path:
    from .conftest import make_genes

    df = make_genes(n_genes=6)
    df["site"] = (df["gene"].str[1:].astype(int) % 3).map(values)
    root = tmp_path / "hive"
    pq.write_to_dataset(pa.Table.from_pandas(df, preserve_index=False), str(root),
                        partition_cols=["site"])
    return root


def test_hive_partitions_read_as_pyarrow_writes_them(tmp_path: Path) -> None:
    """pyarrow writes a missing value as __HIVE_DEFAULT_PARTITION__ (every fit failed on
    a string in an int column) and URL-encodes values (keys were stored encoded)."""
    spec = ms.ModelSpec("y ~ time", groups="subject")
    root = _hive(tmp_path / "a", {0: 0, 1: 1, 2: None})
    src, plan = api.prepare(str(root), [spec], "site")
    assert [s.key for s in plan.slices] == [(0,), (1,), (None,)]
    df, _ = src.read(plan.columns, split_by=["site"])
    assert str(df["site"].dtype) == "Int64" and df["site"].isna().sum() == len(df) // 3
    root = _hive(tmp_path / "b", {0: "north site", 1: "south/east", 2: "x"})
    src, plan = api.prepare(str(root), [spec], "site")
    assert sorted(s.key[0] for s in plan.slices) == ["north site", "south/east", "x"]
    df, _ = src.read(plan.columns, split_by=["site"])
    assert set(df["site"]) == {"north site", "south/east", "x"}


def test_a_column_both_in_the_folders_and_the_files_is_refused(tmp_path: Path) -> None:
    from .conftest import make_genes

    df = make_genes(n_genes=2)
    df["site"] = 7
    (tmp_path / "site=a").mkdir()
    df.to_parquet(tmp_path / "site=a" / "d.parquet", index=False)
    with pytest.raises(DataError, match="column 'site' is both a hive partition folder"):
        api.prepare(str(tmp_path), [ms.ModelSpec("y ~ time", groups="subject")], "site")


def test_a_tls_scheduler_without_certificates_is_refused_before_connecting() -> None:
    with pytest.raises(SpecError, match=r"a tls:// scheduler needs the client's certificates"
                       r".*got \(scheduler='tls://127.0.0.1:1', security=None\)"):
        ms.fit_many(_frame(), SPEC, scheduler="tls://127.0.0.1:1")


def test_a_job_naming_two_different_models_alike_is_refused(tmp_path: Path) -> None:
    from mixedscale.job import load_job

    text = ("name: j\ndata: {path: d.parquet}\nmodels:\n"
            "  - {name: a, formula: 'y ~ x', groups: g}\n"
            "  - {name: a, formula: 'y ~ x', groups: g, reml: false}\n")
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"models\[0\] and models\[1\] are both named 'a'"):
        load_job(tmp_path / "job.yaml").specs()
