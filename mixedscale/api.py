"""The batch API: ``fit_many`` plans, executes and returns a RunResult."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import SpecError
from .executor import (
    RETRYABLE,
    RunOptions,
    RunSummary,
    execute,
    local_cluster,
    long_lived_frozen,
    pending,
    retire_errors,
)
from .plan import Plan, make_plan
from .source import Source, lists_under, open_source
from .spec import ENGINES, ModelSpec
from .store import (
    TABLES,
    Store,
    among,
    check_writable,
    in_rank_order,
    protocols,
    to_pandas,
)

__all__ = ["RunResult", "fit_many", "prepare"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunResult:
    """Results of one run: tidy tables of every planned fit, and the run summary.

    ``fit_many`` reads the tables back from the store when the run ends, unless told
    not to (``RunOptions.read_back``, as ``mixedscale run`` does): then each is read
    when first used, and ``status_counts`` reads only the fits' status column."""

    run: RunSummary
    plan: Plan
    store: Store | None = None
    _read: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _counts: dict[str, int] | None = field(default=None, repr=False)
    _rank: tuple[pa.Array, np.ndarray] | None = field(default=None, repr=False)

    @property
    def fits(self) -> pd.DataFrame:
        return self._table("fits")

    @property
    def params(self) -> pd.DataFrame:
        return self._table("params")

    @property
    def variance(self) -> pd.DataFrame:
        return self._table("variance")

    def _order(self) -> tuple[pa.Array, np.ndarray]:
        """The plan's fit order, built once for every table read in it."""
        if self._rank is None:
            self._rank = _plan_rank(self.plan)
        return self._rank

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._read:
            self._read[name] = _tables(self.run, self.plan, self.store, (name,),
                                       rank=self._order())[0]
        return self._read[name]

    def _read_all(self) -> None:
        """All three tables in one read (the fits table once)."""
        self._read.update(zip(TABLES, _tables(self.run, self.plan, self.store,
                                              rank=self._order()), strict=True))

    def status_counts(self) -> dict[str, int]:
        """Fits per status over every planned fit (resumed ones included)."""
        if self._counts is None:
            fits = self._read.get("fits")
            if fits is None:  # the status column alone, not the whole table
                fits = (self.fits if self.store is None else
                        _tables(self.run, self.plan, self.store, ("fits",), ["status"])[0])
            counts = fits["status"].value_counts() if len(fits) else pd.Series(dtype=int)
            self._counts = {str(k): int(v) for k, v in counts.items()}
        return dict(self._counts)

    def summary(self) -> dict[str, Any]:
        counts = self.status_counts()
        r = self.run
        return {
            "run_id": r.run_id, "state": r.state, "n_planned": r.n_planned,
            "n_fitted_this_run": r.n_run, "n_resumed": r.n_skipped,
            "by_status": counts,
            "fits_per_second": round(r.fits_per_second, 2),
            "wall_seconds": round(r.wall_seconds, 3), "plan_seconds": round(r.plan_seconds, 3),
            "fit_seconds": round(r.fit_seconds, 3), "overhead": round(r.overhead, 4),
            "bytes_read": r.bytes_read, "bytes_one_pass": r.bytes_one_pass,
            "n_workers": r.n_workers, "n_tasks": r.n_tasks,
            "store": self.store.url if self.store else None,
        }

    def __repr__(self) -> str:  # no store read: the run's own counts
        r = self.run
        return (f"RunResult(state={r.state!r}, fits={r.n_planned}, resumed={r.n_skipped}, "
                f"this_run={r.by_status}, fits_per_second={r.fits_per_second:.2f})")


def _as_specs(specs: ModelSpec | Sequence[ModelSpec]) -> list[ModelSpec]:
    if isinstance(specs, ModelSpec):
        return [specs]
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise SpecError(f"specs must be a ModelSpec or a list of them; got (specs={specs!r})")
    return list(specs)


def _split_columns(split_by: Any) -> list[str]:
    if split_by is None:
        return []
    split = [split_by] if isinstance(split_by, str) else split_by
    if not isinstance(split, Sequence) or not all(isinstance(c, str) for c in split):
        raise SpecError("split_by must be a column name or a list of column names; "
                        f"got (split_by={split_by!r})")
    return list(split)


def check_store_outside_data(data: Any, store: str | None) -> None:
    """Raise SpecError if the store lies inside the data folder: its result parts
    would be read as input on the next run."""
    if store is None or not isinstance(data, (str, os.PathLike)):
        return
    if lists_under(os.fspath(data), os.fspath(store)):
        where = ("(a glob lists '_' folders too)" if any(c in os.fspath(data) for c in "*?[")
                 else "(or in a folder whose name starts with '_' there)")
        raise SpecError(f"the store is inside the data folder, so its result files would "
                        f"be read as input data; put the store outside {data!r} {where}; "
                        f"got (store={store!r})")


def prepare(data: Any, specs: ModelSpec | Sequence[ModelSpec], split_by: Sequence[str] | str
            | None = None, filter: Any = None, engine: str | None = None,
            store: str | None = None) -> tuple[Source, Plan]:
    """Every plan-time check, no cluster and no fitting: (source, plan). ``engine`` is
    the run-wide override, which the planner's cost model takes into account; with
    ``store``, the store is checked against the data's location too."""
    spec_list = _as_specs(specs)
    split = _split_columns(split_by)
    check_store_outside_data(data, store)
    if store is not None:
        check_writable(store)
    hint: list[str] = list(split)
    for s in spec_list:
        if isinstance(s, ModelSpec):
            hint.extend(s.columns)
    src = open_source(data, filter=filter, columns_hint=hint)
    plan = make_plan(src, spec_list, split, engine)
    for f, why in src.bad_files.items():  # one line each, from every entry point
        log.warning("unreadable input file left out of the run: %s: %s", f, why)
    return src, plan


@contextlib.contextmanager
def _client(client: Any, address: str | None, workers: int | None, security: Any = None,
            memory_limit: str | None = None) -> Iterator[Any]:
    from distributed import Client

    if client is not None:
        yield client
        return
    if address:
        import dask

        # distributed.comm.timeouts.connect (default 30 s) bounds the wait for a scheduler.
        timeout = dask.config.get("distributed.comm.timeouts.connect", "30s")
        try:
            c = Client(address, security=security, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            from .errors import RunIncomplete

            raise RunIncomplete(f"cannot reach the Dask scheduler at {address!r}: {exc}"
                                ) from None
        try:
            yield c
        finally:
            c.close()
        return
    cluster = local_cluster(workers, memory_limit)
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _tables(summary: RunSummary, plan: Plan, store: Store | None,
            names: tuple[str, ...] = TABLES, fit_columns: Sequence[str] | None = None,
            rank: tuple[pa.Array, np.ndarray] | None = None) -> list[pd.DataFrame]:
    """The run's tables; in the job's order with ``rank`` (``_plan_rank``), else as
    read (a status count needs no order)."""
    if store is not None:
        # Only this job's parts and fits: a shared store may hold many other jobs' results.
        # A finished run committed every planned fit, so fewer means the store moved.
        ids, place = rank if rank is not None else (plan.fit_ids(), None)
        return store.run_tables(summary.parts or set(), ids, names, fit_columns,
                                expect=len(ids) if summary.state == "complete" else None,
                                rank=place)
    out = []
    for t in names:
        parts = summary.tables.get(t, [])
        if not parts:
            out.append(pd.DataFrame())
            continue
        tab = pa.concat_tables(parts)
        if rank is None:
            out.append(to_pandas(tab))
        else:
            tab, at = among(tab, rank[0])
            out.append(to_pandas(in_rank_order(tab, rank[1][at])))
    return out


def _plan_rank(plan: Plan) -> tuple[pa.Array, np.ndarray]:
    """Each fit's place in the job: slices in key order, each slice's specs as given."""
    n = max(len(plan.specs), 1)
    cols = [t.columns for t in plan.tasks]
    if not cols:
        return pa.array([], type=pa.string()), np.zeros(0, dtype=np.int64)
    return (pa.array([f for c in cols for f in c.fit_ids], type=pa.string()),
            np.concatenate([c.slices.astype(np.int64) * n + c.specs for c in cols]))


def fit_many(
    data: Any,
    specs: ModelSpec | Sequence[ModelSpec],
    split_by: Sequence[str] | str | None = None,
    store: str | None = None,
    client: Any = None,
    *,
    filter: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    engine: str | None = None,
    timeout: float | None = None,
    progress: bool | None = None,
    security: Any = None,
    memory_limit: str | None = None,
    options: RunOptions | None = None,
    retry_errors: bool = False,
) -> RunResult:
    """Fit every spec on every slice of ``data`` on a Dask cluster.

    ``data``: a DataFrame, or a Parquet file/folder/glob/hive tree/fsspec URL.
    ``filter``: pyarrow-style ``[[column, op, value], ...]`` (AND-ed).
    ``store``: a folder or URL for the results store; None keeps results in memory.
    With a store, the result's tables are read back from it when the run ends.
    ``client``/``scheduler``: an existing cluster; otherwise an embedded LocalCluster.
    Re-running with the same store resumes: only missing fits run. ``retry_errors``:
    also fit again the committed fits that failed for the run's sake (``FitTimeout``,
    ``WorkerCrash``, ``MemoryLimit``, ``DataError`` of an unreadable input file).
    """
    if engine is not None and engine not in ENGINES:
        raise SpecError(f"engine must be one of {list(ENGINES)}; got (engine={engine!r})")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not timeout > 0):
        raise SpecError(f"timeout must be a positive number of seconds; got (timeout={timeout!r})")
    _check_cluster_args(client, scheduler, workers, memory_limit, security)
    with long_lived_frozen():
        st = Store(store) if store is not None else None
        src, plan = prepare(data, specs, split_by, filter, engine, store)
        opts = options or RunOptions()
        opts.timeout = timeout if timeout is not None else opts.timeout
        opts.engine = engine or opts.engine
        opts.progress = progress if progress is not None else opts.progress
        if retry_errors:
            opts.retry_errors = RETRYABLE
        log.info("planned %d fits in %d tasks (%.2f s)", plan.n_fits, len(plan.tasks),
                 plan.plan_seconds)
        if opts.retry_errors:
            if st is None:
                raise SpecError("retry_errors refits the failed fits of a results store; "
                                "give store=; got (retry_errors=True, store=None)")
            retire_errors(plan, st, opts.retry_errors)
        resume = pending(plan, st)  # read once: it may read parts of an earlier packing
        if not resume.todo:  # a complete job: nothing to fit, no cluster to start
            summary = execute(plan, src, st, None, opts, resume)
        else:
            _check_shared(src, st, client)
            if client is None and scheduler is None and opts.no_workers_timeout is None:
                # The embedded cluster's workers restart within seconds, or never.
                opts.no_workers_timeout = 120.0
            with _client(client, scheduler, workers, security, memory_limit) as c:
                summary = execute(plan, src, st, c, opts, resume)
        result = RunResult(run=summary, plan=plan, store=st)
        if opts.read_back:
            result._read_all()
        return result


def _check_cluster_args(client: Any, scheduler: Any, workers: Any, memory_limit: Any,
                        security: Any = None) -> None:
    """Wrong cluster arguments fail here, before planning, not in Dask."""
    given = {k: v for k, v in (("workers", workers), ("memory_limit", memory_limit))
             if v is not None}
    if given and (client is not None or scheduler is not None):
        on = "client" if client is not None else "scheduler"
        k, v = next(iter(given.items()))
        raise SpecError(f"{k} sizes the embedded cluster; with {on}= the cluster is "
                        f"already there, sized by whoever started it, so {k} would be "
                        f"ignored; drop it; got ({on}=..., {k}={v!r})")
    if client is not None:
        from distributed import Client

        if not isinstance(client, Client):
            raise SpecError("client must be a distributed.Client; "
                            f"got (client={type(client).__name__})")
        return
    if scheduler is not None:
        if not isinstance(scheduler, str) or ":" not in scheduler:
            raise SpecError("scheduler must be an address such as 'tcp://host:8786'; "
                            f"got (scheduler={scheduler!r})")
        if scheduler.startswith("tls://") and security is None:
            from distributed.security import Security

            # Without certificates (here or in Dask's config) Dask fails deep in a
            # connect with a TypeError about ssl_context.
            if not Security().get_connection_args("client").get("ssl_context"):
                raise SpecError(
                    "a tls:// scheduler needs the client's certificates: pass security= "
                    "(distributed.security.Security), or --tls-ca-file, --tls-cert and "
                    "--tls-key on the CLI, or set them in Dask's config "
                    f"(distributed.comm.tls); got (scheduler={scheduler!r}, security=None)")
        return
    from .cluster import parse_cluster_config

    cfg = {"workers": workers, "memory_limit": memory_limit}
    parse_cluster_config({k: v for k, v in cfg.items() if v is not None}, source="fit_many")


def _check_shared(src: Source, store: Store | None, client: Any) -> None:
    """memory:// data or stores live in this process: workers in other processes would
    read nothing and write where nobody looks."""
    where = [(what, url) for what, fs, url in (
        ("data", src.fs, src.path), ("store", store.fs if store else None,
                                     store.url if store else None))
        if fs is not None and "memory" in protocols(fs)]
    if not where:
        return
    if client is not None:
        pids = client.run(os.getpid)
        if pids and set(pids.values()) == {os.getpid()}:  # threads of this process
            return
    what, url = where[0]
    raise SpecError(f"the {what} is in this process's memory (memory://), which Dask "
                    "workers in other processes cannot see; use a folder or a shared "
                    "filesystem, or a client whose workers run in this process "
                    f"(LocalCluster(processes=False)); got ({what}={url!r})")
