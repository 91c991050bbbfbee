"""Batch runs end to end (issue "Batch runs", §9): ``fit_many`` on a real multi-process
cluster, the store's guarantees, resume after a killed driver, DuckDB, unsorted input,
and fsspec ``memory://`` URLs."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mixedscale as ms
import mixedscale.plan as plan_mod
import mixedscale.worker as worker_mod
from mixedscale.api import prepare

from .clusterutil import (
    check_invariant,
    committed_parts,
    dask_cluster,
    faults_env,
    manifests,
    planned,
    tail,
    wait_for,
    write_genes,
    write_job,
)
from .conftest import make_genes

pytestmark = pytest.mark.cluster

RI = ms.ModelSpec("y ~ time", groups="subject", name="ri")
RS = ms.ModelSpec("y ~ time", groups="subject", re_formula="~time", name="rs")
UNREACHABLE = "tcp://127.0.0.1:1"
FIT_COLS = ["fit_id", "gene", "spec_id", "status", "llf", "n_obs", "n_groups", "singular"]


def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by).reset_index(drop=True)


def _same_estimates(a: pd.DataFrame, b: pd.DataFrame, key: list[str], rtol: float = 1e-6
                    ) -> None:
    a, b = _sorted(a, key), _sorted(b, key)
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a[key], b[key])
    np.testing.assert_allclose(a["estimate"].to_numpy(float), b["estimate"].to_numpy(float),
                               rtol=rtol, atol=1e-8)


def test_fit_many_on_a_cluster_store_none_equals_store(cluster_client: Any,
                                                        genes_parquet: Path,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    mem = ms.fit_many(str(genes_parquet), [RI, RS], split_by="gene", client=cluster_client,
                      progress=False)
    disk = ms.fit_many(str(genes_parquet), [RI, RS], split_by="gene", store=str(store),
                       client=cluster_client, progress=False)
    assert mem.summary()["n_planned"] == disk.summary()["n_planned"] == 40
    assert disk.summary()["n_workers"] == 2 and disk.summary()["state"] == "complete"
    assert disk.summary()["n_fitted_this_run"] == 40
    # Worker time by phase: fitting inside it, every phase counted.
    ts = disk.run.task_seconds
    assert set(ts) == {"task", "data", "fits", "tables", "write"}
    assert ts["fits"] >= 0.9 * disk.run.fit_seconds and ts["write"] > 0
    assert sum(v for k, v in ts.items() if k != "task") == pytest.approx(ts["task"], rel=0.05)
    assert set(mem.fits["status"]) <= {"ok", "not_converged"}
    pd.testing.assert_frame_equal(_sorted(mem.fits[FIT_COLS], ["fit_id"]),
                                  _sorted(disk.fits[FIT_COLS], ["fit_id"]))
    _same_estimates(mem.params, disk.params, ["fit_id", "term"], rtol=0)
    _same_estimates(mem.variance, disk.variance, ["fit_id", "group", "term1", "term2"],
                    rtol=0)
    # The store on its own says the same.
    st = ms.open_store(str(store))
    pd.testing.assert_frame_equal(_sorted(st.fits()[FIT_COLS], ["fit_id"]),
                                  _sorted(disk.fits[FIT_COLS], ["fit_id"]))
    check_invariant(store, disk.plan.fit_ids())
    # A complete job fits nothing and needs no cluster (the scheduler is unreachable).
    again = ms.fit_many(str(genes_parquet), [RI, RS], split_by="gene", store=str(store),
                        scheduler=UNREACHABLE, progress=False)
    assert again.summary()["n_fitted_this_run"] == 0
    assert again.summary()["n_resumed"] == 40
    assert len(again.fits) == 40
    assert [r["state"] for r in manifests(store)] == ["complete", "complete"]
    # Each fit row names the run that committed it; that run's manifest, its data and
    # its models by spec_id (also for resumed rows, which keep their run).
    first = manifests(store)[0]
    assert set(disk.fits["run_id"]) == set(again.fits["run_id"]) == {first["run_id"]}
    assert first["data"] == str(genes_parquet) and first["split_by"] == ["gene"]
    assert set(first["specs"]) == set(disk.fits["spec_id"])
    assert {v["name"] for v in first["specs"].values()} == {"ri", "rs"}
    assert first["specs"][RS.spec_id]["re_formula"] == RS.canonical()["re_formula"]
    # ... and the store's specs table, to select fits by model.
    specs = st.specs().set_index("spec_id")
    assert sorted(specs.index) == sorted([RI.spec_id, RS.spec_id])
    assert specs.loc[RS.spec_id, ["spec_name", "re_formula", "groups", "reml"]].tolist() == [
        "rs", "time", "subject", True]
    assert pd.isna(specs.loc[RI.spec_id, "vc_formula"])
    assert specs.loc[RI.spec_id, "formula"] == "y ~ time"  # spaced as written, not hashed
    assert mem.fits["run_id"].notna().all()
    # Every read-back in the job's order: genes sorted, each gene's specs as given, a
    # fit's params and variance rows together and in the fit's own order.
    want = [(g, s) for g in sorted(mem.fits["gene"].unique()) for s in ("ri", "rs")]
    for res in (mem, disk, again):
        assert list(zip(res.fits["gene"], res.fits["spec_name"], strict=True)) == want
        for name in ("params", "variance"):
            t = getattr(res, name)
            runs = t["fit_id"].ne(t["fit_id"].shift()).cumsum()
            assert runs.iloc[-1] == 40 and t["fit_id"].drop_duplicates().tolist() == \
                res.fits["fit_id"].tolist()
        assert res.params.groupby("fit_id", sort=False)["term"].agg(tuple).map(
            lambda ts: ts[0] == "Intercept").all()


def test_a_stored_runs_tables_are_read_back_once_or_when_first_used(
        cluster_client: Any, genes_parquet: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fit_many reads the tables back in one read; with read_back off (the CLI) nothing
    is read until used, and the summary (and --fail-on) reads the status column alone."""
    from mixedscale.executor import RunOptions
    from mixedscale.store import TABLES, Store

    reads: list[tuple[tuple[str, ...], Any]] = []
    real = Store.run_tables

    def spy(self: Store, tasks: set[str], ids: Any = None, names: tuple[str, ...] = (),
            fit_columns: Any = None, expect: int | None = None, rank: Any = None
            ) -> list[pd.DataFrame]:
        reads.append((names, fit_columns))
        assert expect == len(ids)  # a finished run: every planned fit must be there
        return real(self, tasks, ids, names, fit_columns, expect, rank)

    monkeypatch.setattr(Store, "run_tables", spy)
    kw: dict[str, Any] = {"split_by": "gene", "client": cluster_client, "progress": False}
    eager = ms.fit_many(str(genes_parquet), [RI, RS], store=str(tmp_path / "a"), **kw)
    assert reads == [(TABLES, None)]
    assert len(eager.fits) == 40 and len(eager.params) and len(eager.variance)
    assert sum(eager.summary()["by_status"].values()) == 40 and len(reads) == 1

    reads.clear()
    res = ms.fit_many(str(genes_parquet), [RI, RS], store=str(tmp_path / "b"),
                      options=RunOptions(read_back=False), **kw)
    assert reads == []
    counts = res.summary()["by_status"]
    assert reads == [(("fits",), ["status"])]
    assert sum(counts.values()) == 40
    assert res.status_counts() == counts and len(reads) == 1  # counted once
    full = ms.open_store(str(tmp_path / "b"))
    assert len(res.params) == len(full.params()) and len(reads) == 2
    assert reads[-1] == (("params",), None)
    assert res.fits["status"].value_counts().to_dict() == counts
    assert len(res.fits) == 40 and len(reads) == 3  # read once, then kept
    assert len(res.variance) == len(full.variance()) and len(reads) == 4
    assert "this_run={'ok': 40}" in repr(res) and len(reads) == 4  # no read for a repr
    # A store moved before the tables are read is an error, not empty tables.
    moved = ms.fit_many(str(genes_parquet), [RI], store=str(tmp_path / "c"),
                        options=RunOptions(read_back=False), **kw)
    (tmp_path / "c").rename(tmp_path / "elsewhere")
    for table in ("fits", "params", "variance"):
        with pytest.raises(ms.StoreError, match=r"no longer holds this run's results \(found "
                           r"0 of 20 fits\)"):
            getattr(moved, table)
    with pytest.raises(ms.StoreError, match="no longer holds"):
        moved.summary()


def test_a_grown_spec_grid_resumes_by_fit_id(cluster_client: Any, genes_parquet: Path,
                                             tmp_path: Path) -> None:
    """Adding a spec to a job repacks its tasks; the fits already in the store are kept,
    not fitted again, and the job reads back every fit once."""
    store = str(tmp_path / "store")
    first = ms.fit_many(str(genes_parquet), [RI], split_by="gene", store=store,
                        client=cluster_client, progress=False)
    grown = ms.fit_many(str(genes_parquet), [RI, RS], split_by="gene", store=store,
                        client=cluster_client, progress=False)
    assert not {t.key for t in first.plan.tasks} & {t.key for t in grown.plan.tasks}
    assert grown.summary()["n_resumed"] == len(first.fits) == 20
    assert grown.summary()["n_fitted_this_run"] == 20
    assert len(grown.fits) == 40 and grown.fits["fit_id"].is_unique
    kept = grown.fits.set_index("fit_id").loc[first.fits["fit_id"]]
    np.testing.assert_array_equal(kept["fit_seconds"].to_numpy(),
                                  first.fits["fit_seconds"].to_numpy())  # not refitted
    check_invariant(Path(store), grown.plan.fit_ids())


def test_duckdb_reads_the_store_folders(cluster_client: Any, genes_parquet: Path,
                                        tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    store = tmp_path / "store"
    run = ms.fit_many(str(genes_parquet), [RI, RS], split_by="gene", store=str(store),
                      client=cluster_client, progress=False)
    con = duckdb.connect()
    n, distinct = con.execute(
        f"select count(*), count(distinct fit_id) from read_parquet('{store}/fits/*.parquet')"
    ).fetchone()
    assert n == distinct == 40
    rows = con.execute(
        f"select f.gene, f.spec_id, p.term, p.estimate "
        f"from read_parquet('{store}/fits/*.parquet') f "
        f"join read_parquet('{store}/params/*.parquet') p using (fit_id) "
        f"where f.status = 'ok' order by all").df()
    assert set(rows["term"]) == {"Intercept", "time"}
    assert len(rows) == 2 * int((run.fits["status"] == "ok").sum())
    by_gene = con.execute(
        f"select gene, count(*) n from read_parquet('{store}/variance/*.parquet') "
        f"group by gene").df()
    assert len(by_gene) == 20


def test_unsorted_input_gives_the_same_results(cluster_client: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sorted_dir = write_genes(tmp_path / "sorted", 24, files=2)
    # Shuffled rows, small row groups: every row group holds many genes.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    make_genes(n_genes=24, shuffle=True).to_parquet(shuffled / "all.parquet", index=False,
                                                    row_group_size=100)
    a = ms.fit_many(str(sorted_dir), [RI, RS], split_by="gene", client=cluster_client,
                    progress=False)
    b = ms.fit_many(str(shuffled), [RI, RS], split_by="gene", client=cluster_client,
                    progress=False)
    # Force the shuffle path (many load units, each needing every row group).
    monkeypatch.setattr(plan_mod, "UNIT_MAX_ROWS", 200)
    _, p = prepare(str(shuffled), [RI, RS], "gene")
    assert p.shuffle and len(p.units) > 1
    c = ms.fit_many(str(shuffled), [RI, RS], split_by="gene", client=cluster_client,
                    progress=False, store=str(tmp_path / "store"))
    assert c.run.bytes_read <= 1.5 * c.run.bytes_one_pass + c.run.bytes_scan
    # With a store the shuffle spills to scratch files, removed when the run ends;
    # without one it stays in worker memory.
    assert not list((tmp_path / "store" / "_tmp").glob("shuffle-*"))
    # ...and no worker still holds a cached shuffled unit.
    assert cluster_client.run(lambda: len(worker_mod._SHUFFLED)) == {
        w: 0 for w in cluster_client.scheduler_info()["workers"]}
    # Each worker froze its startup heap once, at its first task.
    assert set(cluster_client.run(lambda: __import__("gc").get_freeze_count() > 0).values()
               ) == {True}
    d = ms.fit_many(str(shuffled), [RI, RS], split_by="gene", client=cluster_client,
                    progress=False)
    assert d.plan.shuffle
    for other in (b, c, d):
        assert len(other.fits) == len(a.fits) == 48
        key = ["gene", "spec_id"]
        fa, fo = _sorted(a.fits, key), _sorted(other.fits, key)
        assert fa["status"].tolist() == fo["status"].tolist()
        np.testing.assert_allclose(fa["llf"].to_numpy(float), fo["llf"].to_numpy(float),
                                   rtol=1e-7)
        _same_estimates(a.params, other.params, ["gene", "spec_id", "term"], rtol=1e-5)
    check_invariant(tmp_path / "store", c.plan.fit_ids())


def test_fit_tasks_of_too_few_load_units_are_dealt_round_the_workers(
        cluster_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data read in one unit lives on the worker that loaded it, and Dask would queue
    every fit task there (until work stealing, which needs task durations, moves some).
    With fewer units than workers, the first fit task per worker carries a loose
    restriction to it (so each fetches the unit); later ones, and every task with a
    unit per worker, carry none: Dask places them by data and load."""
    one = tmp_path / "one.parquet"  # one row group: one load unit
    make_genes(n_genes=12).to_parquet(one, index=False, row_group_size=10**6)
    two = write_genes(tmp_path / "two", 12, files=2)  # a unit per file
    spec = ms.ModelSpec("y ~ time", groups="subject", engine="statsmodels")  # several tasks
    workers = set(cluster_client.scheduler_info()["workers"])
    submit = cluster_client.submit
    for path, units, dealt in ((one, 1, workers), (two, 2, set())):
        _, p = prepare(str(path), [spec], "gene")
        assert len(p.units) == units and len(p.tasks) >= 2 and not p.shuffle
        seen: list[dict[str, Any]] = []

        def spy(fn: Any, *args: Any, seen: list[dict[str, Any]] = seen, **kw: Any) -> Any:
            if str(kw.get("key", "")).startswith("mixedscale-fit-"):
                seen.append(kw)
            return submit(fn, *args, **kw)

        monkeypatch.setattr(cluster_client, "submit", spy)
        res = ms.fit_many(str(path), spec, split_by="gene", client=cluster_client,
                          progress=False)
        assert res.run.state == "complete" and (res.fits["status"] == "ok").all()
        assert len(seen) == len(p.tasks) > len(workers)
        first = seen[:len(workers)] if dealt else []
        assert {w for kw in first for w in kw["workers"]} == dealt
        assert all(len(kw["workers"]) == 1 and kw["allow_other_workers"] for kw in first)
        assert not any("workers" in kw for kw in seen[len(first):])


def _submitted_keys(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the tasks ``client`` is asked to run from now on, in order."""
    submit = client.submit
    keys: list[str] = []

    def spy(fn: Any, *args: Any, **kw: Any) -> Any:
        keys.append(str(kw.get("key", "")))
        return submit(fn, *args, **kw)

    monkeypatch.setattr(client, "submit", spy)
    return keys


def test_each_workers_first_load_is_submitted_before_any_fit(
        cluster_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing fit payloads holds the GIL the embedded scheduler's event loop needs;
    the loads go out first, so no worker waits for the driver to pack every task."""
    path = write_genes(tmp_path / "three", 18, files=3)  # a unit per file
    monkeypatch.setattr(plan_mod, "UNIT_MIN_UNITS", 3)  # the planner cuts 2 otherwise
    spec = ms.ModelSpec("y ~ time", groups="subject", engine="statsmodels")
    _, p = prepare(str(path), [spec], "gene")
    assert len(p.units) == 3 and p.tasks[1].unit == 0  # plan order: unit 0's tasks first
    keys = _submitted_keys(cluster_client, monkeypatch)
    res = ms.fit_many(str(path), spec, split_by="gene", client=cluster_client, progress=False)
    assert res.run.state == "complete" and (res.fits["status"] == "ok").all()
    n = len(cluster_client.scheduler_info()["workers"])
    kinds = [k.split("-")[1] for k in keys]
    assert n == 2 and kinds[:2] == ["load", "load"] and kinds[2] == "fit", kinds
    assert kinds.count("load") == 3


def test_a_workers_first_task_freezes_its_heap_even_when_it_is_a_load(tmp_path: Path) -> None:
    """A load unpickles the unit's split keys: in a fresh worker, before the first fit
    task froze the heap, the collector's full passes over it made that slower (tiny's
    50,000 keys: 0.11 s against 6 ms frozen, in-process)."""
    from distributed import Client

    from mixedscale.executor import local_cluster

    path = write_genes(tmp_path / "g", 6)
    src, p = prepare(str(path), [RI], "gene")
    u = p.units[0]
    with local_cluster(1) as cluster, Client(cluster) as client:
        assert set(client.run(gc.get_freeze_count).values()) == {0}  # a fresh worker
        loaded = client.submit(worker_mod.load_unit, src,
                               [src.row_groups[i] for i in u.row_groups], p.columns,
                               p.split_by, worker_mod.Packed([p.slices[i].key for i in u.slices]),
                               pure=False)
        assert len(loaded.result().frame) == 6 * 48
        assert all(n > 0 for n in client.run(gc.get_freeze_count).values())


def test_a_unit_with_one_task_is_read_by_that_task(
        cluster_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No load task (nor its hop through the scheduler) for a unit only one task needs:
    the task reads its rows itself, with the same fits as the rows given in memory."""
    path = write_genes(tmp_path / "two", 12, files=2)  # a unit per file
    _, p = prepare(str(path), [RI], "gene")
    assert len(p.units) == 2 and sorted(t.unit for t in p.tasks) == [0, 1]
    keys = _submitted_keys(cluster_client, monkeypatch)
    res = ms.fit_many(str(path), RI, split_by="gene", store=str(tmp_path / "store"),
                      client=cluster_client, progress=False)
    assert [k.split("-")[1] for k in keys] == ["fit", "fit"]
    assert res.run.state == "complete" and (res.fits["status"] == "ok").all()
    assert res.run.bytes_read == res.run.bytes_one_pass + res.run.bytes_scan
    monkeypatch.undo()
    frame = ms.fit_many(pd.read_parquet(path), RI, split_by="gene", client=cluster_client,
                        progress=False)
    cols = FIT_COLS[1:]  # fit ids differ: they name the data they were fitted on
    pd.testing.assert_frame_equal(_sorted(res.fits[cols], ["gene"]),
                                  _sorted(frame.fits[cols], ["gene"]))
    _same_estimates(res.params, frame.params, ["gene", "spec_id", "term"])


def test_memory_url_as_data_and_store() -> None:
    """memory:// lives in one process, so this cluster runs its workers as threads."""
    import fsspec
    from distributed import Client, LocalCluster

    root = f"memory://ms-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    df = make_genes(n_genes=6)
    for i, part in enumerate((df.iloc[:144], df.iloc[144:])):
        with fs.open(f"{root}/data/part-{i}.parquet", "wb") as fh:
            part.to_parquet(fh, index=False)
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=2,
                      dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0"
                      ) as cluster, Client(cluster) as client:
        run = ms.fit_many(f"{root}/data", [RI], split_by="gene", store=f"{root}/store",
                          client=client, progress=False)
        assert run.summary()["n_fitted_this_run"] == 6
        st = ms.open_store(f"{root}/store")
        assert sorted(st.fits()["gene"]) == [f"g{i:03d}" for i in range(6)]
        assert len(st.params()) == 12 and len(st.runs()) == 1
        again = ms.fit_many(f"{root}/data", [RI], split_by="gene", store=f"{root}/store",
                            client=client, progress=False)
        assert again.summary()["n_fitted_this_run"] == 0
    # A threaded worker shares this process: its heap is left unfrozen.
    assert gc.get_freeze_count() == 0
    fs.rm(root, recursive=True)


def test_resume_after_a_killed_driver_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = write_genes(tmp_path / "data", 40)
    sm = {"name": "sm", "formula": "y ~ time", "groups": "subject", "engine": "statsmodels"}
    ri = {"name": "ri", "formula": "y ~ time", "groups": "subject"}
    store, ref = tmp_path / "store", tmp_path / "ref"
    job = write_job(tmp_path / "job.yaml", data, store, models=[sm, ri])
    plan = planned(job)
    assert len(plan.tasks) >= 4, "precondition: the job must have several tasks"
    env = faults_env({"at": "task_start", "do": "sleep", "seconds": 0.3})
    with dask_cluster(tmp_path / "cluster", 2, worker_env=env) as cl:
        p, log = cl.start_cli(["run", str(job), "--quiet"])
        wait_for(lambda: committed_parts(store) >= 1 or p.poll() is not None, 90,
                 "a first committed task", on_fail=lambda: tail(log))
        assert p.poll() is None, "the run ended before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        partial = committed_parts(store)
        assert 1 <= partial < len(plan.tasks)
        check_invariant(store, plan.fit_ids(), incomplete=True)

        r = cl.cli(["run", str(job), "--quiet"])
        assert r.returncode == 0, r.stderr[-3000:]
        r = cl.cli(["run", str(job), "--quiet", "--store", str(ref)])
        assert r.returncode == 0, r.stderr[-3000:]
        cl.wait_idle()
        r = cl.cli(["run", str(job), "--quiet"])  # complete: fits nothing
        assert r.returncode == 0, r.stderr[-3000:]
        # `dask worker` nannies start workers with Dask's trim threshold; mixedscale's
        # first task in each undid its pinned mmap threshold (see mixedscale._malloc).
        with cl.client() as client:
            env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
            assert set(env.values()) == {"65536"}, env
            if sys.platform.startswith("linux"):
                done = client.run(lambda: importlib.import_module("mixedscale._malloc").applied)
                assert all(done.values()), done
    assert manifests(store)[-1]["n_run"] == 0
    assert manifests(store)[-1]["n_skipped"] == plan.n_fits
    resumed = manifests(store)[1]
    assert resumed["n_skipped"] >= 1 and resumed["n_run"] <= plan.n_fits - 1
    got = check_invariant(store, plan.fit_ids())["fits"]
    want = check_invariant(ref, plan.fit_ids())["fits"]
    assert sorted(got["fit_id"]) == sorted(want["fit_id"])
    a, b = ms.open_store(str(store)), ms.open_store(str(ref))
    pd.testing.assert_frame_equal(_sorted(a.fits()[FIT_COLS], ["fit_id"]),
                                  _sorted(b.fits()[FIT_COLS], ["fit_id"]))
    _same_estimates(a.params(), b.params(), ["fit_id", "term"], rtol=1e-10)
    _same_estimates(a.variance(), b.variance(), ["fit_id", "group", "term1", "term2"],
                    rtol=1e-10)


def test_a_run_that_crashes_unforeseen_is_not_recorded_complete(
        cluster_client: Any, genes_parquet: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mixedscale.executor as ex

    def boom(*a: Any, **k: Any) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(ex, "_handle", boom)
    store = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"):
        ms.fit_many(str(genes_parquet), [RI], split_by="gene", store=str(store),
                    client=cluster_client, progress=False)
    [m] = manifests(store)
    assert m["state"] == "failed" and m["message"] == "RuntimeError: boom"


def test_a_store_that_cannot_take_the_manifest_stops_the_run_before_any_fit(
        cluster_client: Any, genes_parquet: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk from the start: every task was fitted, then failed to commit and was
    retried, with a traceback each, before the run gave up."""
    from mixedscale.store import Store

    monkeypatch.setattr(Store, "write_manifest", lambda self, run_id, m: False)
    store = tmp_path / "store"
    with pytest.raises(ms.RunIncomplete, match=r"cannot write to the store.*nothing was fitted"):
        ms.fit_many(str(genes_parquet), [RI], split_by="gene", store=str(store),
                    client=cluster_client, progress=False)
    assert not list((store / "fits").glob("*.parquet"))
