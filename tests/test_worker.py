"""Worker-side pieces without a cluster: row positions, cached shuffled units, phases."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mixedscale as ms
from mixedscale import worker
from mixedscale.api import prepare
from mixedscale.executor import RunOptions, _Run
from mixedscale.plan import Task, _norm_key
from mixedscale.store import Store
from mixedscale.worker import Loaded, Packed, Positions, partition_to_store, run_task

from .conftest import make_genes

_rng = np.random.default_rng(0)
_N = 3000


def _indices(df: pd.DataFrame, split_by: list[str]) -> dict[tuple[object, ...], np.ndarray]:
    """What the worker used before: groupby().indices with the plan's key normalization."""
    index = df.groupby(split_by, sort=False, dropna=False, observed=True).indices
    return {_norm_key(k if isinstance(k, tuple) else (k,)): np.asarray(v)
            for k, v in index.items()}


@pytest.mark.parametrize(("df", "split_by"), [
    (pd.DataFrame({"a": _rng.integers(0, 50, _N)}), ["a"]),
    (pd.DataFrame({"a": _rng.choice(["x", "é", None], _N)}), ["a"]),
    (pd.DataFrame({"a": pd.array(_rng.choice(["x", "y"], _N), dtype="string[pyarrow]")}),
     ["a"]),
    (pd.DataFrame({"a": np.where(_rng.random(_N) < 0.1, np.nan,
                                 _rng.integers(0, 5, _N).astype(float)),
                   "b": _rng.integers(0, 3, _N)}), ["a", "b"]),
    (pd.DataFrame({"a": pd.Categorical(_rng.choice(["p", "q"], _N)),
                   "b": _rng.choice([True, False], _N)}), ["a", "b"]),
    (pd.DataFrame({"d": pd.to_datetime(_rng.integers(0, 4, _N), unit="D")}), ["d"]),
    (pd.DataFrame({"a": np.arange(5)}), []),
    (pd.DataFrame({"a": np.array([2**63 + 7, 1, 2**64 - 1] * 40, dtype=np.uint64)}), ["a"]),
    (pd.DataFrame({"a": pd.array(_rng.integers(-9, 9, _N), dtype="Int64")}), ["a"]),
    (pd.DataFrame({"a": pd.array([1, None, 2**62 + 1] * 9, dtype="Int64")}), ["a"]),
    (pd.DataFrame({"a": pd.Series(_rng.choice(["x", "é", "10"], _N), dtype="str")}), ["a"]),
])
def test_positions_match_groupby_indices(df: pd.DataFrame, split_by: list[str]) -> None:
    pos = Positions(df, split_by)
    want = _indices(df, split_by) if split_by else {(): np.arange(len(df))}
    assert set(pos.index) == set(want) and len(pos) == len(want)
    for k, v in want.items():
        np.testing.assert_array_equal(pos.get(k), v)
    assert pos.get(("no such key",)) is None
    assert len(pos.get(("no such key",), np.zeros(0, dtype=np.intp))) == 0


_SORTED_COLUMNS = [
    np.sort(_rng.integers(-50, 50, _N)),
    np.sort(np.array([2**63 + 7, 1, 2**64 - 1, 2**63] * 40, dtype=np.uint64)),
    # prefixes, the empty string, accents and a character beyond the BMP: code point order
    pd.Series(np.sort(_rng.choice(["", "a", "ab", "b", "B", "é", "e\u0301", "z", "\U0001f600",
                                   "10", "9"], _N).astype(object)), dtype="str"),
    pd.Series(["only"] * 7, dtype="str"),
    np.array([3, 3]),
    # as a unit of several row groups reads: one Arrow chunk per group, runs across them
    pa.table({"a": pa.chunked_array([pa.array(c, pa.large_string()) for c in
                                     (["a", "a", "b"], ["b", "c"], ["d"], ["d", "e"])])}
             ).to_pandas()["a"],
]


@pytest.mark.parametrize("column", _SORTED_COLUMNS)
def test_rows_in_key_order_get_the_group_bys_positions_without_it(column: object) -> None:
    df = pd.DataFrame({"a": column})
    assert worker._sorted_runs(df["a"]) is not None  # the fast path is taken
    pos = Positions(df, ["a"])
    codes = df.groupby(["a"], sort=True, dropna=False, observed=True).ngroup().to_numpy()
    np.testing.assert_array_equal(pos.order, np.arange(len(df)))
    np.testing.assert_array_equal(pos.starts, np.r_[0, np.cumsum(np.bincount(codes))])
    want = _indices(df, ["a"])
    assert set(pos.index) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(pos.get(k), v)
    keys = list(want)[::-1]
    np.testing.assert_array_equal(pos.codes(keys), [codes[want[k][0]] for k in keys])


@pytest.mark.parametrize("column", [
    np.array([1, 2, 2, 1]),  # a key in two runs
    np.array([3, 2, 1]),  # descending
    np.array([5, 2**63, 1], dtype=np.uint64),
    # out of order only between the rows the first look samples: the full check finds it
    np.r_[np.arange(5), 6, 5, np.arange(7, 1000)],
    pd.Series([f"k{i:04d}" for i in np.r_[np.arange(5), 6, 5, np.arange(7, 1000)]],
              dtype="str"),
    pd.Series(["b", "a"], dtype="str"),
    pd.Series(["a", None, "b"], dtype="str"),  # missing: the group-by's order for those
    pd.Series(["a", "b"], dtype=object),  # not Arrow-backed
    pd.array([1, 2], dtype="Int64"),
    np.array([0.5, 1.5]),
    np.array([False, True]),
    np.array([7]),
])
def test_other_columns_take_the_group_by(column: object) -> None:
    df = pd.DataFrame({"a": column})
    assert worker._sorted_runs(df["a"]) is None
    pos = Positions(df, ["a"])
    want = _indices(df, ["a"])
    for k, v in want.items():
        np.testing.assert_array_equal(np.sort(df.index.to_numpy()[pos.get(k)]), v)


@pytest.mark.parametrize("column", [
    _rng.integers(-50, 50, _N),
    np.array([2**63 + 7, 1, 2**64 - 1] * 40, dtype=np.uint64),
    pd.Series(_rng.choice(["x", "é", "10", ""], _N), dtype="str"),
])
def test_vectorized_key_lookup_is_the_dicts(column: object) -> None:
    """One int or text column is looked up by a pandas Index: every lookup must give
    what the dict of normalized keys gives, for keys present, absent, missing or of
    another type."""
    df = pd.DataFrame({"a": column})
    fast, slow = Positions(df, ["a"]), Positions(df, ["a"])
    slow._vindex = None
    assert fast._vindex is not None
    present = list(slow.index)
    keys_lists = [present, present[::-3], [*present[:5], ("nope",), (None,), (10**30,)],
                  [(1.0,), (True,), ("1",), (-1,)], []]
    for keys in keys_lists:
        np.testing.assert_array_equal(fast.codes(keys), slow.codes(keys))
        for a, b in zip(fast.take(keys), slow.take(keys), strict=True):
            np.testing.assert_array_equal(a, b)
        assert fast.covered_by(keys) == slow.covered_by(keys) == (set(present) <= set(keys))
        fresh = Positions(df, ["a"])  # no dict built yet: gets use the Index
        for k in keys:
            a, b = fresh.get(k), slow.get(k)
            assert (a is None and b is None) or np.array_equal(a, b)


def test_shuffle_key_maps_travel_as_arrays_only_for_int_keys() -> None:
    units = [0, 1]
    assert isinstance(worker.key_units([(5,), (-2,)], units)[0], np.ndarray)
    for keys in ([(1,), (2**63,)], [(True,), (False,)], [("a",), ("b",)], [(1, "a"), (2, "b")],
                 [(1,), (None,)]):
        got, unit_of = worker.key_units(keys, units)
        assert got == keys and unit_of.tolist() == units


def test_a_shuffle_step_buckets_the_same_rows_from_either_key_map() -> None:
    df = make_genes(n_genes=9, shuffle=True)
    df["site"] = df["gene"].str[1:].astype(int) * 10**12
    src, plan = prepare(df, [ms.ModelSpec("y ~ time", groups="subject")], "site")
    keys = [s.key for s in plan.slices]
    units = [i % 3 for i in range(len(keys))]
    as_array, as_tuples = worker.key_units(keys, units), (keys, np.asarray(units))
    assert isinstance(as_array[0], np.ndarray)
    a = worker.partition(src, src.row_groups, plan.columns, plan.split_by, Packed(as_array))
    b = worker.partition(src, src.row_groups, plan.columns, plan.split_by, Packed(as_tuples))
    assert isinstance(a, dict) and isinstance(b, dict) and sorted(a) == sorted(b) == [0, 1, 2]
    for u in a:
        pd.testing.assert_frame_equal(a[u].frame, b[u].frame)
        assert set(a[u].frame["site"]) == {keys[i][0] for i in range(len(keys)) if i % 3 == u}


def test_a_unit_loads_the_same_rows_from_either_key_list(tmp_path: Path) -> None:
    """A unit's int keys travel as an array (``key_column``): the same rows as from
    key tuples, where the rows hold only the unit's keys and where they hold others."""
    df = make_genes(n_genes=9, shuffle=True)
    df["site"] = df["gene"].str[1:].astype(int) * 7
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False, row_group_size=100)
    src, plan = prepare(str(f), [ms.ModelSpec("y ~ time", groups="subject")], "site")
    keys = [s.key for s in plan.slices]
    for wanted in (keys, keys[2:5]):  # all the rows hold; a few of them
        as_array = worker.key_column(wanted)
        assert isinstance(as_array, np.ndarray) and as_array.tolist() == [k[0] for k in wanted]
        a = worker.load_unit(src, src.row_groups, plan.columns, plan.split_by,
                             Packed(as_array))
        b = worker.load_unit(src, src.row_groups, plan.columns, plan.split_by, Packed(wanted))
        assert isinstance(a, Loaded) and isinstance(b, Loaded)
        (fa, pa_), (fb, pb) = a.grouped(["site"]), b.grouped(["site"])
        pd.testing.assert_frame_equal(fa, fb)
        assert set(fa["site"]) == {k[0] for k in wanted}
        for k in wanted:
            np.testing.assert_array_equal(pa_.get(k), pb.get(k))


@pytest.mark.parametrize("keys", [
    [("a",), ("b",)], [(True,), (False,)], [(1,), (None,)], [(1,), (2.0,)], [(1,), (2**64,)],
    [(1, "x"), (2, "y")], [(1,), (2, 3)], [()],
])
def test_keys_other_than_one_int_column_travel_as_tuples(keys: list[tuple[Any, ...]]) -> None:
    assert worker.key_column(keys) == keys


def test_keys_of_one_int_column_travel_as_int64() -> None:
    for keys in ([(7,), (-3,), (2**63 - 1,)], []):
        got = worker.key_column(keys)
        assert isinstance(got, np.ndarray) and got.dtype == np.int64
        assert got.tolist() == [k[0] for k in keys]


@pytest.mark.parametrize("keys", [[(7,), (-3,), (2**40,)], [("a",), ("b",), (None,)],
                                  [(1, "x"), (2, None), (3, "z")], [(True,), (False,), (True,)]])
def test_slice_keys_map_slices_to_keys_as_a_dict_would(keys: list[tuple[Any, ...]]) -> None:
    slices = [2, 5, 9]
    sk = worker.SliceKeys(slices, keys)
    as_dict = dict(zip(slices, keys, strict=True))
    assert dict(sk) == as_dict and list(sk) == slices and len(sk) == 3
    assert isinstance(sk.by_slice, np.ndarray) == (keys[0] == (7,))
    for s in slices:
        assert sk[s] == as_dict[s] and type(sk[s][0]) is type(as_dict[s][0])
    for missing in (0, 3, 10):
        assert missing not in sk and sk.get(missing) is None
        with pytest.raises(KeyError):
            sk[missing]
    col = sk.column(np.array([9, 2, 2], dtype=np.int32))
    got = [(int(v),) for v in col] if isinstance(col, np.ndarray) else list(col)
    assert got == [as_dict[9], as_dict[2], as_dict[2]]
    with pytest.raises(KeyError):
        sk.column(np.array([2, 4]))
    back = pickle.loads(pickle.dumps(sk))
    assert dict(back) == as_dict
    with pytest.raises(ValueError, match="ascend"):
        worker.SliceKeys([5, 2], keys[:2])


def test_a_transferred_unit_leaves_its_positions_behind() -> None:
    loaded = Loaded(make_genes(n_genes=30), 10)
    loaded.grouped(["gene"])
    back = pickle.loads(pickle.dumps(loaded))
    assert back._positions is None and back.token == loaded.token
    np.testing.assert_array_equal(back.grouped(["gene"])[1].get(("g003",)),
                                  loaded.grouped(["gene"])[1].get(("g003",)))


@pytest.mark.parametrize("top", [0, 1, 300, 2**16 - 1, 2**16, 70_000, 2**32 - 1, 2**40])
def test_stable_order_is_numpys_stable_argsort(top: int) -> None:
    rng = np.random.default_rng(top % 1000)
    codes = rng.integers(0, top + 1, 5_000, dtype=np.int64)
    codes[:3] = top  # the largest code, repeated: ties keep their order
    np.testing.assert_array_equal(worker.stable_order(codes),
                                  np.argsort(codes, kind="stable"))


def test_shuffle_steps_are_balanced_and_bounded() -> None:
    from types import SimpleNamespace

    from mixedscale.executor import _PARTITION_BYTES, _shuffle_steps

    def steps(sizes: list[int], workers: int) -> list[list[int]]:
        rgs = [SimpleNamespace(nbytes=b, i=i) for i, b in enumerate(sizes)]
        return [[rg.i for rg in s] for s in _shuffle_steps(rgs, workers)]  # type: ignore[arg-type]

    assert steps([10] * 20, 2) == [list(range(10)), list(range(10, 20))]  # one per worker
    assert steps([10] * 3, 4) == [[0], [1], [2]]  # never more steps than row groups
    assert steps([], 2) == []
    big = steps([_PARTITION_BYTES // 2] * 10, 2)
    assert len(big) % 2 == 0 and sum(map(len, big)) == 10
    assert all(len(s) * _PARTITION_BYTES // 2 <= _PARTITION_BYTES for s in big)


def test_unsorted_rows_are_regrouped_once_by_key() -> None:
    df = make_genes(n_genes=6, shuffle=True)
    loaded = Loaded(df, 0)
    frame, pos = loaded.grouped(["gene"])
    assert loaded.grouped(["gene"])[0] is frame  # regrouped once, then kept
    keys = [("g001",), ("g002",), ("g003",)]
    rows, sizes = pos.take(keys)  # consecutive keys: one run of rows (a view)
    assert (np.diff(rows) == 1).all() and sizes.tolist() == [48, 48, 48]
    for (g,) in keys:
        got = frame.iloc[pos.get((g,))]
        want = df[df["gene"] == g]
        assert (got["gene"] == g).all()
        pd.testing.assert_frame_equal(got.sort_index(), want.sort_index())


def test_a_shuffled_unit_is_read_once_per_worker_process(tmp_path: Path) -> None:
    df = make_genes(n_genes=12, shuffle=True)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False, row_group_size=100)
    src, plan = prepare(str(f), [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    store = Store(str(tmp_path / "store"))
    store.init()
    key_unit = worker.key_units([s.key for s in plan.slices],
                                [i % 2 for i in range(len(plan.slices))])  # two units
    parts = [partition_to_store(src, src.row_groups, plan.columns, plan.split_by,
                                Packed(key_unit), store, "shuffle-test", 0)]
    worker.forget_shuffled()
    first = worker._merge({"unit": 0, "scratch": parts}, store)
    assert worker._merge({"unit": 0, "scratch": parts}, store) is first
    other = worker._merge({"unit": 1, "scratch": parts}, store)
    assert other is not first and len(worker._SHUFFLED) == 1  # one unit held at a time
    assert set(first.frame["gene"]) | set(other.frame["gene"]) == set(df["gene"])
    worker.forget_shuffled()
    assert not worker._SHUFFLED


def test_task_outcomes_carry_their_phase_times() -> None:
    df = make_genes(n_genes=10)
    src, plan = prepare(df, [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    run = _Run(plan, src, None, None, RunOptions())
    out = run_task(run.payload(plan.tasks[0]), Loaded(df, 0), None)
    assert set(out.phases) == {"data", "fits", "tables", "write"}
    assert sum(out.phases.values()) == pytest.approx(out.wall_seconds, rel=0.05, abs=1e-3)
    assert out.phases["fits"] >= 0.9 * out.fit_seconds


def test_positions_take_concatenates_rows_in_key_order() -> None:
    df = make_genes(n_genes=30, shuffle=True)
    pos = Positions(df, ["gene"])
    keys = [("g007",), ("nope",), ("g001",), ("g029",), ("g007",)]
    rows, sizes = pos.take(keys)
    want = [pos.get(k, np.zeros(0, dtype=np.intp)) for k in keys]
    np.testing.assert_array_equal(rows, np.concatenate(want))
    assert sizes.tolist() == [len(w) for w in want] and sizes[1] == 0
    empty_rows, empty_sizes = pos.take([])
    assert len(empty_rows) == 0 and len(empty_sizes) == 0


def test_per_fit_rows_become_the_same_tables_as_one_table_per_fit() -> None:
    """build_tables gathers tidy rows column-wise; the result equals converting each
    fit's frames on their own (the former per-fit path), NaN stored as null."""
    import pyarrow as pa

    from mixedscale.store import table_schema
    from mixedscale.worker import _error_result, build_tables

    df = make_genes(n_genes=6, n_subjects=8)
    specs = [ms.ModelSpec("y ~ time", groups="subject", engine="statsmodels"),
             ms.ModelSpec("y ~ time", groups="subject", re_formula="~time")]
    src, plan = prepare(df, specs, "gene")
    run = _Run(plan, src, None, None, RunOptions())
    task = Task("all", 0, tuple(it for t in plan.tasks for it in t.items), 0.0)
    payload = run.payload(task)
    results = [ms.fit(df[df["gene"] == plan.slices[it.slice].key[0]], specs[it.spec])
               for it in task.items]
    results[1].params.loc[0, "std_error"] = np.nan  # a missing value survives as null
    results[2] = _error_result(specs[0], "DataError", "boom")  # no tidy rows at all
    got = build_tables(payload, task.items, results)
    kf = payload.key_fields
    for name in ("params", "variance"):
        parts = []
        for it, r in zip(task.items, results, strict=True):
            frame = getattr(r, name)
            if len(frame):
                framed = frame.assign(fit_id=it.fit_id, gene=plan.slices[it.slice].key[0],
                                      spec_id=r.fit["spec_id"])
                schema = table_schema(name, kf)
                parts.append(pa.table({f.name: pa.array(
                    framed[f.name].tolist() if f.name in framed else [None] * len(framed),
                    type=f.type, from_pandas=True) for f in schema}))
        assert got[name].equals(pa.concat_tables(parts)), name
    assert got["params"].column("std_error").null_count >= 1


def test_a_run_freezes_the_heap_it_starts_with_and_thaws_it_after() -> None:
    import gc

    from mixedscale.executor import long_lived_frozen

    # (Frozen objects still leave the permanent generation when freed: counts may drop.)
    assert gc.get_freeze_count() == 0
    with long_lived_frozen():
        assert gc.get_freeze_count() > 0
        with long_lived_frozen():  # a nested run shares the freeze
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the inner run did not thaw the outer one's
    assert gc.get_freeze_count() == 0
    # A host application's own freeze is left as it was.
    gc.freeze()
    try:
        with long_lived_frozen():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_worker_heap_is_frozen_only_inside_a_dask_worker() -> None:
    import gc

    before = gc.get_freeze_count()
    test_task_outcomes_carry_their_phase_times()  # run_task outside any worker
    assert gc.get_freeze_count() == before == 0


def test_a_packed_payload_is_only_unpickled_where_it_runs(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from mixedscale import plan as plan_mod
    from mixedscale.worker import Packed

    df = make_genes(n_genes=6)
    src, plan = prepare(df, [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    payload = _Run(plan, src, None, None, RunOptions()).payload(plan.tasks[0])
    relayed = pickle.dumps(Packed(payload))  # what the scheduler receives and forwards

    def boom(*_: object) -> None:
        raise AssertionError("a relay unpickled the task")

    monkeypatch.setattr(plan_mod, "_task", boom)
    packed = pickle.loads(relayed)  # a relay: no task is rebuilt
    with pytest.raises(AssertionError, match="unpickled the task"):
        packed.unpack()
    monkeypatch.undo()
    assert pickle.loads(relayed).unpack() == payload


@pytest.mark.parametrize("engine", ["fast", "statsmodels"])
def test_an_engine_override_keeps_the_specs_own_spec_id(engine: str) -> None:
    """The override fits a copy of each spec (engine is part of a spec's id); the rows
    must carry the id of the spec the user made, or they join to nothing of theirs."""
    df = make_genes(n_genes=6)
    spec = ms.ModelSpec("y ~ time", groups="subject", name="ri")
    src, plan = prepare(df, [spec], "gene", engine=engine)
    run = _Run(plan, src, None, None, RunOptions(engine=engine))
    tables = [run_task(run.payload(t), Loaded(src.read(plan.columns)[0], 0), None).tables
              for t in plan.tasks]
    fits = pd.concat([t["fits"].to_pandas() for t in tables if t])
    assert set(fits["engine"]) == {engine}  # fitted by the override...
    for name in ("fits", "params", "variance"):  # ...filed under the user's spec
        ids = set().union(*(set(t[name].column("spec_id").to_pylist()) for t in tables if t))
        assert ids == {spec.spec_id}, name


class _Submits:
    """A client that records what it is asked to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, str]] = []

    def submit(self, fn: object, *args: object, **kw: object) -> object:
        self.calls.append((fn, str(kw.get("key", ""))))
        return object()


def test_only_the_last_task_of_a_unit_reads_it_itself(tmp_path: Path) -> None:
    """A unit one task needs is read inside that task; once it has more (a task split
    after a worker loss), they share one load task. The read keeps the unit's rows."""
    path = tmp_path / "d.parquet"
    make_genes(n_genes=6).to_parquet(path, index=False)
    src, plan = prepare(str(path), [ms.ModelSpec("y ~ time", groups="subject")], "gene")
    (task,) = plan.tasks
    client = _Submits()
    run = _Run(plan, src, None, client, RunOptions())
    run.expect([task])
    data = run.unit_data(task.unit)
    assert run.read_in_task(task.unit)  # so execute() sends nothing for it ahead
    assert isinstance(data, Packed) and isinstance(data.unpack(), worker.UnitRead)
    assert client.calls == []
    got = run_task(run.payload(task), pickle.loads(pickle.dumps(data)), None)
    want = run_task(run.payload(task), worker.load_unit(
        src, src.row_groups, plan.columns, plan.split_by,
        Packed([s.key for s in plan.slices])), None)
    assert got.tables is not None and want.tables is not None
    assert got.n_fits == 6 and got.by_status == want.by_status == {"ok": 6}
    assert got.tables["fits"].drop_columns(["fit_seconds", "attempts"]).equals(
        want.tables["fits"].drop_columns(["fit_seconds", "attempts"]))
    run.expect([task.single(it) for it in task.items])
    assert not run.read_in_task(task.unit)
    shared = run.unit_data(task.unit)
    assert not isinstance(shared, Packed) and run.unit_data(task.unit) is shared
    assert [fn for fn, _ in client.calls] == [worker.load_unit]


def test_the_memory_monitor_looks_again_before_fast_growth_could_pass_its_mark() -> None:
    """Far from its mark it wakes once a second, not every 50 ms (each wake takes the
    GIL from the fit); nearer, soon enough for memory growing at the assumed rate."""
    rate = worker._GROWTH_BYTES_PER_S
    assert worker.next_poll(12 * 2**30) == worker._POLL_MAX_S == 1.0
    assert worker.next_poll(0.0) == worker.next_poll(-1.0) == worker._POLL_MIN_S
    mid = 0.2 * rate
    assert worker.next_poll(mid) == pytest.approx(0.2)
    # The fault suite's hog adds 16 MiB (filled), then sleeps 2 ms: measured at
    # 0.9-2.6 GiB/s, i.e. 6 ms or more per step, so below 16 MiB per 5 ms.
    assert rate >= 16 * 2**20 / 0.005


def test_a_call_with_a_smaller_budget_after_a_larger_one_still_times_out() -> None:
    """The watcher sleeps toward the running call's deadline, never past 1/20 of the
    smallest budget: a later call with a smaller budget is still caught."""
    import time

    def fn(i: int) -> str:
        time.sleep((0.3, 3.0, 0.0)[i])  # the second one far past its 0.2 s budget
        return "done"

    results, n = worker._run_with_timeout(3, fn, [60.0, 0.2, 60.0], lambda i: "timeout")
    assert results == ["done", "timeout", "done"] and n == 1
    results, n = worker._run_with_timeout(2, fn, None, lambda i: "timeout")
    assert results == ["done", "done"] and n == 0


def test_tables_are_cast_to_the_store_schema_only_where_they_differ() -> None:
    schema = pa.schema([("fit_id", pa.string()), ("n", pa.int64()), ("x", pa.float64())])
    same = pa.table({"x": [1.5], "fit_id": ["a"], "n": pa.array([2], pa.int64()), "_slice": [0]})
    out = worker._as_schema(same, schema)
    assert out.schema.equals(schema) and out.to_pylist() == [{"fit_id": "a", "n": 2, "x": 1.5}]
    other = pa.table({"n": pa.array([2], pa.int32()), "x": pa.array([None], pa.null()),
                      "fit_id": ["b"]})
    out = worker._as_schema(other, schema)
    assert out.schema.equals(schema) and out.to_pylist() == [{"fit_id": "b", "n": 2, "x": None}]
