"""The Dask executor: submits a plan's tasks, streams outcomes, survives failures.

Statistics never happen here. Failure handling:

- ``KilledWorker`` on a multi-fit task: the task is split into single fits and
  resubmitted, so innocent fits that shared a worker with a poison slice succeed.
  On a single fit, it is committed as an ``error`` row (``WorkerCrash``, or
  ``MemoryLimit`` when the worker left a memory marker or its nanny reported a
  memory restart) once the fit itself was running on at least two of the workers
  that died; a fit that was only queued behind a poison one (Dask counts those
  too) is resubmitted instead, a bounded number of times.
- A future whose result was lost with its worker is recomputed by Dask; the
  executor waits for it again rather than reading a half-known state.
- A corrupt input file fails, as ``DataError`` rows naming the file, only the
  fits whose slices have rows in it; other tasks of the same load unit are
  resubmitted with that file left out. Workers report it in the task's outcome
  (``TaskOutcome.corrupt``) rather than raise it, so they log no traceback.
- A store write failure is retried, then fails the run (exit 3); nothing
  partial is visible because parts are staged and published atomically.
- Losing the scheduler, or a stop request (SIGTERM), ends the run as
  ``interrupted``/``failed`` with RunIncomplete (exit 3); a rerun resumes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError, RunIncomplete, StoreError, one_line
from .plan import LoadUnit, Plan, Task, task_key
from .single import versions
from .source import CorruptFile, RowGroup, Source
from .store import HEARTBEAT_SECONDS, SILENT_HEARTBEATS, Store
from .worker import (
    Keys,
    Packed,
    ScratchGone,
    SliceKeys,
    TaskOutcome,
    TaskPayload,
    UnitRead,
    failure_tables,
    forget_shuffled,
    key_column,
    key_units,
    keys_at,
    load_unit,
    partition,
    partition_to_store,
    piece,
    run_task,
    settle_worker_process,
)

__all__ = ["RETRYABLE", "RunOptions", "RunSummary", "execute", "local_cluster", "pending",
           "retire_errors"]

log = logging.getLogger(__name__)

_STORE_RETRIES = 2
_BYSTANDER_RETRIES = 3  # resubmissions of a task that a worker death hit while queued
_PARTITION_BYTES = 64 * 2**20  # input read by one shuffle step


@dataclass
class RunOptions:
    timeout: float | None = None
    engine: str | None = None
    progress: bool | None = None  # None: on when stderr is a TTY
    stop: threading.Event = field(default_factory=threading.Event)
    job: dict[str, Any] | None = None
    # Seconds with no worker connected before the run fails (None: wait, warning each
    # minute, as for a batch-queue cluster whose jobs have not started yet).
    no_workers_timeout: float | None = None
    # Read the job's tables back into the RunResult when the run ends. The CLI, which
    # needs only the status counts, does not: 10^6 fits' rows are ~1.2 GB.
    read_back: bool = True
    # Error types of committed fits to fit again (see ``RETRYABLE``); empty: none.
    retry_errors: tuple[str, ...] = ()


# Failures of the run, not of the model: a rerun may well fit these (a longer timeout,
# more memory, a repaired input file). Model errors are deterministic: not retried.
RETRYABLE = ("FitTimeout", "WorkerCrash", "MemoryLimit", "DataError")


@dataclass
class RunSummary:
    run_id: str
    state: str
    n_planned: int
    n_skipped: int  # already committed before this run
    n_run: int
    by_status: dict[str, int]
    bytes_read: int
    bytes_scan: int
    bytes_one_pass: int
    plan_seconds: float
    wall_seconds: float
    fit_seconds: float
    n_workers: int
    n_tasks: int
    n_split: int
    message: str = ""
    tables: dict[str, list[pa.Table]] = field(default_factory=dict)
    # Worker seconds summed over tasks, by phase (see TaskOutcome.phases); "task" is
    # their total, so task - fit_seconds is the workers' time outside fitting.
    task_seconds: dict[str, float] = field(default_factory=dict)
    # The store parts holding this run's fits (task keys also cover their split parts);
    # None without a store.
    parts: set[str] | None = None

    @property
    def fits_per_second(self) -> float:
        return self.n_run / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def overhead(self) -> float:
        """Wall time against per-fit time spread over the workers, minus one."""
        ideal = self.fit_seconds / max(self.n_workers, 1)
        return self.wall_seconds / ideal - 1.0 if ideal > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("tables", "parts")}
        d.update(fits_per_second=self.fits_per_second, overhead=self.overhead)
        return d


_FROZEN = {"depth": 0, "ours": False}
_FROZEN_LOCK = threading.Lock()


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Keep the objects alive at entry out of the cyclic collector's full passes.

    A run allocates a tuple or two per fit (plan items, keys, payloads), which triggers
    full collections that re-scan the whole driver heap: 0.3-0.5 s of CPU per 10^5
    fits, taken from the workers on a shared machine. The pre-existing heap (modules,
    the source's metadata, the caller's data) is frozen for the run and thawed after,
    unless the host application froze it itself. Nested and concurrent runs share one
    freeze."""
    with _FROZEN_LOCK:
        if _FROZEN["depth"] == 0:
            _FROZEN["ours"] = gc.get_freeze_count() == 0
            if _FROZEN["ours"]:
                gc.freeze()
        _FROZEN["depth"] += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _FROZEN["depth"] -= 1
            if _FROZEN["depth"] == 0 and _FROZEN["ours"]:
                gc.unfreeze()
                _FROZEN["ours"] = False


def local_cluster(workers: int | None = None, memory_limit: str | None = None) -> Any:
    """The embedded default: one single-threaded worker process per core, BLAS pinned."""
    from .cluster import ClusterConfig, make_cluster

    return make_cluster(ClusterConfig(kind="local", workers=workers, memory_limit=memory_limit))


def _now() -> str:
    # Microseconds: two runs of one store often start within a second, and their
    # manifests are ordered by this field.
    return datetime.now(UTC).isoformat(timespec="microseconds")


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if not enabled or total == 0:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # On stderr, where it was judged interactive: on stdout (rich's default) it drew
        # into `fit --format csv > file`, unseen, leaving a blank first line in the data.
        self.bar = Progress(TextColumn("fitting"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=True, console=Console(stderr=True))
        self.bar.start()
        self.tid = self.bar.add_task("fits", total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.tid, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Run:
    def __init__(self, plan: Plan, src: Source, store: Store | None, client: Any,
                 opts: RunOptions) -> None:
        self.plan, self.src, self.store, self.client, self.opts = plan, src, store, client, opts
        # The manifest's models, built once: it is rewritten at every heartbeat.
        self.spec_info = {sp.spec_id: {"name": sp.label, **sp.canonical()}
                          for sp in plan.specs}
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.by_status: dict[str, int] = {}
        self.bytes_read = 0
        self.fit_seconds = 0.0
        self.task_seconds: dict[str, float] = {}
        self.n_run = 0
        self.n_split = 0
        self.tables: dict[str, list[pa.Table]] = {"fits": [], "params": [], "variance": []}
        self.unit_refs: dict[int, int] = {}  # tasks of a unit not finished yet
        self.loads_seen: set[str] = set()
        self.unit_futures: dict[tuple[int, frozenset[str]], Any] = {}
        self.key_fields = plan.key_fields
        self.key_column: Keys | None = None  # see every_key
        self.store_failures: dict[str, int] = {}
        self.bad_files: dict[str, str] = {}  # input files found corrupt at fit time
        self.resubmits: dict[str, int] = {}  # task key -> resubmissions after KilledWorker
        self.n_loads = 0
        self.n_submitted = 0
        self.partitions: list[Any] = []
        self.partitions_bad: frozenset[str] = frozenset()
        self.n_shuffles = 0
        self.spread: list[str] = []  # see spread_over
        self.homes: dict[int, str] = {}  # unit -> the worker its tasks go to (home_units)
        self.home_cost: dict[str, float] = {}  # worker -> the planned ms homed on it
        self.unit_cost: dict[int, float] = {}  # unit -> its pending tasks' planned ms
        self.pinned: dict[Any, str] = {}  # future -> the worker it was dealt to
        self.n_workers = 1  # set by spread_over
        self.manifest_lock = threading.Lock()
        self.manifest_closed = False
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.started = _now()

    # -- payloads and submission
    def payload(self, task: Task) -> TaskPayload:
        return TaskPayload(
            task=task, keys=SliceKeys.of(_distinct(task.columns.slices), self.every_key()),
            specs={p: self.plan.specs[p] for p in _distinct(task.columns.specs).tolist()},
            split_by=self.plan.split_by, key_fields=self.key_fields, run_id=self.run_id,
            timeout=self.opts.timeout, engine=self.opts.engine)

    def every_key(self) -> Keys:
        """Every slice's key as workers get them (``key_column``), built once: tasks and
        loads take theirs by index."""
        if self.key_column is None:
            self.key_column = key_column([s.key for s in self.plan.slices])
        return self.key_column

    def read_in_task(self, unit: int) -> bool:
        """Whether the unit's only task left reads it itself; decided per call, as a task
        split after a worker loss gives the unit more tasks, which share one load."""
        return self.src.frame is None and not self.plan.shuffle and self.unit_refs.get(unit) == 1

    def unit_data(self, unit: int, priority: int = 0) -> Any:
        u = self.plan.units[unit]
        if self.read_in_task(unit):
            return Packed(UnitRead(self.src, self.readable(u), self.plan.columns,
                                   self.plan.split_by, keys_at(self.every_key(), u.slices)))
        # Cached per unit and per set of corrupt files left out of the reads.
        cache = (unit, frozenset(self.bad_files))
        if cache in self.unit_futures:
            return self.unit_futures[cache]
        keys = keys_at(self.every_key(), u.slices)
        if self.src.frame is not None:
            df, _ = self.src.read(self.plan.columns, split_by=self.plan.split_by)
            from .worker import Loaded, _restrict

            data = Loaded(_restrict(df, self.plan.split_by, keys), 0)
            fut = self.client.scatter(data, hash=False)
        elif self.plan.shuffle:
            if self.partitions_bad != frozenset(self.bad_files):
                self.start_shuffle()
            if self.store is not None:  # spilled to scratch files: memory stays bounded
                fut = {"unit": unit, "scratch": list(self.partitions)}  # see worker._merge
            else:
                fut = [self.client.submit(piece, p, unit, pure=False, priority=priority)
                       for p in self.partitions]
        else:
            self.n_loads += 1
            fut = self.client.submit(load_unit, self.src, self.readable(u), self.plan.columns,
                                     self.plan.split_by, Packed(keys), pure=False,
                                     priority=priority,
                                     key=f"mixedscale-load-{self.run_id}-{unit}-{self.n_loads}")
        self.unit_futures[cache] = fut
        return fut

    def readable(self, u: LoadUnit) -> list[RowGroup]:
        """The unit's row groups, less those of files found corrupt in this run."""
        rgs = self.src.row_groups
        return [rgs[i] for i in u.row_groups if rgs[i].file not in self.bad_files]

    def spread_over(self, workers: list[str]) -> None:
        """With fewer load units than workers, deal the first fit tasks round the workers.

        Dask sends a task to a worker holding its data, so every task of a unit would
        queue on the one worker that loaded it, the others idle until work stealing
        (which needs task durations) moves some: all of a short run. (Unless Dask
        deems the tasks root-ish, as distributed 2026.8 does for a group of over twice
        as many tasks as threads on fewer than 5 loads: then it queues them for the
        least busy worker, wherever their data is.) A loose
        restriction on each worker's first task makes the others fetch the unit at
        once; later tasks go where Dask finds the data and the least work. (Dealing
        every task round the workers left the worker that waited for the transfer
        finishing last, the other idle as long: 0.1-0.4 s of genes unsorted's ~2 s.)
        A shuffled run's tasks hold no data: see ``home_units``. Also records the worker
        count, which ``start_shuffle`` cuts its steps by."""
        self.n_workers = max(1, len(workers))
        if len(self.plan.units) < len(workers) and not self.plan.shuffle:
            self.spread = workers

    def home_units(self, workers: list[str], tasks: list[Task]) -> None:
        """Give each unit of a shuffle spilled to scratch files one worker for its tasks.

        Such a task holds no data, so Dask would hand it to whichever worker is free,
        and each worker would read (and regroup) every unit from scratch once it has
        run one task of it: two reads of each unit on two workers (tiny unsorted: 0.5-0.9
        s of worker time reading data; 0.15-0.3 s with a home per unit, one read each).
        Units are homed in plan order on the worker with the least planned work
        so far, so each worker runs its units one after another. The restriction is
        loose: an idle worker still steals queued tasks (Dask counts no transfer for a
        task without data), at the cost of one read of that unit."""
        if not (self.plan.shuffle and self.store is not None) or len(workers) < 2:
            return
        cost: dict[int, float] = {}
        for t in tasks:
            cost[t.unit] = cost.get(t.unit, 0.0) + t.cost_ms
        if len(cost) < 2:  # one unit: every worker reads it once either way
            return
        self.unit_cost, self.home_cost = cost, dict.fromkeys(workers, 0.0)
        for u, c in cost.items():
            self.rehome(u, c)

    def rehome(self, unit: int, cost: float) -> None:
        w = min(self.home_cost, key=self.home_cost.__getitem__)  # ties: the first listed
        self.homes[unit] = w
        self.home_cost[w] += cost

    def submit(self, task: Task) -> Any:
        # Plan order is the run order: the planner puts small tasks last, so the
        # workers finish together. Dask otherwise picks freely among ready tasks.
        self.n_submitted += 1
        priority = -self.n_submitted
        data = self.unit_data(task.unit, priority + 1)  # a unit's load runs before its fits
        worker = self.homes.get(task.unit)
        if worker is None and self.n_submitted <= len(self.spread):  # one each, then Dask
            worker = self.spread[self.n_submitted % len(self.spread)]  # places them
        where: dict[str, Any] = ({"workers": [worker], "allow_other_workers": True}
                                 if worker is not None else {})
        fut = self.client.submit(run_marked, Packed(self.payload(task)), data, self.store,
                                 pure=False,
                                 priority=priority,
                                 key=f"mixedscale-fit-{task.key}-{uuid.uuid4().hex[:6]}",
                                 **where)
        if worker is not None:
            self.pinned[fut] = worker
        return fut

    def orphans(self, alive: set[str]) -> list[Any]:
        """The pending futures dealt to a worker that has left (``spread_over``).

        Such a task can wait forever: when no worker is running as Dask reschedules it,
        it goes to ``no-worker``, and the scheduler (distributed 2026.8) then offers it
        only to workers its restriction names, ``allow_other_workers`` or not, so not to
        the restarted workers, which have new addresses. A run on workers that all died
        at once hung so (the continuous-chaos test: 1 run in 6 here, and in CI). The
        caller resubmits these, unpinned or to their unit's new home (``home_units``):
        a copy that runs anyway commits the same part, and loses."""
        # A finished one stays until handled: if its result dies with a worker, Dask
        # recomputes it under the same restriction, and the next look resubmits it.
        gone = [f for f, w in self.pinned.items() if w not in alive and not f.done()]
        for f in gone:
            del self.pinned[f]
        if gone:
            self.spread = []  # workers come and go: deal no more tasks to named ones
        left = [u for u, w in self.homes.items() if w not in alive]
        if left and alive:  # a new home on a live worker, so a unit's tasks stay together
            self.home_cost = {w: self.home_cost.get(w, 0.0) for w in sorted(alive)}
            for u in left:
                self.rehome(u, self.unit_cost.get(u, 0.0))
        elif left:  # no worker at all: Dask places them as workers come back
            self.homes = {}
        return gone

    def starts(self, task: Task) -> int:
        """How many times ``task`` started running in this run (see ``run_marked``)."""
        if self.store is None:
            return 0
        try:
            return len(self.store.fs.ls(_start_dir(self.store, self.run_id, task.key),
                                        detail=False))
        except (FileNotFoundError, OSError):
            return 0

    def slice_files(self, slice_index: int) -> set[str]:
        rgs = self.src.row_groups
        return {rgs[j].file for j in self.plan.slices[slice_index].row_groups if j < len(rgs)}

    def expect(self, tasks: list[Task]) -> None:
        for t in tasks:
            self.unit_refs[t.unit] = self.unit_refs.get(t.unit, 0) + 1

    def release(self, task: Task) -> None:
        """Drop a unit's loaded data once its last task is done, so workers free it."""
        self.unit_refs[task.unit] -= 1
        if self.unit_refs[task.unit] == 0:
            for k in [k for k in self.unit_futures if k[0] == task.unit]:
                self.unit_futures.pop(k, None)

    def start_shuffle(self) -> None:
        slices = self.plan.slices
        key_unit = Packed(key_units([slices[i].key for u in self.plan.units for i in u.slices],
                                    [u.index for u in self.plan.units for _ in u.slices]))
        self.partitions_bad = frozenset(self.bad_files)
        batches = _shuffle_steps([rg for rg in self.src.row_groups
                                  if rg.file not in self.bad_files], self.n_workers)
        if self.store is not None:
            self.n_shuffles += 1
            folder = self.shuffle_folder()
            self.partitions = [
                self.client.submit(partition_to_store, self.src, b, self.plan.columns,
                                   self.plan.split_by, key_unit, self.store, folder, i,
                                   pure=False) for i, b in enumerate(batches)]
        else:
            self.partitions = [
                self.client.submit(partition, self.src, b, self.plan.columns,
                                   self.plan.split_by, key_unit, pure=False) for b in batches]

    def shuffle_folder(self, n: int | None = None) -> str:
        return Store.shuffle_name(self.run_id, self.n_shuffles if n is None else n)

    # -- outcomes
    def commit_failure(self, task: Task, etype: str, msg: str) -> None:
        tables = failure_tables(self.payload(task), etype, msg)
        if self.store is not None:
            self.store.publish(task.key, tables)
        else:
            for k, t in tables.items():
                self.tables[k].append(t)
        self.account_status({"error": len(task.items)}, len(task.items))

    def account_status(self, by_status: dict[str, int], n: int) -> None:
        for k, v in by_status.items():
            self.by_status[k] = self.by_status.get(k, 0) + v
        self.n_run += n

    def oom_marker(self, task: Task, worker: str | None = None) -> bool:
        """Did ``task`` die of memory? The worker's own marker, else its nanny's report."""
        if self.store is not None and self.store.fs.exists(
                "/".join([self.store.marker_dir(self.run_id, "oom"), task.key])):
            return True
        if worker is None or self.client is None:
            return False
        try:  # the nanny logs this event just before it terminates the worker
            events = self.client.get_events("worker-restart-memory")
        except (OSError, TimeoutError, ValueError):
            return False
        # Only this run's events: a restarted worker may reuse a fixed address.
        return any(isinstance(e, dict) and e.get("worker") == worker
                   and float(ts) >= self.wall0 - 5 for ts, e in events)

    def cleanup(self) -> None:
        """Remove this run's per-task markers (start and memory) and shuffle scratch."""
        if self.store is None:
            return
        shuffles = [self.store.path("_tmp", self.shuffle_folder(n))
                    for n in range(1, self.n_shuffles + 1)]
        if shuffles and self.client is not None and self.client.status == "running":
            try:  # the workers' cached shuffled unit (see worker._merge)
                self.client.run(forget_shuffled)
            except (OSError, TimeoutError, ValueError) as exc:
                log.debug("could not clear cached shuffled units: %s", exc)
        for d in (_start_root(self.store, self.run_id),
                  self.store.marker_dir(self.run_id, "oom"), *shuffles):
            try:
                if self.store.fs.exists(d):
                    self.store.fs.rm(d, recursive=True)
            except OSError as exc:
                log.debug("could not remove %s: %s", d, exc)

    def sweep(self) -> None:
        """``Store.sweep`` for this run; housekeeping never stops a run."""
        if self.store is None:
            return
        try:
            swept = self.store.sweep(own_run=self.run_id)
        except Exception as exc:
            log.warning("could not sweep leftovers of earlier runs in %s: %s",
                        self.store.url, exc)
            return
        if swept:
            log.info("removed %d leftovers of earlier runs from %s (scratch, markers, "
                     "staged files)", len(swept), self.store.url)

    def manifest(self, state: str, plan_info: dict[str, Any], message: str = "",
                 n_skipped: int = 0) -> bool:
        """Write this run's manifest (also its heartbeat, from ``_Heartbeat``'s thread);
        False if the write failed. Once a final state is written, "running" is not."""
        if self.store is None:
            return True
        with self.manifest_lock:
            if self.manifest_closed:
                return True
            ok = self.store.write_manifest(self.run_id, {
                "run_id": self.run_id, "state": state, "started": self.started,
                "ended": _now() if state != "running" else None, "job": self.opts.job,
                # What a fit row's run_id points to: its data, and its models by spec_id.
                "data": self.src.path if self.src.frame is None else "<DataFrame>",
                "split_by": list(self.plan.split_by),
                "specs": self.spec_info,
                "versions": versions(), "plan": plan_info, "n_planned": self.plan.n_fits,
                "n_skipped": n_skipped, "n_run": self.n_run,
                "by_status": dict(self.by_status),  # a copy: the main thread updates it
                "bytes_read": self.bytes_read + self.plan.bytes_scan,
                "wall_seconds": time.perf_counter() - self.t0, "message": message,
                "pid": os.getpid(), "host": socket.gethostname(),
                "heartbeat_seconds": HEARTBEAT_SECONDS if state == "running" else None,
            })
            self.manifest_closed = state != "running"
            return ok


class Resume(NamedTuple):
    todo: list[Task]  # tasks still to run
    n_skipped: int  # fits already committed
    parts: set[str] | None  # store parts holding this plan's fits (None: no store)


def retire_errors(plan: Plan, store: Store, types: Sequence[str]) -> int:
    """Move aside the committed tasks holding this plan's fits whose error_type is in
    ``types``, so ``pending`` counts their fits as missing and the run fits them
    again: every fit of such a task (its parts are moved whole, never edited, so a
    crash cannot leave a fit twice or half its rows). A part that also holds fits
    of other jobs is left alone, with a warning: they would be gone until those jobs
    rerun. Returns the number of error fits to be refitted."""
    wanted = pa.array(sorted(set(types)), type=pa.string())
    planned = pa.array(plan.fit_ids(), type=pa.string())
    n = 0
    for name, (ids, etypes) in sorted(store.part_errors(sorted(store.committed_parts()))
                                      .items()):
        hit = pc.and_(pc.is_in(etypes, value_set=wanted), pc.is_in(ids, value_set=planned))
        k = int(pc.sum(pc.cast(hit, pa.int64())).as_py() or 0)
        if not k:
            continue
        if not pc.all(pc.is_in(ids, value_set=planned)).as_py():
            log.warning("store part %s holds fits of other jobs too; its %d error fits are "
                        "not retried (rerun the job that wrote it with retry_errors)", name, k)
            continue
        if store.retire(name):
            n += k
    if n:
        log.info("refitting %d error fits of earlier runs (%s)", n, ", ".join(types))
    return n


def pending(plan: Plan, store: Store | None) -> Resume:
    """What is left to run of ``plan``, resuming by fit id.

    A committed task is skipped whole, and a split one resumes split. Parts written
    under other task keys (an earlier packing: another planner version or cost model,
    or a smaller spec grid) are matched by the fit ids they hold, and the tasks that
    share fits with them shrink to their missing fits, named by what they hold. Only
    those parts' fit_id columns are read, and only when such parts exist.

    Those parts (other jobs' fits) must hold the plan's split columns, if at all, as
    types that read together with the plan's: else SpecError, before any work. (Its
    own parts, named by its fit ids, were written with the same keys.)

    A committed part that cannot be read (its fit ids, or its task's params or
    variance footers: ``Store.unreadable_parts``) would be skipped forever and fail
    every reader: it is set aside (``Store.set_aside``) and its fits count as missing.
    This plan's own parts are checked thus; other parts as their fit ids are read, and
    those holding planned fits by their params and variance footers too."""
    if store is None:
        return Resume(list(plan.tasks), 0, None)
    done = store.committed_parts()
    keys = {t.key for t in plan.tasks}
    parts = {d for d in done if d.partition("-f")[0] in keys}
    foreign = sorted(done - parts)
    bad = store.unreadable_parts(sorted(parts))
    done_ids: set[str] = set()
    if foreign:
        planned = pa.array(plan.fit_ids(), type=pa.string())
        for name, ids in store.part_fit_ids(foreign, unreadable=bad).items():
            hit = ids.filter(pc.is_in(ids, value_set=planned))
            if not len(hit):
                continue
            # Its fits count only with their rows: params and variance footers checked
            # as for this plan's own parts (an earlier packing's damage was kept forever).
            why = store.side_problem(name)
            if why is not None:
                bad[name] = why
                continue
            parts.add(name)
            done_ids.update(hit.to_pylist())
    for name, why in sorted(bad.items()):
        store.set_aside(name, why)
    done -= bad.keys()
    parts -= bad.keys()
    # Other jobs' readable parts (their schemas were read with their fit ids above).
    store.check_split_types(plan.key_fields, [n for n in foreign if n not in bad])
    split = {d.partition("-f")[0] for d in done if "-f" in d}  # tasks split into fits
    todo: list[Task] = []
    skipped = 0
    for t in plan.tasks:
        if t.key in done:
            skipped += len(t.items)
            continue
        if t.key in split:
            for it in t.items:
                s = t.single(it)
                if s.key in done or it.fit_id in done_ids:
                    skipped += 1
                else:
                    todo.append(s)
            continue
        if done_ids:
            left = tuple(it for it in t.items if it.fit_id not in done_ids)
            skipped += len(t.items) - len(left)
            if not left:
                continue
            if len(left) < len(t.items):
                t = Task(key=task_key([it.fit_id for it in left]), unit=t.unit, items=left,
                         cost_ms=t.cost_ms * len(left) / len(t.items))
        todo.append(t)
    return Resume(todo, skipped, parts)


def execute(plan: Plan, src: Source, store: Store | None, client: Any, opts: RunOptions,
            resume: Resume | None = None) -> RunSummary:
    """Run every pending task of ``plan`` on ``client``; raise RunIncomplete if cut short.

    ``resume``: ``pending(plan, store)`` if the caller already has it."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    run = _Run(plan, src, store, client, opts)
    if store is not None:
        store.init()
    todo, n_skipped, parts = resume if resume is not None else pending(plan, store)
    info = plan.describe()
    if not run.manifest("running", info, n_skipped=n_skipped) and todo:
        # A store that cannot take a small JSON file (full, read-only) would fail every
        # commit after the fits were made: stop before any work.
        raise RunIncomplete(f"cannot write to the store {store.url if store else ''!r} (see "
                            "the error above; a full disk or no permission); nothing was "
                            "fitted; fix it and rerun the job")
    beat = _Heartbeat(lambda: run.manifest("running", info, n_skipped=n_skipped),
                      HEARTBEAT_SECONDS if store is not None else None)
    run.sweep()  # after our own manifest: the store's clock for silent runs
    workers = _workers(client) if client is not None else []
    n_workers = max(1, len(workers)) if client is not None else 0
    run.spread_over(workers)
    run.home_units(workers, todo)
    if plan.shuffle and not run.homes:
        todo = by_unit(todo)
    window = max(8 * n_workers, 32)
    # Packing fit payloads holds the GIL, which the client's and the embedded scheduler's
    # event loop need to send tasks out: submitting every payload first held the
    # workers idle for 0.15-0.3 s on tiny. So each worker's first load goes out first,
    # then one task per worker, then a moment for the loop to send them.
    first = n_workers
    enabled = sys.stderr.isatty() if opts.progress is None else opts.progress
    bar = _Progress(sum(len(t.items) for t in todo), enabled)
    queue = list(reversed(todo))
    run.expect(todo)
    inflight: dict[Any, Task] = {}
    watch = _WorkerWatch(client, opts.no_workers_timeout)
    ac = as_completed(loop=client.loop) if todo else None
    state, message = "complete", ""
    if plan.shuffle and todo:
        run.start_shuffle()
    beat.start()
    try:
        if todo and not plan.shuffle:
            for u in list(dict.fromkeys(t.unit for t in todo))[:n_workers]:
                if not run.read_in_task(u):  # else its task reads it: nothing to send yet
                    run.unit_data(u)
        while queue or inflight:
            if opts.stop.is_set():
                raise RunIncomplete("interrupted: stopped submitting on request; "
                                    "rerun the job to resume")
            while queue and len(inflight) < (first or window):
                task = queue.pop()
                fut = run.submit(task)
                inflight[fut] = task
                if ac is not None:
                    ac.add(fut)
            batch = ac.next_batch(block=False) if ac is not None else []
            if first:
                first = 0
                if not batch:
                    _wait_for_results(ac, 0.02)
                    continue
            if not batch:
                if client.status not in ("running", "connecting"):
                    raise RunIncomplete(_lost_scheduler(client, f"client {client.status}"))
                alive = watch.check()
                if alive is not None and run.pinned:
                    for fut in run.orphans(alive):
                        log.info("task %s was dealt to a worker that has left; "
                                 "resubmitting it", inflight[fut].key)
                        queue.append(inflight.pop(fut))
                        fut.cancel()
                _wait_for_results(ac)
                continue
            for fut in batch:
                if fut not in inflight:  # an orphan resubmitted (see _Run.orphans)
                    continue
                task = inflight[fut]
                if not _handle(run, fut, task, queue, bar, FutureCancelledError):
                    # Its result was lost with a worker and Dask is recomputing it.
                    assert ac is not None
                    ac.add(fut)
                    continue
                del inflight[fut]
                run.pinned.pop(fut, None)  # else its result stays held on the worker
                run.release(task)
                del fut
    except RunIncomplete as exc:
        state, message = ("interrupted" if opts.stop.is_set() else "failed"), str(exc)
        for fut in inflight:
            fut.cancel()
        raise
    except (OSError, TimeoutError) as exc:
        state = "failed"
        if (client is not None and client.status != "running") or _is_comm_error(exc):
            message = _lost_scheduler(client, f"{type(exc).__name__}: {exc}")
        else:
            message = f"infrastructure failure: {type(exc).__name__}: {exc}"
        raise RunIncomplete(message) from exc
    except (KeyboardInterrupt, SystemExit):  # SystemExit: a library's signal handler
        state, message = "interrupted", ("interrupted by the user; rerun the job to resume "
                                          "(committed fits are kept)")
        raise RunIncomplete(message) from None
    except BaseException as exc:  # a bug, or a failure not foreseen: never "complete"
        state, message = "failed", f"{type(exc).__name__}: {one_line(exc)}"
        raise
    finally:
        beat.stop()
        bar.close()
        run.cleanup()
        run.manifest(state, info, message, n_skipped=n_skipped)
        if todo:  # a resumed job usually follows a dead run: sweep what died meanwhile
            run.sweep()
    return RunSummary(
        run_id=run.run_id, state=state, n_planned=plan.n_fits, n_skipped=n_skipped,
        n_run=run.n_run, by_status=run.by_status, bytes_read=run.bytes_read + plan.bytes_scan,
        bytes_scan=plan.bytes_scan, bytes_one_pass=plan.bytes_one_pass,
        plan_seconds=plan.plan_seconds, wall_seconds=time.perf_counter() - run.t0,
        fit_seconds=run.fit_seconds, n_workers=n_workers, n_tasks=len(todo),
        parts=None if parts is None else parts | {t.key for t in todo},
        n_split=run.n_split, message=message, tables=run.tables,
        task_seconds=dict(run.task_seconds))


def by_unit(tasks: list[Task]) -> list[Task]:
    """``tasks`` unit by unit, each unit's in plan order. For a shuffle whose units have
    no home worker (``_Run.home_units``): a worker then takes whichever task is next, and
    it keeps one shuffled unit at a time (``worker._merge``), so the plan's last two
    units, listed alternately, would be read again at each switch."""
    return sorted(tasks, key=lambda t: t.unit)


def _distinct(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` by a sort: numpy 2's hashing unique took 1 ms per 5,000 slice
    indices, 16x as long."""
    s = np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]] if s.size else s


class _Heartbeat:
    """Rewrites the run's "running" manifest every ``every`` seconds from a thread of
    its own, so a driver busy in one step (restarting workers, committing failures)
    still reads as alive to other runs' sweeps (``Store.sweep``)."""

    WARN_AFTER = 3  # failed beats in a row before saying so

    def __init__(self, write: Callable[[], bool], every: float | None) -> None:
        self.write, self.every = write, every
        self.done = threading.Event()
        self.failed = 0
        self.thread = threading.Thread(target=self._beat, name="mixedscale-heartbeat",
                                       daemon=True)

    def start(self) -> None:
        if self.every is not None:
            self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)  # a late beat is dropped anyway (_Run.manifest)

    def _beat(self) -> None:
        every = self.every or 0.0  # start() runs this thread only with an interval
        while not self.done.wait(every):
            try:
                ok = self.write()
            except Exception as exc:  # never let the heartbeat take the run down
                log.debug("heartbeat failed: %s", exc)
                ok = False
            self.failed = 0 if ok else self.failed + 1
            if self.failed == self.WARN_AFTER:
                log.warning(
                    "could not write this run's manifest (its heartbeat) %d times in a "
                    "row; after %d missed beats other runs on this store take it for "
                    "dead and remove its shuffle scratch", self.failed, SILENT_HEARTBEATS)


class _WorkerWatch:
    """Notices a cluster left with no workers while fits are pending (e.g. every
    worker process gone for good): fail after ``timeout`` s, or warn each minute."""

    INTERVAL = 2.0

    def __init__(self, client: Any, timeout: float | None) -> None:
        self.client, self.timeout = client, timeout
        self.next_check = time.monotonic() + self.INTERVAL
        self.none_since: float | None = None
        self.warned = 0.0

    def check(self) -> set[str] | None:
        """The workers' addresses, when it is time to look again; else None."""
        now = time.monotonic()
        if now < self.next_check:
            return None
        self.next_check = now + self.INTERVAL
        try:
            alive = set(_workers(self.client))
        except (OSError, TimeoutError):
            return None  # the scheduler itself: the main loop reports a lost one
        if alive:
            self.none_since = None
            return alive
        self.none_since = self.none_since or now
        idle = now - self.none_since
        if self.timeout is not None and idle > self.timeout:
            raise RunIncomplete(
                f"no Dask workers for {idle:.0f} s while fits are pending: every worker "
                "process is gone; rerun the job to resume (committed fits are kept)")
        if idle >= 30.0 and now - self.warned >= 60.0:  # not for a nanny's quick restart
            self.warned = now
            log.warning("no Dask workers connected for %.0f s; waiting for workers", idle)
        return alive


def _workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info(n_workers=-1).get("workers", {}))


def _wait_for_results(ac: Any, timeout: float = 0.1) -> None:
    """Block until a future finishes (or ``timeout``, to check for a stop request and a
    lost scheduler). Waking on Dask's notification, not a polling sleep, keeps the run's
    end and each refill of the submission window from waiting out a tick."""
    cond = getattr(ac, "thread_condition", None)
    if cond is None:  # an as_completed without it (another distributed version): poll
        time.sleep(0.01)
        return
    with cond:  # as_completed queues a result, then notifies under this lock
        if not ac.has_ready():
            cond.wait(timeout)


def _is_comm_error(exc: BaseException) -> bool:
    try:
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, CommClosedError)


def _lost_scheduler(client: Any, why: str) -> str:
    try:
        where = f" at {client.scheduler.address}"
    except AttributeError:
        where = ""
    return (f"lost the Dask scheduler{where} ({why}); rerun the job against a live "
            "scheduler to resume: committed fits are kept")


def _handle(run: _Run, fut: Any, task: Task, queue: list[Task], bar: _Progress,
            cancelled: type[BaseException]) -> bool:
    """Account for one finished future. False: it is being recomputed, wait for it again."""
    from distributed import KilledWorker

    if fut.status == "finished":
        try:
            out: TaskOutcome | None = fut.result()
        except cancelled:
            raise RunIncomplete(_lost_scheduler(run.client, "a result was cancelled")) from None
        except (OSError, TimeoutError):
            raise
        except Exception as err:  # its worker died after finishing and the recompute failed
            out = None
            if fut.status == "finished":  # the result itself is unreadable: a bug
                log.error("task %s: unreadable result: %s: %s", task.key,
                          type(err).__name__, err)
                run.commit_failure(task, f"InternalError.{type(err).__name__}", str(err))
                bar.advance(len(task.items))
                return True
        if out is not None and out.corrupt is not None:  # its data met a corrupt file
            _corrupt(run, task, out.corrupt, queue, bar)
            return True
        if out is not None:
            run.account_status(out.by_status, out.n_fits)
            run.fit_seconds += out.fit_seconds
            run.task_seconds["task"] = run.task_seconds.get("task", 0.0) + out.wall_seconds
            for k, v in out.phases.items():
                run.task_seconds[k] = run.task_seconds.get(k, 0.0) + v
            for token, nb in out.loads.items():
                if token not in run.loads_seen:
                    run.loads_seen.add(token)
                    run.bytes_read += nb
            if out.tables is not None:
                for k, t in out.tables.items():
                    run.tables[k].append(t)
            if out.timed_out and out.worker:
                _restart(run.client, out.worker)
            bar.advance(out.n_fits)
            return True
    if fut.status == "cancelled":
        raise RunIncomplete(_lost_scheduler(run.client, "its tasks were cancelled"))
    if fut.status != "error":  # lost with its worker, rescheduled: not done yet
        return False
    exc = fut.exception()
    if isinstance(exc, cancelled):
        raise RunIncomplete(_lost_scheduler(run.client, f"tasks were cancelled: {exc}"))
    if isinstance(exc, KilledWorker):
        _killed(run, task, exc, queue, bar)
        return True
    if isinstance(exc, CorruptFile):
        _corrupt(run, task, exc, queue, bar)
        return True
    if isinstance(exc, DataError):
        run.commit_failure(task, "DataError", str(exc))
        bar.advance(len(task.items))
        return True
    if isinstance(exc, ScratchGone):  # retrying cannot bring it back
        raise RunIncomplete(str(exc))
    if isinstance(exc, (StoreError, OSError)):
        n = run.store_failures.get(task.key, 0) + 1
        run.store_failures[task.key] = n
        if n <= _STORE_RETRIES:
            log.warning("store write for task %s failed (%s); retrying", task.key, exc)
            run.expect([task])
            queue.append(task)
            return True
        raise RunIncomplete(f"store writes keep failing: {exc}")
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise RunIncomplete(f"worker interrupted: {exc}")
    # An unexpected exception is a bug in mixedscale; keep the run going and say so.
    log.error("task %s raised %s: %s", task.key, type(exc).__name__, exc)
    run.commit_failure(task, f"InternalError.{type(exc).__name__}", str(exc))
    bar.advance(len(task.items))
    return True


def _killed(run: _Run, task: Task, exc: Any, queue: list[Task], bar: _Progress) -> None:
    """KilledWorker: every worker that held ``task`` died. Was the task the cause?

    Dask counts a death against every task assigned to the worker, including
    ones queued behind the task that killed it, so a task that never (or only
    once) started running on a dying worker is resubmitted as it is.
    """
    starts = run.starts(task)
    n = run.resubmits.get(task.key, 0)
    if run.store is not None and starts < (1 if len(task.items) > 1 else 2) \
            and n < _BYSTANDER_RETRIES:
        log.info("task %s was queued on workers that died; resubmitting it", task.key)
        run.resubmits[task.key] = n + 1
        run.expect([task])
        queue.append(task)
        return
    if len(task.items) > 1:
        log.warning("task %s lost its worker repeatedly; retrying its %d fits one by one",
                    task.key, len(task.items))
        run.n_split += 1
        singles = [task.single(it) for it in task.items]
        run.expect(singles)
        queue.extend(singles)
        return
    last = getattr(getattr(exc, "last_worker", None), "address", None)
    if run.oom_marker(task, last):
        run.commit_failure(task, "MemoryLimit", "the fit exceeded the worker's memory "
                           "limit and the worker was restarted")
    else:
        run.commit_failure(task, "WorkerCrash", "the worker died on every attempt at "
                           f"this fit ({exc})")
    bar.advance(len(task.items))


def _corrupt(run: _Run, task: Task, exc: CorruptFile, queue: list[Task], bar: _Progress
             ) -> None:
    """A load failed on a corrupt file: fail the fits that need it, rerun the others."""
    if exc.file not in run.bad_files:
        log.warning("input file %s is unreadable (%s); its slices fail, others proceed",
                    exc.file, exc)
        run.bad_files[exc.file] = str(exc)
    bad = set(run.bad_files)
    hit = [it for it in task.items if run.slice_files(it.slice) & bad]
    if not hit:  # another file of the unit was bad: reload without it
        run.expect([task])
        queue.append(task)
        return
    if len(hit) == len(task.items):
        run.commit_failure(task, "DataError", _bad_files_message(run, hit[0]))
        bar.advance(len(task.items))
        return
    run.n_split += 1
    for it in task.items:
        single = task.single(it)
        if it in hit:
            run.commit_failure(single, "DataError", _bad_files_message(run, it))
            bar.advance(1)
        else:
            run.expect([single])
            queue.append(single)


def _bad_files_message(run: _Run, item: Any) -> str:
    files = sorted(run.slice_files(item.slice) & set(run.bad_files))
    return "; ".join(run.bad_files[f] for f in files)


def _start_root(store: Store, run_id: str) -> str:
    return store.marker_dir(run_id, "started")


def _start_dir(store: Store, run_id: str, task_key: str) -> str:
    return "/".join([_start_root(store, run_id), task_key])


def _shuffle_steps(rgs: list[RowGroup], n_workers: int) -> list[list[RowGroup]]:
    """Consecutive row groups cut into shuffle steps of about equal bytes, at most
    ``_PARTITION_BYTES`` each, in a multiple of ``n_workers`` steps: no fit can start
    before every step is done, so one step per worker, not one for the whole input
    (which left the other worker idle 1.2 s on tiny)."""
    if not rgs:
        return []
    sizes = np.array([max(rg.nbytes, 1) for rg in rgs], dtype=float)
    total = float(sizes.sum())
    per = n_workers * max(1, int(np.ceil(total / (_PARTITION_BYTES * n_workers))))
    k = min(len(rgs), per)
    # Each row group goes to the step its midpoint falls in.
    step = np.minimum(((np.cumsum(sizes) - sizes / 2) / total * k).astype(np.int64), k - 1)
    return [[rgs[i] for i in np.flatnonzero(step == j)] for j in range(k)
            if (step == j).any()]


def run_marked(packed: Packed[TaskPayload], data: Any, store: Store | None) -> TaskOutcome:
    """``run_task``, after leaving a marker that this attempt started running.

    The executor counts the markers when Dask reports KilledWorker, to tell a task
    that was running when its workers died from one that was only queued there.
    """
    settle_worker_process()  # before unpickling the payload (its items and keys)
    payload = packed.unpack()
    if store is not None:
        d = _start_dir(store, payload.run_id, payload.task.key)
        try:
            store.fs.makedirs(d, exist_ok=True)
            with store.fs.open(f"{d}/{uuid.uuid4().hex}", "wb") as fh:
                fh.write(str(os.getpid()).encode())
        except OSError as exc:  # only a diagnosis aid: never fail the task for it
            log.debug("could not write start marker in %s: %s", d, exc)
    return run_task(payload, data, store)


def _restart(client: Any, worker: str) -> None:
    """Reclaim a worker whose abandoned (timed-out) fit thread may still be running."""
    try:
        client.restart_workers([worker], timeout=60, raise_for_error=False)
    except (OSError, TimeoutError, ValueError) as exc:
        log.warning("could not restart worker %s: %s", worker, exc)

