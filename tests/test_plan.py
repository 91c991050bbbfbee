"""The planner and the source, tested without fitting anything and without a cluster."""

from __future__ import annotations

import gc
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mixedscale as ms
from mixedscale import plan as plan_mod
from mixedscale.api import prepare
from mixedscale.errors import StoreError
from mixedscale.executor import RunOptions, _Run, by_unit, pending
from mixedscale.plan import Task, spec_cost_ms
from mixedscale.store import Store

from .clusterutil import flip_column
from .conftest import make_genes

RI = ms.ModelSpec("y ~ time", groups="subject", name="ri")
RS = ms.ModelSpec("y ~ time", groups="subject", re_formula="~time", name="rs")


def test_plan_is_deterministic_and_complete(genes_parquet: Path) -> None:
    _, p1 = prepare(str(genes_parquet), [RI, RS], "gene")
    _, p2 = prepare(str(genes_parquet), [RI, RS], "gene")
    assert [t.key for t in p1.tasks] == [t.key for t in p2.tasks]
    assert p1.n_fits == 20 * 2
    ids = p1.fit_ids()
    assert len(ids) == len(set(ids))
    assert {s.key for s in p1.slices} == {(f"g{i:03d}",) for i in range(20)}
    assert all(s.rows == 48 for s in p1.slices)


def test_fit_ids_change_with_data_and_spec(tmp_path: Path) -> None:
    df = make_genes(n_genes=3)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False)
    _, p1 = prepare(str(f), [RI], "gene")
    _, p_spec = prepare(str(f), [RI.replace(reml=False)], "gene")
    assert not set(p1.fit_ids()) & set(p_spec.fit_ids())
    df.loc[0, "y"] += 1.0
    df.to_parquet(f, index=False)
    _, p2 = prepare(str(f), [RI], "gene")
    assert not set(p1.fit_ids()) & set(p2.fit_ids())
    # A renamed spec is the same model: the same fits.
    _, p3 = prepare(str(f), [RI.replace(name="renamed")], "gene")
    assert p3.fit_ids() == p2.fit_ids()


def test_frame_fit_ids_follow_content() -> None:
    df = make_genes(n_genes=3)
    _, p1 = prepare(df, [RI], "gene")
    _, p2 = prepare(df.sample(frac=1.0, random_state=3), [RI], "gene")
    assert p1.fit_ids() == p2.fit_ids()  # row order within a slice does not matter
    df2 = df.copy()
    df2.loc[df2["gene"] == "g001", "y"] += 1
    _, p3 = prepare(df2, [RI], "gene")
    changed = set(p3.fit_ids()) - set(p1.fit_ids())
    assert len(changed) == 1


def test_cost_model_packs_small_and_isolates_big() -> None:
    many = make_genes(n_genes=2000, n_subjects=6, n_times=2)
    _, plan = prepare(many, [RI], "gene")
    assert 1 < len(plan.tasks) < 2000  # packed: neither one task per fit nor one task
    # A job worth less than TASK_MIN_MS of fitting is one task: splitting it would
    # cost more in per-task overhead than it could gain.
    _, plan = prepare(many[many["gene"].isin(many["gene"].unique()[:3])], [RI], "gene")
    assert len(plan.tasks) == 1
    big = make_genes(n_genes=2, n_subjects=20000, n_times=10)
    big["gene"] = ["big" if g == "g000" else "small" for g in big["gene"]]
    big = pd.concat([big[big.gene == "big"], make_genes(n_genes=30)], ignore_index=True)
    _, plan = prepare(big, [RS], "gene")
    assert spec_cost_ms(RS, 200000) > 20 * spec_cost_ms(RS, 48)
    big_tasks = [t for t in plan.tasks if any(plan.slices[i.slice].key == ("big",)
                                              for i in t.items)]
    assert len(big_tasks) == 1 and len(big_tasks[0].items) == 1


def test_multiverse_slice_loaded_once_per_unit() -> None:
    df = make_genes(n_genes=1, n_subjects=40)
    specs = ms.grid(formula="y ~ time", groups="subject", re_formula=["1", "~time"],
                    reml=[True, False], cov_structure=["unstructured", "diagonal"])
    _, plan = prepare(df, specs)
    assert len(plan.units) == 1 and plan.n_fits == 6  # 8 grid points, 6 models
    assert {t.unit for t in plan.tasks} == {0}


def test_schema_errors_name_column_and_suggest(tmp_path: Path) -> None:
    df = make_genes(n_genes=2)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False)
    with pytest.raises(ms.SpecError, match=r"no column 'Time'.*did you mean 'time'"):
        prepare(str(f), [ms.ModelSpec("y ~ Time", groups="subject")], "gene")
    with pytest.raises(ms.SpecError, match=r"no column 'genes'.*'gene'"):
        prepare(str(f), [RI], "genes")
    with pytest.raises(ms.DataError, match="response must be numeric"):
        prepare(str(f), [ms.ModelSpec("gene ~ time", groups="subject")])
    with pytest.raises(ms.SpecError, match="same model"):
        prepare(str(f), [RI, RI.replace(name="again")])


def test_missing_path_and_empty_filter(tmp_path: Path) -> None:
    with pytest.raises(ms.DataError, match="no such file"):
        prepare(str(tmp_path / "nope.parquet"), [RI])
    df = make_genes(n_genes=2)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False)
    with pytest.raises(ms.DataError, match="no rows"):
        prepare(str(f), [RI], "gene", filter=[["time", ">", 100]])
    with pytest.raises(ms.SpecError, match="filter op"):
        prepare(str(f), [RI], "gene", filter=[["time", "~=", 1]])
    _, plan = prepare(str(f), [RI], "gene", filter=[["time", "<", 2]])
    assert all(s.rows == 24 for s in plan.slices)


def test_schema_mismatch_across_files_is_named(tmp_path: Path) -> None:
    df = make_genes(n_genes=2)
    df.iloc[:48].to_parquet(tmp_path / "a.parquet", index=False)
    other = df.iloc[48:].assign(time=df.iloc[48:]["time"].astype(str))
    other.to_parquet(tmp_path / "b.parquet", index=False)
    with pytest.raises(ms.DataError, match=r"column 'time'.*b\.parquet"):
        prepare(str(tmp_path), [RI], "gene")
    (tmp_path / "b.parquet").unlink()
    df.iloc[48:].drop(columns="time").to_parquet(tmp_path / "c.parquet", index=False)
    with pytest.raises(ms.DataError, match=r"'time' is missing from .*c\.parquet"):
        prepare(str(tmp_path), [RI], "gene")


def test_hive_partitions_and_globs(tmp_path: Path) -> None:
    df = make_genes(n_genes=4)
    for g, part in df.groupby("gene"):
        d = tmp_path / "hive" / f"gene={g}"
        d.mkdir(parents=True)
        part.drop(columns="gene").to_parquet(d / "data.parquet", index=False)
    src, plan = prepare(str(tmp_path / "hive"), [RI], "gene")
    assert "gene" in src.partition_cols
    assert sorted(s.key for s in plan.slices) == [(f"g{i:03d}",) for i in range(4)]
    src, plan = prepare(str(tmp_path / "hive" / "*" / "*.parquet"), [RI], "gene")
    assert len(plan.slices) == 4


def test_unsorted_input_reads_one_pass(tmp_path: Path) -> None:
    df = make_genes(n_genes=50, shuffle=True)
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f, row_group_size=200)
    _, plan = prepare(str(f), [RI], "gene")
    assert plan.bytes_planned <= 1.5 * plan.bytes_one_pass
    assert plan.bytes_scan < plan.bytes_one_pass


def test_resume_skips_committed_tasks(tmp_path: Path) -> None:
    df = make_genes(n_genes=30)
    src, plan = prepare(df, [RI, RS], "gene")
    store = Store(str(tmp_path / "store"))
    store.init()
    todo, skipped, _ = pending(plan, store)
    assert len(todo) == len(plan.tasks) and skipped == 0
    _commit(plan, src, store, plan.tasks[:1])
    todo, skipped, parts = pending(plan, store)
    assert skipped == len(plan.tasks[0].items)
    assert plan.tasks[0].key not in {t.key for t in todo}
    assert parts == {plan.tasks[0].key}


def test_run_wide_engine_changes_packing_not_ids() -> None:
    """fit_many(engine="statsmodels") packs for statsmodels' cost (more, smaller tasks)
    while every fit keeps its identity (fit_id), which the store dedupes on."""
    df = make_genes(n_genes=40, n_subjects=10)
    _, auto = prepare(df, [RI, RS], "gene")
    _, slow = prepare(df, [RI, RS], "gene", engine="statsmodels")
    assert sorted(auto.fit_ids()) == sorted(slow.fit_ids())
    assert len(slow.tasks) > len(auto.tasks)


def _reference_fit_id(spec: ms.ModelSpec, key: tuple[object, ...], fingerprint: str) -> str:
    """The fit-id contract, spelled with json.dumps: stores written by earlier versions
    resume only while this holds byte for byte."""
    blob = f"[{json.dumps(spec.spec_id)}, {json.dumps(list(key), default=str)}, " \
           f"{json.dumps(fingerprint)}]"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@pytest.mark.parametrize("keys", [
    {"gene": ["g1", "gène-ü", 'q"uote', "g1"]},
    {"gene": ["g1", "g 2/x~", "", "g1"]},  # plain text: the planner's fast path
    {"gene": ["back\\slash", "tab\tx", "😀", "plain"]},
    {"site": [3, 1, 2, 3]},
    {"site": [-3, 0, 10**15, -3]},
    {"site": [1.5, None, 2.5, 1.5], "arm": ["a", "b", "a", "a"]},
    {"flag": [True, False, True, True]},
])
def test_fit_ids_and_fingerprints_keep_their_formula(tmp_path: Path,
                                                     keys: dict[str, list[object]]) -> None:
    base = make_genes(n_genes=1, n_subjects=8)
    frames = []
    for i in range(4):
        part = base.copy()
        for col, vals in keys.items():
            part[col] = vals[i]
        frames.append(part)
    df = pd.concat(frames, ignore_index=True)
    split = list(keys)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False, row_group_size=len(base))
    src, plan = prepare(str(f), [RI, RS], split, filter=[["time", ">=", 0]])
    flt = json.dumps(src.filter, default=str)
    for s in plan.slices:
        want = hashlib.sha256(json.dumps(
            [[src.row_groups[i].fingerprint for i in s.row_groups], flt],
            default=str, sort_keys=True).encode()).hexdigest()[:16]
        assert s.fingerprint == want
    by_slice = {(it.slice, it.spec): it.fit_id for t in plan.tasks for it in t.items}
    for (si, pi), fid in by_slice.items():
        s = plan.slices[si]
        assert fid == _reference_fit_id(plan.specs[pi], s.key, s.fingerprint)


def test_fingerprints_of_slices_over_many_row_groups_keep_their_formula(
        tmp_path: Path) -> None:
    # Rows shuffled over 7 row groups: slices read different sets of them, several
    # slices share a set, and the sets are hashed once each (plan._set_fingerprints).
    df = make_genes(n_genes=40, n_subjects=3).sample(frac=1.0, random_state=3)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False, row_group_size=-(-len(df) // 7))
    src, plan = prepare(str(f), [RI], "gene")
    flt = json.dumps(src.filter, default=str)
    sets = [s.row_groups for s in plan.slices]
    assert len(src.row_groups) == 7
    assert 1 < len(set(sets)) < len(sets) and max(map(len, sets)) > 2
    for s in plan.slices:
        want = hashlib.sha256(json.dumps(
            [[src.row_groups[i].fingerprint for i in s.row_groups], flt],
            default=str, sort_keys=True).encode()).hexdigest()[:16]
        assert s.fingerprint == want


def _units_by_loop(slices: list[plan_mod.SliceInfo], rg_bytes: list[int]
                   ) -> list[plan_mod.LoadUnit]:
    """``plan._units``' rule as a plain loop over the slices (by first row group)."""
    order = sorted(range(len(slices)), key=lambda i: (slices[i].row_groups[:1], i))
    soft = min(plan_mod.UNIT_MAX_ROWS,
               -(-sum(s.rows for s in slices) // plan_mod.UNIT_MIN_UNITS))
    units: list[plan_mod.LoadUnit] = []
    cur: list[int] = []
    rgs: set[int] = set()
    for i in [*order, None]:
        s = slices[i] if i is not None else None
        if cur and (s is None or sum(slices[j].rows for j in cur) + s.rows
                    > plan_mod.UNIT_MAX_ROWS or (sum(slices[j].rows for j in cur) >= soft
                                                 and not rgs & set(s.row_groups))):
            units.append(plan_mod.LoadUnit(len(units), tuple(sorted(cur)), tuple(sorted(rgs)),
                                           sum(slices[j].rows for j in cur),
                                           sum(rg_bytes[r] for r in rgs)))
            cur, rgs = [], set()
        if s is not None and i is not None:
            cur.append(i)
            rgs.update(s.row_groups)
    return units


@pytest.mark.parametrize(("max_rows", "min_units"), [(10**6, 2), (60, 2), (100, 3), (30, 1)])
def test_load_units_follow_their_rule(monkeypatch: pytest.MonkeyPatch, max_rows: int,
                                      min_units: int) -> None:
    monkeypatch.setattr(plan_mod, "UNIT_MAX_ROWS", max_rows)
    monkeypatch.setattr(plan_mod, "UNIT_MIN_UNITS", min_units)
    rng = np.random.default_rng(7)
    for trial in range(300):
        n, n_rg = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        if trial % 2:  # sorted-like: a run of one or two row groups per slice
            rgs = [tuple(range(i * n_rg // n, min(n_rg, i * n_rg // n + int(rng.integers(1, 3)))))
                   for i in range(n)]
        else:  # scattered, some slices in no row group
            rgs = [tuple(sorted(rng.choice(n_rg, int(rng.integers(0, min(4, n_rg) + 1)),
                                           replace=False).tolist())) for _ in range(n)]
        slices = [plan_mod.SliceInfo((i,), int(rng.integers(1, 50)), r, "f")
                  for i, r in enumerate(rgs)]
        rg_bytes = rng.integers(1, 1000, n_rg).tolist()
        assert plan_mod._units(slices, rg_bytes) == _units_by_loop(slices, rg_bytes), trial


def test_small_sorted_data_loads_in_units_cut_at_row_groups(tmp_path: Path) -> None:
    df = make_genes(n_genes=40)
    f = tmp_path / "d.parquet"
    df.to_parquet(f, index=False, row_group_size=5 * 48)  # 8 row groups of 5 genes
    _, plan = prepare(str(f), [RI, RS], "gene")
    assert len(plan.units) == plan_mod.UNIT_MIN_UNITS
    seen: set[int] = set()
    for u in plan.units:
        assert not seen & set(u.row_groups)  # no row group read by two units
        seen |= set(u.row_groups)
    assert plan.bytes_planned == plan.bytes_one_pass
    # Not sorted: every slice spans every row group, so one unit (no re-reads).
    shuffled = tmp_path / "s.parquet"
    make_genes(n_genes=40, shuffle=True).to_parquet(shuffled, index=False,
                                                     row_group_size=5 * 48)
    _, plan = prepare(str(shuffled), [RI, RS], "gene")
    assert len(plan.units) == 1 and not plan.shuffle


def test_tasks_shrink_toward_the_end_without_slivers(monkeypatch: pytest.MonkeyPatch) -> None:
    df = make_genes(n_genes=3000, n_subjects=10, n_times=4)
    # Tasks smaller than the default target, so the job has a head of full-size tasks
    # before its tail (by default, one task there).
    monkeypatch.setattr(plan_mod, "TASK_TARGET_MS", 200.0)
    _, plan = prepare(df, [RI, RS], "gene")
    costs = [t.cost_ms for t in plan.tasks]
    n = len(costs)
    assert n >= plan_mod.TASK_MIN_TASKS
    items = [it for t in plan.tasks for it in t.items]
    assert len(items) == len({it.fit_id for it in items}) == plan.n_fits
    # The tail is made of smaller tasks; no task is a sliver of a few fits.
    assert max(costs[-3:]) < 0.5 * max(costs)
    one_fit = max(spec_cost_ms(s, 40) for s in (RI, RS))  # tasks are cut between fits
    assert costs[-4] >= costs[-3] - one_fit and costs[-3] >= costs[-2] - one_fit
    min_tasks = plan_mod.TASK_MIN_TASKS
    floor = min(plan_mod.TASK_MIN_MS, sum(costs) / min_tasks) / 2
    assert min(costs[:-1]) >= floor
    # Before the tail, a unit's tasks are of equal size (within one fit's cost).
    head = [c for c in costs if c > 0.9 * max(costs)]
    assert len(head) >= 4
    assert max(head) - min(head) <= one_fit + 1e-9


def test_the_last_units_each_end_on_small_tasks(tmp_path: Path) -> None:
    """Dask runs a unit's tasks where it was loaded, so the last units run side by side
    on their own workers: each must end on small tasks, not only the plan's last one."""
    f = tmp_path / "d.parquet"
    df = make_genes(n_genes=2000, n_subjects=10, n_times=4)
    df.to_parquet(f, index=False, row_group_size=100 * 40)
    _, plan = prepare(str(f), [RI, RS], "gene")
    assert len(plan.units) == 2
    by_unit: dict[int, list[float]] = {}
    for t in plan.tasks:  # plan order is run order within a unit
        by_unit.setdefault(t.unit, []).append(t.cost_ms)
    assert set(by_unit) == {0, 1}
    for costs in by_unit.values():
        assert len(costs) >= 4
        assert max(costs[-2:]) < 0.5 * max(costs), costs
    # Cut together, not each to its own tail: no more tasks than one shared tail.
    assert abs(len(by_unit[0]) - len(by_unit[1])) <= 2
    _, whole = prepare(df, [RI, RS], "gene")  # in memory: the same fits in one unit
    assert len(whole.units) == 1
    assert len(plan.tasks) <= len(whole.tasks) + 2
    # Listed in the order cut: the two units' tasks alternate, big ones first.
    assert [t.unit for t in plan.tasks[:2]] == [0, 1]


def _shuffled_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    f = tmp_path / "s.parquet"
    make_genes(n_genes=2000, n_subjects=10, n_times=4, shuffle=True).to_parquet(
        f, index=False, row_group_size=4000)
    monkeypatch.setattr(plan_mod, "UNIT_MAX_ROWS", 20000)  # several units, each in all
    src, plan = prepare(str(f), [RI, RS], "gene")
    assert plan.shuffle and len(plan.units) >= 3 and len(plan.tasks) > len(plan.units)
    return src, plan


def test_a_shuffled_plan_ends_its_last_two_units_side_by_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shuffle's units run on their own workers (``_Run.home_units``), as sorted data's
    do: units one after another, but the last two cut together, each ending small."""
    _, plan = _shuffled_plan(tmp_path, monkeypatch)
    units = [t.unit for t in plan.tasks]
    last = sorted(set(units))[-2:]
    head = [u for u in units if u not in last]
    assert head == sorted(head) and units[:len(head)] == head  # earlier units in order
    tail = units[len(head):]
    assert tail[:2] == last and tail != sorted(tail)  # then the last two alternate
    for u in last:
        costs = [t.cost_ms for t in plan.tasks if t.unit == u]
        assert max(costs[-2:]) < 0.5 * max(costs), costs


class _Future:
    def done(self) -> bool:
        return False


class _RecordingClient:
    """Takes submissions without a cluster: records each one's placement."""

    def __init__(self) -> None:
        self.where: list[dict[str, Any]] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> _Future:
        self.where.append({k: kwargs[k] for k in ("workers", "allow_other_workers")
                           if k in kwargs})
        return _Future()


def test_a_shuffled_units_tasks_go_to_one_worker_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spilled shuffle tasks hold no data: without a home per unit, each worker would
    read every unit from scratch (a worker keeps one unit at a time)."""
    src, plan = _shuffled_plan(tmp_path, monkeypatch)
    client = _RecordingClient()
    run = _Run(plan, src, Store(str(tmp_path / "store")), client, RunOptions())
    a, b, c = "tcp://a:1", "tcp://b:1", "tcp://c:1"
    run.spread_over([a, b])
    run.home_units([a, b], list(plan.tasks))
    futures = [run.submit(t) for t in plan.tasks]
    placed: dict[int, set[str]] = {}
    for t, where in zip(plan.tasks, client.where, strict=True):
        assert where["allow_other_workers"] is True  # an idle worker may still steal
        placed.setdefault(t.unit, set()).update(where["workers"])
    assert all(len(ws) == 1 for ws in placed.values()) and len(placed) == len(plan.units)
    unit_ms = {u.index: sum(t.cost_ms for t in plan.tasks if t.unit == u.index)
               for u in plan.units}
    on = {w: sum(ms for u, ms in unit_ms.items() if run.homes[u] == w) for w in (a, b)}
    assert abs(on[a] - on[b]) <= max(unit_ms.values())  # balanced by planned work
    last = sorted(unit_ms)[-2:]
    assert run.homes[last[0]] != run.homes[last[1]]  # the two cut side by side
    # Worker a leaves, c joins: a's pending tasks come back, and its units move to c.
    was_a = {u for u, w in run.homes.items() if w == a}
    gone = run.orphans({b, c})
    assert set(map(id, gone)) == {id(f) for f, t in zip(futures, plan.tasks, strict=True)
                                  if t.unit in was_a}
    assert {u for u, w in run.homes.items() if w == c} == was_a
    run.submit(next(t for t in plan.tasks if t.unit in was_a))
    assert client.where[-1]["workers"] == [c]
    # No worker left at all: no homes, so Dask places the tasks as workers come back.
    assert len(run.orphans(set())) == len(futures) + 1 - len(gone)
    assert run.homes == {}


def test_no_home_workers_where_every_worker_reads_the_data_once_anyway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, plan = _shuffled_plan(tmp_path, monkeypatch)
    store = Store(str(tmp_path / "store"))
    one_unit = [t for t in plan.tasks if t.unit == plan.tasks[0].unit]
    for st, workers, tasks in ((None, ["x", "y"], plan.tasks),  # pieces: placed by data
                               (store, ["x"], plan.tasks),
                               (store, ["x", "y"], one_unit)):
        run = _Run(plan, src, st, _RecordingClient(), RunOptions())
        run.home_units(workers, list(tasks))
        assert run.homes == {}
    # Then a worker takes any task: the units must not alternate (see by_unit).
    order = [t.unit for t in by_unit(list(plan.tasks))]
    assert order == sorted(order) and order != [t.unit for t in plan.tasks]
    last = plan.tasks[-1].unit  # each unit's tasks keep their plan order
    assert [t for t in by_unit(list(plan.tasks)) if t.unit == last] == \
        [t for t in plan.tasks if t.unit == last]


def test_tasks_pickle_column_wise_and_round_trip() -> None:
    df = make_genes(n_genes=200)
    _, plan = prepare(df, [RI, RS], "gene")
    task = max(plan.tasks, key=lambda t: len(t.items))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(task))
        assert back == task and back.items[0].fit_id == task.items[0].fit_id
    single = task.single(task.items[3])
    assert pickle.loads(pickle.dumps(single)) == single
    empty = Task("k", 0, (), 0.0)
    assert pickle.loads(pickle.dumps(empty)) == empty
    # Items are columns that read as FitItems: equal to the tuples they stand for.
    items = task.items
    assert isinstance(items, plan_mod.Items)
    as_tuples = tuple(items)
    assert all(isinstance(it, plan_mod.FitItem) for it in as_tuples)
    assert items == as_tuples and Task(task.key, task.unit, as_tuples, task.cost_ms) == task
    assert items[1:3] == as_tuples[1:3] and items[-1] == as_tuples[-1]
    assert hash(Task(task.key, task.unit, as_tuples, task.cost_ms).columns) == hash(items)
    assert back.columns.fit_ids == items.fit_ids and back.columns.slices.dtype == np.int32


def _commit(plan: plan_mod.Plan, src: object, store: Store, tasks: list[Task],
            timeout: float | None = None) -> None:
    from mixedscale.executor import RunOptions, _Run
    from mixedscale.worker import Loaded, run_task

    run = _Run(plan, src, store, None, RunOptions(timeout=timeout))  # type: ignore[arg-type]
    frame = src.frame  # type: ignore[attr-defined]
    for t in tasks:
        assert run_task(run.payload(t), Loaded(frame, 0), store).committed


def _store(tmp_path: Path) -> tuple[Path, Store]:
    """A new, empty store at tmp_path/store."""
    store = Store(str(tmp_path / "store"))
    store.init()
    return tmp_path / "store", store


def _committed(tmp_path: Path, df: pd.DataFrame, split: str = "gene"
               ) -> tuple[Path, Store, object, plan_mod.Plan]:
    """A store holding every fit of RI on ``df`` split by ``split``."""
    root, store = _store(tmp_path)
    src, plan = prepare(df, [RI], split)
    _commit(plan, src, store, plan.tasks)
    return root, store, src, plan


def test_resume_matches_fits_committed_under_another_packing(tmp_path: Path) -> None:
    """A store written under another packing (an older planner, another cost model, or
    a smaller spec grid) resumes by fit id: nothing committed is fitted again."""
    df = make_genes(n_genes=40, n_subjects=10)
    store = Store(str(tmp_path / "store"))
    store.init()
    # Costed for statsmodels, the old plan has several tasks; half of them committed.
    src, old = prepare(df, [RI], "gene", engine="statsmodels")
    assert len(old.tasks) >= 4
    _commit(old, src, store, old.tasks[: len(old.tasks) // 2])
    done = store.committed_parts()
    committed = {i for ids in store.part_fit_ids(sorted(done)).values()
                 for i in ids.to_pylist()}
    assert 0 < len(committed) < old.n_fits
    # The grid grows by a spec (and the packing follows the default cost model).
    _, new = prepare(df, [RI, RS], "gene")
    assert not {t.key for t in new.tasks} & done
    todo, skipped, parts = pending(new, store)
    left = [it.fit_id for t in todo for it in t.items]
    assert skipped == len(committed)
    assert sorted(left) == sorted(set(new.fit_ids()) - committed)
    assert parts == done
    # Shrunk tasks are named by what they hold, so a later resume finds them.
    for t in todo:
        assert t.key == plan_mod.task_key([it.fit_id for it in t.items])
    _commit(new, src, store, todo)
    todo2, skipped2, parts2 = pending(new, store)
    assert todo2 == [] and skipped2 == new.n_fits
    fits, _, _ = store.run_tables(parts2, new.fit_ids())
    assert sorted(fits["fit_id"]) == sorted(new.fit_ids())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # a torn copy: no footer


@pytest.mark.parametrize("damaged", ["fits", "params", "variance", "old_packing",
                                     "old_packing_params"])
def test_an_unreadable_committed_part_is_set_aside_and_refitted(
        tmp_path: Path, damaged: str, caplog: pytest.LogCaptureFixture) -> None:
    """A committed task with an unreadable part was skipped on every resume (its fits
    part exists) while every reader failed on it. Readers now say how to repair it,
    and a resume moves the task's parts to _corrupt/ and refits its fits: the store
    ends complete, each fit once."""
    df = make_genes(n_genes=40, n_subjects=10)
    root, store = _store(tmp_path)
    src, plan = prepare(df, [RI], "gene", engine="statsmodels")
    assert len(plan.tasks) >= 2
    if damaged.startswith("old_packing"):  # a part this plan matches by fit id, not name
        _, old = prepare(df, [RI], "gene")
        _commit(old, src, store, old.tasks[:1])
        victim = old.tasks[0]
        assert victim.key not in {t.key for t in plan.tasks}
        _commit(plan, src, store, pending(plan, store).todo)
        assert pending(plan, store).todo == []
    else:
        _commit(plan, src, store, plan.tasks)
        victim = plan.tasks[0]
    table = {"old_packing": "fits", "old_packing_params": "params"}.get(damaged, damaged)
    bad = root / table / f"part-{victim.key}.parquet"
    _truncate(bad)

    with pytest.raises(StoreError) as info:
        getattr(store, table)()
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "rerunning the job" in msg, msg

    with caplog.at_level("WARNING", logger="mixedscale.store"):
        todo, skipped, parts = pending(plan, store)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "mixedscale.store"]
    assert str(bad) in warning and "_corrupt" in warning and "\n" not in warning
    left = {it.fit_id for t in todo for it in t.items}
    assert left == {it.fit_id for it in victim.items}
    assert skipped == plan.n_fits - len(left)
    assert victim.key not in (parts or set())
    aside = sorted(p.relative_to(root / "_corrupt").parts[0]
                   for p in (root / "_corrupt").rglob("*.parquet"))
    assert aside == ["fits", "params", "variance"]
    for t in ("fits", "params", "variance"):
        assert not (root / t / f"part-{victim.key}.parquet").exists()

    _commit(plan, src, store, todo)
    todo2, skipped2, parts2 = pending(plan, store)
    assert todo2 == [] and skipped2 == plan.n_fits
    fits, params, variance = store.run_tables(parts2, plan.fit_ids())
    assert sorted(fits["fit_id"]) == sorted(plan.fit_ids())  # each fit once
    every = store.fits()
    assert every["fit_id"].is_unique and set(every["fit_id"]) == set(plan.fit_ids())
    assert set(params["fit_id"]) == set(variance["fit_id"]) == set(plan.fit_ids())


def test_a_set_aside_cut_short_is_finished_by_the_next_resume(tmp_path: Path) -> None:
    """set_aside moves params and variance before fits (the commit marker). Cut short
    after the first move, the task is committed without its params part: the next
    resume must see that as damage and refit, not keep ok fits with no params."""
    df = make_genes(n_genes=12)
    root, store, src, plan = _committed(tmp_path, df)
    victim = plan.tasks[0]
    (root / "_corrupt" / "params").mkdir(parents=True)
    (root / "params" / f"part-{victim.key}.parquet").rename(
        root / "_corrupt" / "params" / f"part-{victim.key}.cut.parquet")
    todo, _, _ = pending(plan, store)
    assert {it.fit_id for t in todo for it in t.items} == {it.fit_id for it in victim.items}
    _commit(plan, src, store, todo)
    assert pending(plan, store).todo == []
    fits, params, _ = store.run_tables(pending(plan, store).parts or set(), plan.fit_ids())
    assert sorted(fits["fit_id"]) == sorted(plan.fit_ids())
    assert set(params["fit_id"]) == set(plan.fit_ids())


def test_retry_errors_refits_the_run_failures_of_earlier_runs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit that timed out is a committed error row, so a plain rerun skips it. With
    retry_errors its task's parts move to _retried/ and the rerun fits them again:
    every fit once in the end, ok; model errors and other jobs' parts stay as they are."""
    from mixedscale.executor import RETRYABLE, retire_errors
    from mixedscale.store import FAULTS_ENV

    df = make_genes(n_genes=12)
    df.loc[df["gene"] == "g011", "y"] = 1.0  # a model error: deterministic, kept
    root, store = _store(tmp_path)
    src, plan = prepare(df, [RI], "gene", engine="statsmodels")
    monkeypatch.setenv(FAULTS_ENV, json.dumps(
        [{"at": "fit", "key": ["g000"], "do": "sleep", "seconds": 1.5}]))
    _commit(plan, src, store, plan.tasks, timeout=0.5)  # g000 times out
    monkeypatch.delenv(FAULTS_ENV)
    before = store.fits()
    timed = set(before.loc[before["error_type"] == "FitTimeout", "gene"])
    assert timed == {"g000"} and (before["status"] == "error").sum() == 2
    assert list(before.loc[before["error_type"] == "FitTimeout", "fit_seconds"]) == [0.5]
    assert pending(plan, store).todo == []  # a plain rerun keeps the error rows

    assert retire_errors(plan, store, RETRYABLE) == 1
    assert sorted(p.parent.name for p in (root / "_retried").rglob("*.parquet")) == \
        ["fits", "params", "variance"]
    (slow,) = [t for t in plan.tasks if not (root / "fits" / f"part-{t.key}.parquet").exists()]
    todo = pending(plan, store).todo
    assert {it.fit_id for t in todo for it in t.items} == {it.fit_id for it in slow.items}
    _commit(plan, src, store, todo)
    after = store.fits()
    assert after["fit_id"].is_unique and set(after["fit_id"]) == set(plan.fit_ids())
    assert list(after.loc[after["status"] != "ok", "gene"]) == ["g011"]  # the model error
    assert retire_errors(plan, store, RETRYABLE) == 0  # nothing left to retry

    # A part that also holds another job's fits is left alone, with a warning.
    _, wider = prepare(df, [RI, RS], "gene", engine="statsmodels")
    g000 = [it for t in wider.tasks for it in t.items
            if wider.slices[it.slice].key == ("g000",)]
    assert {wider.specs[it.spec].name for it in g000} == {"ri", "rs"}
    mixed = Task(key=plan_mod.task_key([it.fit_id for it in g000]), unit=0,
                 items=tuple(g000), cost_ms=1.0)
    store2 = Store(str(tmp_path / "store2"))
    store2.init()
    monkeypatch.setenv(FAULTS_ENV, json.dumps(
        [{"at": "fit", "key": ["g000"], "do": "sleep", "seconds": 1.5}]))
    _commit(wider, src, store2, [mixed], timeout=0.5)
    monkeypatch.delenv(FAULTS_ENV)
    assert set(store2.fits()["error_type"]) == {"FitTimeout"}
    with caplog.at_level("WARNING", logger="mixedscale.executor"):
        assert retire_errors(plan, store2, RETRYABLE) == 0
    assert any("holds fits of other jobs" in r.getMessage() for r in caplog.records)
    assert len(store2.fits()) == 2 and not (tmp_path / "store2" / "_retried").exists()


def test_retry_errors_leaves_an_unreadable_part_to_the_resume(tmp_path: Path) -> None:
    from mixedscale.executor import RETRYABLE, retire_errors

    df = make_genes(n_genes=12)
    root, store, _, plan = _committed(tmp_path, df)
    _truncate(root / "fits" / f"part-{plan.tasks[0].key}.parquet")
    assert retire_errors(plan, store, RETRYABLE) == 0  # no error rows; no raise either
    todo = pending(plan, store).todo  # the resume sets the damaged task aside
    assert {it.fit_id for t in todo for it in t.items} == \
        {it.fit_id for it in plan.tasks[0].items}


def test_latest_keeps_the_last_committed_fit_per_slice_and_spec(tmp_path: Path) -> None:
    """Changed data gives new fit ids, so the store holds the old fit and the new one
    of a changed slice side by side; latest=True reads only the new one, in every table."""
    import os

    df = make_genes(n_genes=6)
    root, store = _store(tmp_path)
    src, plan = prepare(df, [RI, RS], "gene")
    _commit(plan, src, store, plan.tasks)
    for f in root.glob("*/part-*.parquet"):  # committed well before the rerun
        os.utime(f, (1e9, 1e9))
    changed = df.assign(y=df["y"].where(df["gene"] != "g003", df["y"] * 2))
    src2, plan2 = prepare(changed, [RI, RS], "gene")
    new_ids = set(plan2.fit_ids()) - set(plan.fit_ids())
    assert len(new_ids) == 2  # g003 under both specs
    _commit(plan2, src2, store, pending(plan2, store).todo)

    every = store.fits()
    assert len(every) == plan.n_fits + 2
    latest = store.fits(latest=True)
    assert set(latest["fit_id"]) == set(plan2.fit_ids())
    assert not latest.duplicated(["gene", "spec_id"]).any()
    for table in ("params", "variance"):
        rows = getattr(store, table)(latest=True)
        assert set(rows["fit_id"]) == set(plan2.fit_ids())
        full = getattr(store, table)()
        per_fit = full.groupby("fit_id").size()
        assert len(rows) == int(per_fit[list(plan2.fit_ids())].sum())  # each fit's rows once
    # The same fits committed twice (two jobs sharing a spec and slice), the copy last:
    # each fit's rows still once.
    before = {t: len(getattr(store, t)(latest=True)) for t in ("fits", "params", "variance")}
    key = plan.tasks[0].key
    for t in ("params", "variance", "fits"):
        (root / t / f"part-zz{key}.parquet").write_bytes(
            (root / t / f"part-{key}.parquet").read_bytes())
    assert {t: len(getattr(store, t)(latest=True)) for t in before} == before


def test_latest_tells_apart_jobs_split_by_other_columns(tmp_path: Path) -> None:
    """Two jobs with one spec, split by different columns, each with a missing key: the
    two missing-key slices are different slices, and both stay under latest=True; so
    does a job with no split at all."""
    df = make_genes(n_genes=6)
    df["tissue"] = df["gene"].map({"g000": "a", "g001": "a", "g002": "b", "g003": "b"})
    df.loc[df["gene"] == "g003", "gene"] = None
    store = Store(str(tmp_path / "store"))
    store.init()
    for split in ("gene", "tissue", None):
        src, plan = prepare(df, [RI], split)
        _commit(plan, src, store, pending(plan, store).todo)
    every = store.fits()
    assert len(every) == 6 + 3 + 1  # gene keys (g003 missing), tissue keys (some), none
    latest = store.fits(latest=True)
    assert sorted(latest["fit_id"]) == sorted(every["fit_id"])
    assert len(store.params(latest=True)) == len(store.params())


def test_latest_takes_split_columns_in_any_order_as_one_split(tmp_path: Path) -> None:
    """split_by [gene, tissue] then [tissue, gene]: the same slices (the fits differ
    by the columns' order in their parts, so both are kept); latest keeps one each."""
    df = make_genes(n_genes=4)
    df["tissue"] = df["gene"].map({"g000": "a", "g001": "a", "g002": "b", "g003": "b"})
    store = Store(str(tmp_path / "store"))
    store.init()
    for split in (["gene", "tissue"], ["tissue", "gene"]):
        src, plan = prepare(df, [RI], split)
        _commit(plan, src, store, pending(plan, store).todo)
    assert len(store.fits(latest=True)) == 4


def test_a_reader_refuses_a_committed_task_without_its_variance_part(tmp_path: Path) -> None:
    df = make_genes(n_genes=6)
    root, store, _, plan = _committed(tmp_path, df)
    gone = root / "variance" / f"part-{plan.tasks[0].key}.parquet"
    gone.unlink()
    with pytest.raises(StoreError) as info:
        store.variance()
    assert str(gone) in str(info.value) and "rerunning the job" in str(info.value)
    store.fits()  # the fits table itself is whole


def test_a_reader_names_the_manual_repair_when_a_rerun_would_not_see_the_damage(
        tmp_path: Path) -> None:
    """Resume checks fit ids and footers only (cheap at 10^5+ fits); damage inside
    another column's pages is found by readers, whose message then says what to move."""
    df = make_genes(n_genes=6)
    store = Store(str(tmp_path / "store"))
    store.init()
    src, plan = prepare(df, [RI], "gene")
    _commit(plan, src, store, plan.tasks[:1])
    part = tmp_path / "store" / "fits" / f"part-{plan.tasks[0].key}.parquet"
    flip_column(part, "status")
    assert pending(plan, store).todo == []  # its fit ids read fine: nothing set aside
    with pytest.raises(StoreError) as info:
        store.fits()
    msg = str(info.value)
    assert "\n" not in msg and str(part) in msg and "move it" in msg, msg


def test_planning_pauses_the_cyclic_collector_and_restores_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    df = make_genes(n_genes=4)
    seen: list[bool] = []
    real = plan_mod._tasks

    def spy(*a: object, **k: object) -> list[Task]:
        seen.append(gc.isenabled())
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_mod, "_tasks", spy)
    assert gc.isenabled()
    prepare(df, [RI], "gene")
    assert seen == [False] and gc.isenabled()
    monkeypatch.setattr(plan_mod, "_tasks", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare(df, [RI], "gene")
    assert gc.isenabled()  # restored on errors too
    gc.disable()  # a host that disabled it keeps it disabled
    try:
        monkeypatch.setattr(plan_mod, "_tasks", real)
        prepare(df, [RI], "gene")
        assert not gc.isenabled()
    finally:
        gc.enable()
