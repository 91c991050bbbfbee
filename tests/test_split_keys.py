"""Split keys: missing values of every key dtype are a slice of their own, fitted and
stored as null; a split column typed differently by two jobs of one store is refused."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mixedscale as ms
from mixedscale.api import prepare
from mixedscale.executor import RunOptions, _Run, pending
from mixedscale.plan import Plan
from mixedscale.source import Source
from mixedscale.store import Store, open_store
from mixedscale.worker import (
    Loaded,
    Packed,
    _restrict,
    key_column,
    key_units,
    load_unit,
    partition,
    run_task,
)

from .clusterutil import invoke
from .conftest import make_genes

RI = ms.ModelSpec("y ~ time", groups="subject", name="ri")
N_GENES = 6
MISSING = (0, 3)  # genes whose key is missing: first, and between present ones


def _keyed(kind: str) -> pd.DataFrame:
    """Genes with a split column ``k`` of dtype ``kind``: two values, missing for
    the genes in MISSING (so the missing slice is neither first nor last in the data)."""
    df = make_genes(n_genes=N_GENES, n_subjects=8)
    g = df["gene"].str[1:].astype(int).to_numpy()
    miss = np.isin(g, MISSING)
    values = {
        "Int64": pd.array(np.where(miss, pd.NA, g % 2), dtype="Int64"),
        "boolean": pd.array(np.where(miss, pd.NA, g % 2 == 1), dtype="boolean"),
        "string": pd.array(np.where(miss, None, np.where(g % 2, "odd", "even")),
                           dtype="string"),
        "str": pd.Series(np.where(miss, None, np.where(g % 2, "odd", "even")), dtype="str"),
        "object": pd.Series(np.where(miss, None, np.where(g % 2, "odd", "even")),
                            dtype=object),
        "float": np.where(miss, np.nan, (g % 2).astype(float)),
        "datetime": pd.to_datetime(np.where(miss, None, np.where(g % 2, "2020-01-01",
                                                                 "2021-06-30"))),
    }
    df["k"] = values[kind]
    return df


KINDS = ["Int64", "boolean", "string", "str", "object", "float", "datetime"]


def _unit_data(src: Source, plan: Plan, unit: int, how: str) -> Any:
    """A unit's rows, loaded as the executor has a worker load them."""
    keys = [plan.slices[i].key for i in plan.units[unit].slices]
    if how == "frame":  # executor._Run.unit_data
        df, _ = src.read(plan.columns, split_by=plan.split_by)
        return Loaded(_restrict(df, plan.split_by, keys), 0)
    if how == "shuffle":
        key_unit = key_units([plan.slices[i].key for u in plan.units for i in u.slices],
                             [u.index for u in plan.units for _ in u.slices])
        return [partition(src, src.row_groups, plan.columns, plan.split_by,
                          Packed(key_unit)).get(unit)]
    rgs = [src.row_groups[i] for i in plan.units[unit].row_groups]
    return load_unit(src, rgs, plan.columns, plan.split_by, Packed(key_column(keys)))


def _run(data: Any, store: Store, how: str) -> tuple[Source, Plan]:
    """Every task of the plan, without a cluster, committed to ``store``."""
    src, plan = prepare(data, [RI], "k")
    run = _Run(plan, src, store, None, RunOptions())
    for t in plan.tasks:
        assert run_task(run.payload(t), _unit_data(src, plan, t.unit, how), store).committed
    return src, plan


@pytest.mark.parametrize("how", ["frame", "direct", "shuffle"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_key_is_a_slice_fitted_and_stored_as_null(tmp_path: Path, kind: str,
                                                            how: str) -> None:
    df = _keyed(kind)
    data: Any = df
    if how != "frame":
        data = str(tmp_path / "d.parquet")  # a row group of 2 genes: units split them
        df.to_parquet(data, index=False, row_group_size=2 * 8 * 4)
    store = Store(str(tmp_path / "store"))
    store.init()
    src, plan = _run(data, store, how)
    assert [s.key[0] is None for s in plan.slices].count(True) == 1  # one missing key
    fits = pq.read_table(store.path("fits"))
    assert fits.schema.field("k").type == src.schema.field("k").type  # typed as the source
    rows = fits.select(["k", "status", "n_obs"]).to_pylist()
    want = df.groupby("k", dropna=False, observed=True).size()
    assert len(rows) == len(want) == 3
    for r in rows:
        assert r["status"] == "ok", r
    missing = [r for r in rows if r["k"] is None]
    assert len(missing) == 1 and missing[0]["n_obs"] == len(MISSING) * 8 * 4
    assert sorted(r["n_obs"] for r in rows) == sorted(want.tolist())
    assert ms.open_store(store.url).fits()["k"].isna().sum() == 1


def test_nullable_int_keys_keep_the_fit_ids_of_int_keys() -> None:
    """Int64 keys with missing values plan as ints and None (NaN keys' form); without
    missing values, as int64's: fit ids by the planner's JSON of the keys."""
    df = _keyed("Int64")
    _, plan = prepare(df, [RI], "k")
    assert [s.key for s in plan.slices] == [(0,), (1,), (None,)]
    assert all(s.fingerprint for s in plan.slices)  # content-hashed, the missing one too
    for t in plan.tasks:
        for it in t.items:
            s = plan.slices[it.slice]
            blob = f"[{json.dumps(RI.spec_id)}, {json.dumps(list(s.key))}, " \
                   f"{json.dumps(s.fingerprint)}]"
            assert it.fit_id == hashlib.sha256(blob.encode()).hexdigest()[:20]
    full = df[df["k"].notna()].reset_index(drop=True)
    _, nullable = prepare(full, [RI], "k")
    _, plain = prepare(full.assign(k=full["k"].astype("int64")), [RI], "k")
    assert nullable.fit_ids() == plain.fit_ids()


@pytest.mark.parametrize("how", ["direct", "shuffle"])
def test_parquet_int_keys_with_a_missing_value_stay_exact_ints(tmp_path: Path,
                                                               how: str) -> None:
    """pandas reads an int64 column with nulls as float64, which rounds above 2**53:
    keys 2**60 + 1 and 2**60 + 2 became one slice, and every key a float."""
    df = _keyed("Int64")
    df["k"] = df["k"] + 2**60 + 1
    data = str(tmp_path / "d.parquet")
    df.to_parquet(data, index=False, row_group_size=2 * 8 * 4)
    _, plan = prepare(data, [RI], "k")
    assert [s.key for s in plan.slices] == [(2**60 + 1,), (2**60 + 2,), (None,)]
    assert all(type(s.key[0]) is int for s in plan.slices[:2])
    store = Store(str(tmp_path / "store"))
    store.init()
    _run(data, store, how)
    fits = ms.open_store(store.url).fits()
    got = {(None if pd.isna(k) else int(k)): n for k, n in zip(fits["k"], fits["n_obs"],
                                                               strict=True)}
    want = df.groupby("k", dropna=False).size()
    assert got == {(None if pd.isna(k) else int(k)): n for k, n in want.items()}
    assert len(got) == 3
    assert (fits["status"] == "ok").all()


@pytest.mark.parametrize("kind", ["float", "object", "Int64", "string"])
def test_a_unit_of_the_missing_key_alone_keeps_its_rows(kind: str) -> None:
    df = _keyed(kind)
    n_missing = len(MISSING) * 8 * 4
    assert len(_restrict(df, ["k"], [(None,)])) == n_missing
    some = _keyed(kind)["k"].dropna().iloc[0]
    some = some.item() if isinstance(some, np.generic) else some
    both = _restrict(df, ["k"], [(some,), (None,)])
    assert len(both) == n_missing + int((df["k"] == some).sum())
    two = _restrict(df.assign(j=df["gene"]), ["k", "j"], [(None, "g000")])
    assert len(two) == 8 * 4


@pytest.mark.parametrize("kind", ["float", "object", "Int64", "string"])
def test_a_loaded_unit_holds_exactly_its_keys_rows(kind: str, tmp_path: Path) -> None:
    """A unit's row groups may hold other units' keys (unsorted data): those rows go.
    When they hold only its own (sorted data), the rows are kept as read, and the
    positions found while checking serve the tasks."""
    df = _keyed(kind)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False)
    src, plan = prepare(str(f), [RI], "k")
    everything = [plan.slices[i].key for u in plan.units for i in u.slices]
    for keys in (everything, [k for k in everything if k[0] is None],
                 [k for k in everything if k[0] is not None][:1]):
        got = load_unit(src, src.row_groups, plan.columns, plan.split_by, Packed(keys))
        assert isinstance(got, Loaded)
        assert set(got.grouped(["k"])[1].index) == set(keys)
        n = sum(len(got.grouped(["k"])[1].get(k)) for k in keys)
        assert n == len(got.frame) == len(_restrict(df, ["k"], keys))
        fresh = Loaded(got.frame.copy(), 0).grouped(["k"])[1]
        for k in keys:
            np.testing.assert_array_equal(got.grouped(["k"])[1].get(k), fresh.get(k))


@pytest.mark.cluster
def test_fit_many_fits_a_nullable_int_key_with_missing_values(cluster_client: Any,
                                                              tmp_path: Path) -> None:
    df = _keyed("Int64")
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False)
    for data, name in ((df, "frame"), (str(f), "parquet")):
        res = ms.fit_many(data, RI, split_by="k", store=str(tmp_path / name),
                          client=cluster_client, progress=False)
        fits = res.fits
        assert res.summary()["by_status"] == {"ok": 3}, name
        assert fits.loc[fits["k"].isna(), "n_obs"].tolist() == [len(MISSING) * 8 * 4]
        assert pq.read_table(tmp_path / name / "fits").schema.field("k").type == pa.int64()


# -- one split column, two types -------------------------------------------------------


def _sited(n_genes: int = 4) -> pd.DataFrame:
    df = make_genes(n_genes=n_genes)
    df["site"] = df["subject"] % 3
    return df


def _commit_all(data: Any, split: str | list[str], store: Store) -> Plan:
    """A job's fits committed without the checks of a run (as older versions did)."""
    store.init()
    src, plan = prepare(data, [RI], split)
    run = _Run(plan, src, store, None, RunOptions())
    for t in plan.tasks:
        assert run_task(run.payload(t), Loaded(src.read(plan.columns)[0], 0), store).committed
    return plan


def _texted(df: pd.DataFrame, col: str) -> pd.DataFrame:
    return df.assign(**{col: df[col].astype(str)})


def test_a_categorical_key_is_stored_as_its_values_type(tmp_path: Path) -> None:
    # The store's key type must not depend on a pandas dtype: a job split by a
    # categorical column, then by the same column as text, shares its fits.
    df = make_genes(n_genes=3)
    store = Store(str(tmp_path / "s"))
    _commit_all(df.assign(gene=df["gene"].astype("category")), "gene", store)
    typ = pq.read_table(tmp_path / "s" / "fits").schema.field("gene").type
    assert pa.types.is_string(typ) or pa.types.is_large_string(typ), typ
    _, plan = prepare(df, [RI], "gene")
    store.check_split_types(plan.key_fields, [])
    assert not pending(plan, store).todo  # the same fit ids: nothing left to fit


def test_older_parts_with_categorical_keys_read_with_text_ones(tmp_path: Path) -> None:
    df = make_genes(n_genes=4)
    store = Store(str(tmp_path / "s"))
    store.init()
    old = pa.Table.from_pandas(df.assign(gene=df["gene"].astype("category")),
                               preserve_index=False)  # as older versions keyed them
    assert pa.types.is_dictionary(old.schema.field("gene").type)
    _commit_all(df[df["gene"].isin(["g000", "g001"])], "gene", store)
    src, plan = prepare(old.to_pandas()[lambda d: d["gene"].isin(["g002", "g003"])], [RI],
                        "gene")
    plan.key_fields = [pa.field("gene", old.schema.field("gene").type)]
    run = _Run(plan, src, store, None, RunOptions())
    for t in plan.tasks:
        assert run_task(run.payload(t), Loaded(src.read(plan.columns)[0], 0), store).committed
    assert any(pa.types.is_dictionary(pq.read_schema(f).field("gene").type)
               for f in (tmp_path / "s" / "fits").iterdir())
    store.check_split_types([pa.field("gene", pa.string())], [])
    fits = open_store(str(tmp_path / "s")).fits()
    assert sorted(fits["gene"]) == ["g000", "g001", "g002", "g003"]


def test_a_split_column_typed_otherwise_in_the_store_is_refused(tmp_path: Path) -> None:
    df = _sited()
    store = Store(str(tmp_path / "store"))
    _commit_all(df, "site", store)
    # Text where the store holds int64: refused when the run opens the store.
    _, plan = prepare(_texted(df, "site"), [RI], "site", store=store.url)
    with pytest.raises(ms.SpecError, match=r"split column 'site' is text here but int64 in "
                       r"the results store's earlier fits .*cast it to int64 or use another "
                       r"store; got \(split_by=\['site'\], store='.*store'\)"):
        pending(plan, store)
    # Types that read together pass: int32 and float64 beside int64, and other columns.
    for ok in (df.assign(site=df["site"].astype("int32")),
               df.assign(site=df["site"].astype(float))):
        _, plan = prepare(ok, [RI], "site")
        pending(plan, store)
    _, plan = prepare(_texted(df.assign(batch=df["subject"] % 2), "batch"), [RI],
                      ["gene", "batch"])
    pending(plan, store)
    ms.open_store(store.url).fits()  # nothing refused was written


def test_fit_many_refuses_the_second_type_before_any_cluster(tmp_path: Path) -> None:
    df = _sited()
    store = tmp_path / "store"
    _commit_all(_texted(df, "site"), "site", Store(str(store)))
    before = sorted(p.name for p in (store / "fits").iterdir())
    # The scheduler is unreachable: refusing must come first.
    with pytest.raises(ms.SpecError, match=r"split column 'site' is int64 here but text"):
        ms.fit_many(df, RI, split_by="site", store=str(store),
                    scheduler="tcp://127.0.0.1:1", progress=False)
    assert sorted(p.name for p in (store / "fits").iterdir()) == before
    assert not list((store / "_runs").glob("*.json"))  # no run was started


def test_a_store_with_parts_of_two_types_reads_as_a_store_error(tmp_path: Path) -> None:
    df = _sited()
    store = Store(str(tmp_path / "store"))
    _commit_all(df, "site", store)
    _commit_all(_texted(df, "site"), "site", store)  # an older version let it in
    st = ms.open_store(store.url)
    for read in (st.fits, st.params, st.variance):
        with pytest.raises(ms.StoreError, match=r"hold column 'site' as (int64|text) in "
                           r"'.*part-.*\.parquet' but as (text|int64) in .*move the parts "
                           r"of one type .*got \(store="):
            read()
    code, out, err = invoke(["show", store.url])  # an error line, not a traceback
    assert code == 3 and "error: the results store's parts hold column 'site'" in err
    assert "Traceback" not in out + err


def test_the_cli_refuses_the_second_type_with_exit_2(tmp_path: Path) -> None:
    df = _sited()
    store = Store(str(tmp_path / "store"))
    _commit_all(df, "site", store)
    f = tmp_path / "d.parquet"
    _texted(df, "site").to_parquet(f, index=False)
    code, _, err = invoke(["fit", str(f), "--formula", "y ~ time", "--groups", "subject",
                           "--split-by", "site", "--store", store.url,
                           "--scheduler", "tcp://127.0.0.1:1"])
    assert code == 2 and "split column 'site' is text here but int64" in err
    # validate, "every plan-time check", refuses it too (it said ok)
    job = tmp_path / "job.yaml"
    job.write_text(f"data: {{path: {str(f)!r}, split_by: [site]}}\n"
                   f"models: [{{formula: 'y ~ time', groups: subject}}]\n"
                   f"store: {store.url!r}\n")
    code, _, err = invoke(["validate", str(job)])
    assert code == 2 and "split column 'site' is text here but int64" in err, err


# -- keys typed per file, and keys that read back differently (a data-source review)
def _files(tmp_path: Path, tables: list[pa.Table]) -> str:
    folder = tmp_path / "d"
    folder.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i}.parquet")
    return str(folder)


def _with_key(df: pd.DataFrame, values: list[Any], typ: pa.DataType) -> pa.Table:
    """``df``'s genes keyed by ``values`` (one per gene, in order), as a column of ``typ``."""
    genes = sorted(df["gene"].unique())
    of = dict(zip(genes, values, strict=True))
    t = pa.Table.from_pandas(df, preserve_index=False)
    return t.append_column("k", pa.array([of[g] for g in df["gene"]], type=typ))


def _stored_fits(data: Any, tmp_path: Path, how: str = "direct") -> pd.DataFrame:
    store = Store(str(tmp_path / "store"))
    store.init()
    _run(data, store, how)
    return ms.open_store(store.url).fits()


@pytest.mark.parametrize("how", ["frame", "direct"])
def test_decimal_keys_match_their_rows(tmp_path: Path, how: str) -> None:
    """Decimal('1.10') != 1.1: reading a decimal split column as float left the
    slices of inexact keys with no rows (error rows, n_obs 0)."""
    from decimal import Decimal

    df = make_genes(n_genes=4, n_subjects=8)
    keys = [Decimal("1.10"), Decimal("3.30"), Decimal("2.00"), None]
    t = _with_key(df, keys, pa.decimal128(3, 2))
    data: Any = t.to_pandas() if how == "frame" else _files(tmp_path, [t])
    fits = _stored_fits(data, tmp_path, how)
    assert (fits["status"] == "ok").all() and len(fits) == 4
    assert (fits["n_obs"] == len(df) // 4).all()
    assert sorted(map(str, fits["k"].dropna())) == ["1.10", "2.00", "3.30"]


def test_int_keys_of_two_widths_are_stored_in_the_wider(tmp_path: Path) -> None:
    """int32 in the first file, int64 beyond int32 in the second: the store's key column
    took the first file's type and the second task's commit crashed."""
    df = make_genes(n_genes=4, n_subjects=8)
    a = df[df["gene"].isin(["g000", "g001"])]
    b = df[~df["gene"].isin(["g000", "g001"])]
    data = _files(tmp_path, [_with_key(a, [1, 2], pa.int32()),
                             _with_key(b, [2**40 + 1, 2**40 + 2], pa.int64())])
    src, _ = prepare(data, [RI], "k")
    assert src.schema.field("k").type == pa.int64()
    fits = _stored_fits(data, tmp_path)
    assert sorted(fits["k"].tolist()) == [1, 2, 2**40 + 1, 2**40 + 2]
    assert (fits["status"] == "ok").all()


@pytest.mark.parametrize(("first", "second", "values"), [
    (pa.uint64(), pa.int64(), ([2**53 + 1, 2**53 + 2], [2**53 + 3, 2**53 + 4])),
    (pa.dictionary(pa.int32(), pa.string()), pa.int64(), (["0", "1"], [2, 3])),
], ids=["uint64-int64", "dict-text-int64"])
def test_key_types_no_type_holds_exactly_are_refused(tmp_path: Path, first: pa.DataType,
                                                     second: pa.DataType,
                                                     values: tuple[list[Any], list[Any]]
                                                     ) -> None:
    """uint64 beside int64 went through float64 (keys above 2**53 merged, a slice's
    rows never fitted); dictionary text beside ints passed validation and crashed."""
    df = make_genes(n_genes=4, n_subjects=8)
    a = df[df["gene"].isin(["g000", "g001"])]
    b = df[~df["gene"].isin(["g000", "g001"])]
    ta = _with_key(a, values[0], first.value_type if pa.types.is_dictionary(first)
                   else first)
    if pa.types.is_dictionary(first):
        ta = ta.set_column(ta.schema.get_field_index("k"), "k",
                           ta.column("k").dictionary_encode())
    data = _files(tmp_path, [ta, _with_key(b, values[1], second)])
    with pytest.raises(ms.DataError, match=r"column 'k' has type .*rewrite the files"):
        prepare(data, [RI], "k")


def test_not_equal_filters_drop_missing_values_in_frames_as_in_parquet(tmp_path: Path
                                                                       ) -> None:
    df = make_genes(n_genes=4, n_subjects=8)
    df["site"] = df["gene"].map({"g000": "a", "g001": None, "g002": "b", "g003": "c"})
    path = str(tmp_path / "d.parquet")
    df.to_parquet(path, index=False)
    for flt in ([["site", "!=", "a"]], [["site", "not in", ["a"]]], [["site", "<", "c"]]):
        frame = prepare(df, [RI], "gene", flt)[1]
        parquet = prepare(path, [RI], "gene", flt)[1]
        assert [s.key for s in frame.slices] == [s.key for s in parquet.slices], flt
    assert [s.key for s in prepare(df, [RI], "gene", [["site", "!=", "a"]])[1].slices] == \
        [("g002",), ("g003",)]


def test_a_hive_value_beyond_int64_is_kept_as_text(tmp_path: Path) -> None:
    df = make_genes(n_genes=2, n_subjects=8)
    for i, h in enumerate(["1", str(2**64 - 1)]):
        d = tmp_path / "tree" / f"h={h}"
        d.mkdir(parents=True)
        df[df["gene"] == f"g{i:03d}"].to_parquet(d / "part-0.parquet", index=False)
    src, plan = prepare(str(tmp_path / "tree"), [RI], "h")
    assert src.schema.field("h").type == pa.string()
    assert [s.key for s in plan.slices] == [("1",), (str(2**64 - 1),)]


@pytest.mark.parametrize(("folders", "typ", "keys"), [
    (["007", "7"], pa.string(), [("007",), ("7",)]),  # two sites, not one of n=2x
    (["0042", "17"], pa.string(), [("0042",), ("17",)]),  # zero-padded codes keep zeros
    (["1.10", "1.1"], pa.string(), [("1.1",), ("1.10",)]),
    (["+7", "8"], pa.string(), [("+7",), ("8",)]),
    (["inf", "1"], pa.string(), [("1",), ("inf",)]),
    (["7", "-3"], pa.int64(), [(-3,), (7,)]),
    (["1", "0.5"], pa.float64(), [(0.5,), (1.0,)]),
])
def test_hive_values_read_as_numbers_only_when_nothing_is_lost(
        tmp_path: Path, folders: list[str], typ: pa.DataType, keys: list[tuple[object]]) -> None:
    df = make_genes(n_genes=2, n_subjects=8)
    for i, h in enumerate(folders):
        d = tmp_path / "tree" / f"site={h}"
        d.mkdir(parents=True)
        df[df["gene"] == f"g{i:03d}"].to_parquet(d / "part-0.parquet", index=False)
    src, plan = prepare(str(tmp_path / "tree"), [RI], "site")
    assert src.schema.field("site").type == typ
    assert sorted(s.key for s in plan.slices) == keys
    assert all(s.rows == len(df) // 2 for s in plan.slices)


def test_a_glob_skips_hidden_and_underscore_entries_and_folders(tmp_path: Path) -> None:
    df = make_genes(n_genes=2, n_subjects=8)
    root = tmp_path / "d"
    (root / "sub" / ".hidden").mkdir(parents=True)
    df.to_parquet(root / "sub" / "part-0.parquet", index=False)
    df.to_parquet(root / "sub" / ".hidden" / "copy.parquet", index=False)  # a stale copy
    (root / "_SUCCESS").write_text("")
    pq.write_metadata(pa.Schema.from_pandas(df, preserve_index=False), root / "_metadata")
    for pattern in (f"{root}/**/*.parquet", f"{root}/**"):
        src, plan = prepare(pattern, [RI], "gene")
        assert src.files == [f"{root}/sub/part-0.parquet"], pattern
        assert not src.bad_files and sum(s.rows for s in plan.slices) == len(df)
    with pytest.raises(ms.DataError, match="no Parquet files under"):  # a folder, markers
        prepare(f"{root}/*", [RI], "gene")


def test_an_all_null_column_or_a_finer_timestamp_in_one_file_reads_with_the_others(
        tmp_path: Path) -> None:
    df = make_genes(n_genes=4, n_subjects=8)
    a = df[df["gene"].isin(["g000", "g001"])]
    b = df[~df["gene"].isin(["g000", "g001"])]
    ta = _with_key(a, [1, 2], pa.int64())
    tb = _with_key(b, [3, 4], pa.int64())
    ta = ta.append_column("w", pa.nulls(ta.num_rows))  # pandas' all-None column
    tb = tb.append_column("w", pa.array(np.ones(tb.num_rows)))
    ta = ta.append_column("t", pa.array(np.zeros(ta.num_rows, dtype="datetime64[us]")))
    tb = tb.append_column("t", pa.array(np.zeros(tb.num_rows, dtype="datetime64[ns]")))
    data = _files(tmp_path, [ta, tb])
    src, plan = prepare(data, [RI], "k")
    assert src.schema.field("w").type == pa.float64()
    assert src.schema.field("t").type == pa.timestamp("ns")
    assert len(plan.slices) == 4
    fits = _stored_fits(data, tmp_path)
    assert (fits["status"] == "ok").all() and len(fits) == 4


# -- the planner's key scan: fast paths held to the general ones -------------------------
def _counted(t: pa.Table) -> collections.Counter[tuple[Any, ...]]:
    return collections.Counter(zip(*t.to_pydict().values(), strict=True))


KEY_TABLES = {
    "int64": pa.table({"k": pa.array(np.random.default_rng(7).integers(-100, 100, 1000))}),
    "int8": pa.table({"k": pa.array(np.random.default_rng(8).integers(-128, 128, 500),
                                    type=pa.int8())}),
    "uint64 beyond int64": pa.table({"k": pa.array([2**64 - 1, 3, 2**63, 3, 2**64 - 1],
                                                   type=pa.uint64())}),
    "one row": pa.table({"k": pa.array([5], type=pa.int32())}),
    "empty": pa.table({"k": pa.array([], type=pa.int64())}),
    "missing": pa.table({"k": pa.array([1, None, 1, None, 3])}),
    "text": pa.table({"k": pa.array(["b", "a", "b"])}),
    "two columns": pa.table({"a": pa.array([1, 1, 2, 1]), "b": pa.array(["x", "x", "y", "y"])}),
}


@pytest.mark.parametrize("name", list(KEY_TABLES))
def test_key_counts_count_each_key_once(name: str) -> None:
    """Integer keys are counted by a sort, other keys by Arrow: either way one row per
    distinct key (missing included) with its row count, and the key's type kept."""
    from mixedscale.source import _key_counts

    t = KEY_TABLES[name]
    got = _key_counts(t)
    assert got.schema == pa.schema([*t.schema, pa.field("_rows", pa.int64())])
    counts = {k[:-1]: k[-1] for k in _counted(got)}
    assert len(counts) == got.num_rows  # no key twice
    assert counts == dict(_counted(t))


KEY_COLUMNS = {
    "int": pd.Series(np.random.default_rng(1).integers(-5, 5, 50)),
    "Int64 NA": pd.Series(pd.array([3, None, 1, 3, None, -2], dtype="Int64")),
    "float NaN": pd.Series([1.5, np.nan, -1.0, 1.5, np.nan, 0.0, -0.0]),
    "str NA": pd.Series(["b", None, "a", None, "B", "é"], dtype="str"),
    "bool": pd.Series([True, False, True]),
    "boolean NA": pd.Series(pd.array([True, None, False, None], dtype="boolean")),
    "datetime NaT": pd.Series(pd.to_datetime(["2020-01-02", None, "2019-01-01", None])),
    "categorical NA": pd.Series(pd.Categorical(["z", None, "a", "z"],
                                               categories=["z", "m", "a"])),
    "uint64 beyond int64": pd.Series(np.array([2**63 + 5, 1, 2**63 + 5], dtype=np.uint64)),
    "object": pd.Series(["b", None, "a", "b"], dtype=object),
}


@pytest.mark.parametrize("name", list(KEY_COLUMNS))
def test_single_key_codes_are_the_group_bys(name: str) -> None:
    """One split column is coded by pandas' factorize; the codes and the key of each
    must be what the group-by (the path for several columns) gives."""
    from mixedscale.plan import _key_codes

    keys = pd.DataFrame({"k": KEY_COLUMNS[name], "_rows": 1})
    codes, uniq = _key_codes(keys, ["k"])
    grouped = keys.groupby(["k"], sort=True, dropna=False, observed=True)
    np.testing.assert_array_equal(codes, grouped.ngroup().to_numpy())
    first = pd.Series(np.arange(len(keys))).groupby(codes).first().to_numpy()
    want = keys.loc[:, ["k"]].iloc[first].reset_index(drop=True)
    assert uniq["k"].dtype == want["k"].dtype
    assert [None if pd.isna(v) else v for v in uniq["k"]] == \
        [None if pd.isna(v) else v for v in want["k"]]


def test_categorical_keys_of_differing_files_scan_as_text(tmp_path: Path) -> None:
    """Files whose categorical key holds different categories: the key scan gives text
    (pandas' concat of the row groups' categoricals), so slices are in text order."""
    from mixedscale.source import open_source, read_split_keys

    for i, cats in enumerate([["b", "a"], ["c", "a"]]):
        pd.DataFrame({"k": pd.Categorical(cats * 5, categories=cats), "y": np.arange(10.0),
                      "g": np.repeat([0, 1], 5)}).to_parquet(tmp_path / f"p{i}.parquet",
                                                            index=False)
    keys, _ = read_split_keys(open_source(str(tmp_path)), ["k"])
    assert not isinstance(keys["k"].dtype, pd.CategoricalDtype)
    assert sorted(zip(keys["k"], keys["_rows"], strict=True)) == \
        [("a", 5), ("a", 5), ("b", 5), ("c", 5)]
    _, plan = prepare(str(tmp_path), [ms.ModelSpec("y ~ 1", groups="g")], "k")
    assert [s.key for s in plan.slices] == [("a",), ("b",), ("c",)]
