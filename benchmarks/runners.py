"""One benchmark run = one (suite, runner) pair, measured into a flat record.

Runners: ``mixedscale-<engine>-<layout>`` (``fit_many`` on a running cluster),
``pandas-loop``, ``process-pool``, ``dask-groupby``, ``lme4`` (peers, on the unsorted
files) and ``single-fast``/``single-statsmodels``/``single-smf`` (one big fit).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import mixedscale as ms
from mixedscale.spec import ENGINES

from . import measure, peers
from .data import dir_bytes, slice_keys, subsample
from .suites import Suite

ROOT = Path(__file__).resolve().parents[1]
PEER_LAYOUT = "unsorted"
N_WORKERS = 2


@dataclass
class Context:
    suite: Suite
    quick: bool
    paths: dict[str, Path]
    out: Path
    client: Any = None
    keep_stores: bool = False
    _keys: list[Any] | None = field(default=None, repr=False)

    def keys(self) -> list[Any]:
        if self._keys is None:
            self._keys = slice_keys(self.paths["sorted"], self.suite.key)
        return self._keys

    def results_path(self, runner: str) -> Path:
        p = self.out / "results" / self.suite.name / f"{runner}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def base_record(ctx: Context, runner: str) -> dict[str, Any]:
    s = ctx.suite
    return {
        "suite": s.name, "runner": runner, "status": "ok", "note": "", "quick": ctx.quick,
        "n_slices_total": s.n_slices, "rows_per_slice": s.rows_per_slice,
        "n_specs_total": len(s.specs), "n_fits": 0, "subsampled": False,
        "wall_seconds": None, "fits_per_second": None, "fit_seconds_sum": None,
        "mean_fit_ms": None, "n_workers": None, "overhead": None,
        "plan_seconds": None, "prepare_seconds": None, "exec_seconds": None,
        "readback_seconds": None, "exec_fits_per_second": None,
        "driver_peak_mb": None, "driver_peak_exec_mb": None, "driver_cpu_seconds": None,
        "worker_peak_mb": None, "workers_replaced": None, "scheduler_cpu_seconds": None,
        "bytes_read": None, "bytes_scan": None, "bytes_one_pass": None, "read_ratio": None,
        "n_tasks": None, "by_status": None, "state": None, "n_split": None,
        "store_publish_ms": None, "results": None, "engine": None, "layout": None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _finish(rec: dict[str, Any], wall: float, n_fits: int, fit_sum: float, workers: int
            ) -> None:
    rec.update(wall_seconds=wall, n_fits=n_fits, fit_seconds_sum=fit_sum, n_workers=workers,
               fits_per_second=n_fits / wall if wall > 0 else None,
               mean_fit_ms=1000 * fit_sum / n_fits if n_fits else None)
    ideal = fit_sum / max(workers, 1)
    if rec.get("overhead") is None and ideal > 0:
        rec["overhead"] = wall / ideal - 1.0


def _finish_peer(ctx: Context, runner: str, rec: dict[str, Any], wall: float, workers: int,
                 results: list[peers.Record] | pd.DataFrame, mem: Any, worker_peak: float,
                 sub: Any, note: str) -> dict[str, Any]:
    """The record of a statsmodels peer (loop, process pool, dask groupby)."""
    n, fit_sum, by_status = _fit_stats(results)
    _finish(rec, wall, n, fit_sum, workers)
    rec.update(subsampled=sub, note=note, by_status=by_status, layout=PEER_LAYOUT,
               driver_peak_mb=mem.peak / measure.MB, worker_peak_mb=worker_peak / measure.MB,
               driver_cpu_seconds=mem.cpu_seconds, engine="statsmodels")
    rec["results"] = _save(ctx, runner, results)
    return rec


def _save(ctx: Context, runner: str, recs: list[peers.Record] | pd.DataFrame) -> str:
    df = recs if isinstance(recs, pd.DataFrame) else pd.DataFrame(
        recs, columns=["key", "spec", "term", "value", "seconds", "status"])
    df = df.assign(key=df["key"].astype(str), term=df["term"].astype(str).map(peers.norm_term))
    path = ctx.results_path(runner)
    df.to_parquet(path, index=False)
    return str(path.relative_to(ctx.out))


def _fit_stats(recs: list[peers.Record] | pd.DataFrame) -> tuple[int, float, dict[str, int]]:
    df = recs if isinstance(recs, pd.DataFrame) else pd.DataFrame(
        recs, columns=["key", "spec", "term", "value", "seconds", "status"])
    per_fit = df.drop_duplicates(["key", "spec"])
    status = per_fit["status"].map(lambda s: "error" if str(s).startswith("error") else s)
    return len(per_fit), float(per_fit["seconds"].sum()), {
        str(k): int(v) for k, v in status.value_counts().items()}


# -- warm-up -------------------------------------------------------------------------------
def _warm_worker(root: str) -> int:
    import os
    import sys as _sys

    if root not in _sys.path:
        _sys.path.insert(0, root)
    import numpy as np
    import pandas as pd_
    import statsmodels.formula.api  # noqa: F401

    import mixedscale as ms_

    rng = np.random.default_rng(0)
    df = pd_.DataFrame({"g": np.repeat(np.arange(5), 4), "x": rng.normal(size=20)})
    df["y"] = df["x"] + rng.normal(size=20)
    ms_.fit(df, ms_.ModelSpec("y ~ x", groups="g"))
    return os.getpid()


def warm(client: Any) -> None:
    """Imports and one small fit on every worker, so no run pays first-use costs."""
    client.wait_for_workers(N_WORKERS, timeout=120)
    client.run(_warm_worker, str(ROOT))


# -- mixedscale ----------------------------------------------------------------------------
@contextlib.contextmanager
def _instrument(mem: measure.DriverMemory, stamps: dict[str, float]) -> Iterator[None]:
    """Time fit_many's phases (prepare, execute, read-back) by wrapping mixedscale.api's
    module-level helpers; skipped for any helper that no longer exists."""
    import mixedscale.api as api

    saved: dict[str, Any] = {}

    def wrap(name: str, phase: str) -> None:
        fn = getattr(api, name, None)
        if fn is None:
            return
        saved[name] = fn

        def inner(*a: Any, **k: Any) -> Any:
            mem.set_phase(phase)
            t0 = time.perf_counter()
            c0 = mem.proc.cpu_times()
            try:
                return fn(*a, **k)
            finally:
                c1 = mem.proc.cpu_times()
                stamps[phase] = stamps.get(phase, 0.0) + time.perf_counter() - t0
                stamps[f"{phase}_cpu"] = stamps.get(f"{phase}_cpu", 0.0) + (
                    c1.user - c0.user + c1.system - c0.system)
                mem.set_phase("other")
        setattr(api, name, inner)

    wrap("prepare", "prepare")
    wrap("execute", "execute")
    wrap("_tables", "readback")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(api, name, fn)


def _spec_index(specs: tuple[ms.ModelSpec, ...]) -> dict[str, int]:
    """spec_id -> index, for the specs as given and with any run-wide engine override."""
    out: dict[str, int] = {}
    for i, s in enumerate(specs):
        out[s.spec_id] = i
        for e in ENGINES:
            out.setdefault(s.replace(engine=e).spec_id, i)
    return out


def _tidy_mixedscale(res: Any, suite: Suite) -> pd.DataFrame:
    idx = _spec_index(suite.specs)
    fits = res.fits
    params = res.params
    if fits.empty:
        return pd.DataFrame(columns=["key", "spec", "term", "value", "seconds", "status"])
    k = suite.key
    f = pd.DataFrame({"key": fits[k].astype(str), "spec": fits["spec_id"].map(idx),
                      "term": peers.LLF, "value": fits["llf"].astype(float),
                      "seconds": fits["fit_seconds"].astype(float), "status": fits["status"]})
    st = fits.set_index("fit_id")["status"]
    secs = fits.set_index("fit_id")["fit_seconds"]
    p = pd.DataFrame({"key": params[k].astype(str), "spec": params["spec_id"].map(idx),
                      "term": params["term"].astype(str),
                      "value": params["estimate"].astype(float),
                      "seconds": params["fit_id"].map(secs).astype(float),
                      "status": params["fit_id"].map(st)}) if len(params) else f.iloc[0:0]
    return pd.concat([p, f], ignore_index=True)


def _publish_cost(store_dir: Path, n: int = 20) -> float | None:
    """Milliseconds to publish one task's three parts (as the workers do), re-publishing
    a committed task's tables into a scratch store."""
    from mixedscale.store import Store

    parts = sorted((store_dir / "fits").glob("part-*.parquet"))
    if not parts:
        return None
    name = parts[0].name
    tables = {t: pq.read_table(store_dir / t / name) for t in ("fits", "params", "variance")}
    scratch = store_dir.parent / f"publish-{uuid.uuid4().hex[:8]}"
    st = Store(str(scratch))
    st.init()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            st.publish(f"bench{i:04d}", tables)
        return 1000 * (time.perf_counter() - t0) / n
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _encode_seconds(store_dir: Path) -> float | None:
    """CPU seconds to encode every committed part of a run as Parquet in memory, with
    the store's options: the part of store writes no writer can avoid (no disk, no sync)."""
    from mixedscale.store import _COMPRESSION, _dictionary_columns

    parts = [p for t in ("fits", "params", "variance")
             for p in sorted((store_dir / t).glob("part-*.parquet"))]
    if not parts:
        return None
    tables = [pq.read_table(p) for p in parts]
    t0 = time.process_time()
    for tb in tables:
        pq.write_table(tb, pa.BufferOutputStream(), compression=_COMPRESSION,
                       use_dictionary=_dictionary_columns(tb.schema))
    return time.process_time() - t0


DECODE_MAX_BYTES = 2 * 1024**3  # bigger inputs (big) are not decoded again for the floor


def _decode_seconds(path: Path, columns: list[str]) -> float | None:
    """CPU seconds to decode the columns a run needs from its input once, into Arrow,
    on one thread: what every orchestration reads, before any conversion or grouping."""
    if dir_bytes(path) > DECODE_MAX_BYTES:
        return None
    t0 = time.process_time()
    pq.read_table(path, columns=columns, use_threads=False)
    return time.process_time() - t0


def _key_scan_seconds(path: Path, key: str | list[str]) -> float:
    """Seconds to read the split columns and count their distinct keys: the least any
    planner must do."""
    cols = [key] if isinstance(key, str) else list(key)
    t0 = time.perf_counter()
    tb = pq.read_table(path, columns=cols)
    tb.group_by(cols).aggregate([([], "count_all")])
    return time.perf_counter() - t0


def run_mixedscale(ctx: Context, runner: str, engine: str, layout: str) -> dict[str, Any]:
    from distributed import Client

    suite = ctx.suite
    rec = base_record(ctx, runner)
    rec.update(engine=engine, layout=layout)
    store = ctx.out / "stores" / f"{suite.name}-{runner}-{uuid.uuid4().hex[:8]}"
    store.parent.mkdir(parents=True, exist_ok=True)
    own_cluster = bool(suite.cluster)
    client = ctx.client
    if not own_cluster and client is None:
        raise RuntimeError("mixedscale runners need a client (or a suite with its own cluster)")
    if own_cluster:
        poll_fn = measure.child_processes()
    else:
        warm(client)
        poll_fn = measure.dask_workers(client)
    stamps: dict[str, float] = {}
    sched0 = measure.scheduler_cpu(client) if client is not None else None
    kwargs: dict[str, Any] = {"engine": None if engine == "auto" else engine, "progress": False}
    if own_cluster:
        kwargs.update(workers=suite.cluster["workers"], memory_limit=suite.cluster["memory_limit"])
    else:
        kwargs["client"] = client
    from mixedscale.executor import RunOptions

    opts = RunOptions()
    timer = None
    limit = suite.cluster.get("time_limit") if suite.cluster else None
    if limit:  # a stalled run ends as "interrupted" (the executor's stop request)
        timer = threading.Timer(limit, opts.stop.set)
        timer.daemon = True
    with measure.DriverMemory() as mem, measure.Poller(poll_fn) as poller, \
            _instrument(mem, stamps):
        t0 = time.perf_counter()
        if timer is not None:
            timer.start()
        try:
            res = ms.fit_many(str(ctx.paths[layout]), list(suite.specs), split_by=suite.key,
                              store=str(store), options=opts, **kwargs)
        except ms.RunIncomplete as exc:
            wall = time.perf_counter() - t0
            return _incomplete(ctx, rec, exc, store, wall, poller, mem, limit)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - t0
    run = res.run
    sched1 = measure.scheduler_cpu(client) if client is not None else None
    workers = run.n_workers or N_WORKERS
    replaced = poller.replaced
    if own_cluster:  # the run's own cluster: its workers are new children, not replacements
        replaced = max(0, replaced - workers - 1)  # + multiprocessing's resource tracker
    _finish(rec, wall, run.n_run, run.fit_seconds, workers)
    rec.update(
        overhead=run.overhead, plan_seconds=run.plan_seconds,
        prepare_seconds=stamps.get("prepare"), exec_seconds=run.wall_seconds,
        readback_seconds=stamps.get("readback"),
        driver_cpu_exec_seconds=stamps.get("execute_cpu"),
        exec_fits_per_second=run.fits_per_second,
        overhead_end_to_end=wall / (run.fit_seconds / workers) - 1 if run.fit_seconds else None,
        driver_peak_mb=mem.peak / measure.MB,
        driver_peak_exec_mb=max(mem.peaks.get(p, 0) for p in ("prepare", "execute"))
        / measure.MB,
        driver_baseline_mb=mem.baseline / measure.MB, driver_cpu_seconds=mem.cpu_seconds,
        worker_peak_mb=poller.max_rss / measure.MB, workers_replaced=replaced,
        scheduler_cpu_seconds=(sched1 - sched0) if sched0 is not None and sched1 is not None
        else None,
        bytes_read=run.bytes_read, bytes_scan=run.bytes_scan, bytes_one_pass=run.bytes_one_pass,
        read_ratio=run.bytes_read / run.bytes_one_pass if run.bytes_one_pass else None,
        n_tasks=run.n_tasks, by_status=dict(run.by_status), state=run.state, n_split=run.n_split,
        worker_seconds={k: round(v, 4) for k, v in run.task_seconds.items()},
        n_units=len(res.plan.units), shuffle=bool(res.plan.shuffle),
        n_row_groups=None, input_bytes=dir_bytes(ctx.paths[layout]),
        memory_limit=suite.cluster.get("memory_limit"),
    )
    errors = res.fits[res.fits["status"] == "error"] if len(res.fits) else res.fits
    if len(errors):
        rec["error_types"] = {str(k): int(v) for k, v in
                              errors["error_type"].value_counts().items()}
    if not own_cluster:
        rec.update(dask_floor(client, res.plan, run.fit_seconds, workers))
    rec["results"] = _save(ctx, runner, _tidy_mixedscale(res, suite))
    rec["store_publish_ms"] = _publish_cost(store, 5 if ctx.quick else 20)
    rec["encode_seconds"] = _encode_seconds(store)
    rec["key_scan_seconds"] = _key_scan_seconds(ctx.paths[layout], suite.key)
    rec["decode_seconds"] = _decode_seconds(ctx.paths[layout], list(res.plan.columns))
    n_parts = len(list((store / "fits").glob("part-*.parquet")))
    rec["store_parts"] = n_parts
    if not ctx.keep_stores:
        shutil.rmtree(store, ignore_errors=True)
    del Client
    return rec


def _incomplete(ctx: Context, rec: dict[str, Any], exc: Exception, store: Path, wall: float,
                poller: measure.Poller, mem: measure.DriverMemory, limit: float | None
                ) -> dict[str, Any]:
    """A run stopped by its time limit (or failing): what it got done, from the store."""
    fits = pd.DataFrame()
    with contextlib.suppress(Exception):
        fits = ms.open_store(str(store)).fits()
    workers = ctx.suite.cluster.get("workers", N_WORKERS)
    committed = len(fits)
    singles = len([p for p in (store / "fits").glob("part-*.parquet") if "-f" in p.stem])
    rec.update(
        status="ok", state="interrupted" if "interrupt" in str(exc) else "failed",
        n_fits=committed, wall_seconds=wall, fits_per_second=committed / wall if wall else None,
        n_workers=workers, driver_peak_mb=mem.peak / measure.MB,
        worker_peak_mb=poller.max_rss / measure.MB,
        workers_replaced=max(0, poller.replaced - workers - 1),
        by_status={str(k): int(v) for k, v in fits["status"].value_counts().items()}
        if committed else {},
        split_tasks_committed=singles,
        error_types={str(k): int(v) for k, v in fits["error_type"].value_counts().items()}
        if committed and "error_type" in fits else {},
        note=(f"stopped after {wall / 60:.0f} min (time limit {limit:.0f} s): {committed} of "
              f"{ctx.suite.n_slices * len(ctx.suite.specs)} fits committed, {singles} of them "
              f"as single-fit tasks split out after KilledWorker"),
        message=str(exc)[:300])
    if not ctx.keep_stores:
        shutil.rmtree(store, ignore_errors=True)
    return rec


# -- peers ---------------------------------------------------------------------------------
def _peer_selection(ctx: Context, runner: str) -> tuple[list[Any], list[int], bool, str]:
    suite = ctx.suite
    n = suite.peer_slices.get(runner, suite.peer_slices.get("default"))
    keys = subsample(ctx.keys(), n)
    specs = list(range(len(suite.specs)))
    if suite.peer_specs is not None and suite.peer_specs < len(specs):
        import numpy as np

        rng = np.random.default_rng(0)
        specs = sorted(rng.choice(len(specs), suite.peer_specs, replace=False).tolist())
    sub = len(keys) < suite.n_slices or len(specs) < len(suite.specs)
    note = ""
    if sub:
        note = (f"subsampled: {len(keys)} of {suite.n_slices} slices x {len(specs)} of "
                f"{len(suite.specs)} specs")
    return keys, specs, sub, note


def _read_frame(ctx: Context, keys: list[Any]) -> pd.DataFrame:
    path = ctx.paths[PEER_LAYOUT]
    cols = ctx.suite.columns
    flt = None if len(keys) >= ctx.suite.n_slices else [(ctx.suite.key, "in", keys)]
    return pq.read_table(path, columns=cols, filters=flt).to_pandas()


def run_pandas_loop(ctx: Context, runner: str) -> dict[str, Any]:
    suite = ctx.suite
    rec = base_record(ctx, runner)
    keys, spec_idx, sub, note = _peer_selection(ctx, runner)
    kws = [peers.sm_kwargs(s) for s in suite.specs]
    recs: list[peers.Record] = []
    with measure.DriverMemory() as mem:
        t0 = time.perf_counter()
        df = _read_frame(ctx, keys)
        for k, g in df.groupby(suite.key, sort=True):
            for i in spec_idx:
                recs.extend(peers.fit_sm(g, kws[i], str(k), i))
        wall = time.perf_counter() - t0
    return _finish_peer(ctx, runner, rec, wall, 1, recs, mem, mem.peak, sub, note)


_POOL: Any = None  # one pool per process, reused across suites (and shut down at exit)


def run_process_pool(ctx: Context, runner: str) -> dict[str, Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    suite = ctx.suite
    rec = base_record(ctx, runner)
    keys, spec_idx, sub, note = _peer_selection(ctx, runner)
    kws = [peers.sm_kwargs(s) for s in suite.specs]
    recs: list[peers.Record] = []
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(N_WORKERS, mp_context=mp.get_context("spawn"))
        atexit.register(_POOL.shutdown)
    ex = _POOL
    # Start and warm both processes before timing, as the Dask cluster is.
    list(ex.map(peers.warm_process, range(2 * N_WORKERS)))
    pool_pids = measure.child_processes()

    def pool_rss() -> dict[str, int]:
        procs = getattr(ex, "_processes", None) or {}
        return {k: v for k, v in pool_pids().items() if int(k) in procs}

    with measure.DriverMemory() as mem, measure.Poller(pool_rss) as poll:
        t0 = time.perf_counter()
        df = _read_frame(ctx, keys)
        items = [(g, kws[i], str(k), i) for k, g in df.groupby(suite.key, sort=True)
                 for i in spec_idx]
        chunk = max(1, len(items) // (N_WORKERS * 16))
        for out in ex.map(peers.fit_pair, items, chunksize=chunk):
            recs.extend(out)
        wall = time.perf_counter() - t0
    return _finish_peer(ctx, runner, rec, wall, N_WORKERS, recs, mem, poll.max_rss, sub, note)


def run_dask_groupby(ctx: Context, runner: str) -> dict[str, Any]:
    import dask
    import dask.dataframe as dd

    suite = ctx.suite
    client = ctx.client
    if client is None:
        raise RuntimeError("dask-groupby needs a client")
    warm(client)
    rec = base_record(ctx, runner)
    keys, spec_idx, sub, note = _peer_selection(ctx, runner)
    kws = [peers.sm_kwargs(s) for s in suite.specs]
    meta = pd.DataFrame({"key": pd.Series(dtype=object), "spec": pd.Series(dtype="int64"),
                         "term": pd.Series(dtype=object), "value": pd.Series(dtype=float),
                         "seconds": pd.Series(dtype=float), "status": pd.Series(dtype=object)})
    flt = None if len(keys) >= suite.n_slices else [(suite.key, "in", keys)]
    with measure.DriverMemory() as mem, measure.Poller(measure.dask_workers(client)) as poll, \
            dask.config.set(scheduler=client):
        t0 = time.perf_counter()
        ddf = dd.read_parquet(str(ctx.paths[PEER_LAYOUT]), columns=suite.columns, filters=flt)
        out = ddf.groupby(suite.key).apply(peers.dask_group, kws, spec_idx, suite.key,
                                           meta=meta).compute()
        wall = time.perf_counter() - t0
    out = out.reset_index(drop=True)
    return _finish_peer(ctx, runner, rec, wall, N_WORKERS, out, mem, poll.max_rss, sub, note)


LME4_SCRIPT = Path(__file__).with_name("lme4_fit.R")


def run_lme4(ctx: Context, runner: str, rscript: str | None = None) -> dict[str, Any]:
    """lme4::lmer per slice via Rscript; skipped (status "skipped") without Rscript/lme4."""
    suite = ctx.suite
    rec = base_record(ctx, runner)
    rec.update(engine="lme4", layout=PEER_LAYOUT, n_workers=1)
    rscript = rscript or shutil.which("Rscript")
    if rscript is None:
        rec.update(status="skipped", note="skipped: Rscript not found on PATH")
        return rec
    keys, spec_idx, sub, note = _peer_selection(ctx, runner)
    work = ctx.out / "lme4" / suite.name
    work.mkdir(parents=True, exist_ok=True)
    data_csv, specs_csv, out_csv = work / "data.csv", work / "specs.csv", work / "out.csv"
    _read_frame(ctx, keys).to_csv(data_csv, index=False)  # not timed: R reads it back
    with open(specs_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["spec", "formula", "reml"])
        for i in spec_idx:
            w.writerow([i, peers.lme4_formula(suite.specs[i]), str(suite.specs[i].reml).upper()])
    t0 = time.perf_counter()
    proc = subprocess.run([rscript, str(LME4_SCRIPT), str(data_csv), str(specs_csv),
                           str(out_csv), suite.key], capture_output=True, text=True,
                          timeout=6 * 3600)
    wall = time.perf_counter() - t0
    if proc.returncode == 3:
        rec.update(status="skipped", note="skipped: the lme4 R package is not installed")
        return rec
    if proc.returncode != 0 or not out_csv.exists():
        rec.update(status="failed", note=f"Rscript exit {proc.returncode}: "
                   f"{proc.stderr.strip()[-300:]}")
        return rec
    out = pd.read_csv(out_csv, dtype={"key": str})
    n, fit_sum, by_status = _fit_stats(out)
    _finish(rec, wall, n, fit_sum, 1)
    rec.update(subsampled=sub, note=(note + "; " if note else "") +
               "wall includes R start-up and reading the CSV", by_status=by_status,
               r_stdout=proc.stdout.strip()[-200:])
    rec["results"] = _save(ctx, runner, out)
    return rec


# -- one big fit ---------------------------------------------------------------------------
def run_single(ctx: Context, runner: str, engine: str) -> dict[str, Any]:
    """mixedscale.fit (or plain smf.mixedlm) on the suite's one big slice."""
    suite = ctx.suite
    spec = suite.single_spec
    if spec is None:
        raise RuntimeError(f"suite {suite.name} has no single-fit spec")
    rec = base_record(ctx, runner)
    rec.update(engine=engine, layout="sorted", n_workers=1, n_specs_total=1)
    key0 = ctx.keys()[0]
    df = pq.read_table(ctx.paths["sorted"], columns=suite.columns,
                       filters=[(suite.key, "==", key0)]).to_pandas()
    times: list[float] = []
    if engine == "smf":
        kw = peers.sm_kwargs(spec)
        recs = peers.fit_sm(df, kw, str(key0), 0)
        times.append(recs[0][4])
        status = recs[0][5]
    else:
        s = spec.replace(engine=engine)
        repeats = 1 if engine == "statsmodels" else (3 if ctx.quick else 7)
        if engine != "statsmodels":
            ms.fit(df, s)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = ms.fit(df, s)
            times.append(time.perf_counter() - t0)
        status = r.status
        recs = [(str(key0), 0, peers.norm_term(str(t)), float(v), times[-1], status)
                for t, v in zip(r.params["term"], r.params["estimate"], strict=True)]
        recs.append((str(key0), 0, peers.LLF, float(r.fit["llf"] or float("nan")), times[-1],
                     status))
        rec["method"] = r.fit["method"]
    med = statistics.median(times)
    _finish(rec, med, 1, med, 1)
    rec.update(by_status={status: 1}, single_seconds=med, single_repeats=len(times),
               single_rows=len(df), single_groups=int(df[spec.groups].nunique()),
               note=f"one fit, {len(df):,} rows, {df[spec.groups].nunique():,} groups, "
               f"random slope; median of {len(times)}")
    rec["results"] = _save(ctx, runner, recs)
    return rec


# -- calibration ---------------------------------------------------------------------------
def _noop(i: int) -> int:
    return i


def calibrate_dask(client: Any, n: int) -> dict[str, Any]:
    """Scheduler round trips: n no-op tasks mapped at once, and one at a time."""
    from distributed import wait

    warm(client)
    t0 = time.perf_counter()
    futs = client.map(_noop, range(n), pure=False)
    wait(futs)
    batch = time.perf_counter() - t0
    del futs
    m = max(20, n // 20)
    t0 = time.perf_counter()
    for i in range(m):
        client.submit(_noop, i, pure=False).result()
    serial = time.perf_counter() - t0
    return {"noop_tasks": n, "noop_tasks_per_second": n / batch,
            "noop_ms_per_task_batch": 1000 * batch / n,
            "roundtrip_ms_serial": 1000 * serial / m}


def _busy(seconds: float) -> float:
    """Keep a worker thread busy for ``seconds`` of wall time (fits are timed that way)."""
    t0 = time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < seconds:
        x += 1
    return time.perf_counter() - t0


FLOOR_MAX_S = 60.0  # longer runs are not replayed: their floor is negligible, the replay not


def dask_floor(client: Any, plan: Any, fit_seconds: float, workers: int) -> dict[str, Any]:
    """Dask's own overhead for a run's task layout: the plan's tasks, submitted in plan
    order with its priorities, each busy for its share of the run's measured fit
    seconds (shared out by the plan's cost estimates). No data, fits or writes: what is
    left over is scheduling, round trips and the tail, the floor under RunSummary.overhead
    on this machine."""
    from distributed import wait

    costs = [t.cost_ms for t in plan.tasks]
    total = sum(costs)
    if not costs or total <= 0 or fit_seconds <= 0 or fit_seconds / max(workers, 1) > FLOOR_MAX_S:
        return {}
    t0 = time.perf_counter()
    futs = [client.submit(_busy, fit_seconds * c / total, pure=False, priority=-i)
            for i, c in enumerate(costs)]
    wait(futs)
    wall = time.perf_counter() - t0
    busy = sum(client.gather(futs))
    return {"dask_floor_overhead": wall / (busy / max(workers, 1)) - 1.0,
            "dask_floor_tasks": len(costs)}


RUNNERS = ("mixedscale", "pandas-loop", "process-pool", "dask-groupby", "lme4", "single")


def run_one(ctx: Context, runner: str) -> dict[str, Any]:
    """Dispatch one runner; failures become a record with status "failed"."""
    t0 = time.perf_counter()
    try:
        if runner.startswith("mixedscale-"):
            _, engine, layout = runner.split("-")
            rec = run_mixedscale(ctx, runner, engine, layout)
        elif runner == "pandas-loop":
            rec = run_pandas_loop(ctx, runner)
        elif runner == "process-pool":
            rec = run_process_pool(ctx, runner)
        elif runner == "dask-groupby":
            rec = run_dask_groupby(ctx, runner)
        elif runner == "lme4":
            rec = run_lme4(ctx, runner)
        elif runner.startswith("single-"):
            rec = run_single(ctx, runner, runner.split("-", 1)[1])
        else:
            raise ValueError(f"unknown runner {runner!r}")
    except Exception as exc:
        import traceback

        rec = base_record(ctx, runner)
        rec.update(status="failed", note=f"{type(exc).__name__}: {exc}"[:300],
                   traceback=traceback.format_exc()[-2000:])
    rec["runner_seconds"] = time.perf_counter() - t0
    print(f"[{ctx.suite.name}] {runner}: {rec['status']}"
          + (f", {rec['n_fits']} fits, {rec['fits_per_second']:.1f} fits/s"
             if rec.get("fits_per_second") else "")
          + (f" ({rec['note']})" if rec.get("note") else ""), file=sys.stderr, flush=True)
    return rec
