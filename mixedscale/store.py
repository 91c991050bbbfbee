"""The Parquet results store.

Layout::

    STORE/fits/part-<task>.parquet      one row per fit (the commit marker)
    STORE/params/part-<task>.parquet    fixed effects
    STORE/variance/part-<task>.parquet  variance components
    STORE/_runs/<run_id>.json           one manifest per run
    STORE/_runs/<run_id>.started/       task markers while the run lasts
    STORE/_tmp/                         staging and shuffle scratch; ignored by readers
    STORE/_corrupt/<table>/             unreadable parts a rerun set aside; ignored by readers
    STORE/_retried/<table>/             parts of tasks a rerun refitted (retry_errors); ditto

A task's three part files share one deterministic name derived from the fit
ids it holds. They are staged under ``_tmp`` and published without clobbering
(``os.link`` on local disks, so a second writer of the same task loses
cleanly); ``fits`` is published last, so a task counts as done exactly when
its fits part exists, and readers only join params/variance rows whose fit_id
is committed in ``fits``. A committed part found unreadable on resume (``pending``)
is moved to ``_corrupt`` with its task's other parts, and its fits are refitted;
parts are moved whole, never edited, as are those of tasks whose failed fits a rerun
retries (``executor.retire_errors``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, overload

import fsspec
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import SpecError, StoreError, StoreUnusable, one_line

__all__ = ["FIT_SCHEMA", "Store", "open_store"]

log = logging.getLogger(__name__)

TABLES = ("fits", "params", "variance")
CORRUPT = "_corrupt"  # where a rerun sets unreadable committed parts aside
RETRIED = "_retried"  # where a rerun retrying error fits moves their tasks' parts
_COMPRESSION = "snappy"  # Parquet's common default: about twice as fast to write as zstd


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Text columns other than fit_id: dictionary-encoding unique ids, floats and lists
    was most of a part's write time and made files no smaller."""
    return [f.name for f in schema
            if f.name != "fit_id" and (pa.types.is_string(f.type)
                                       or pa.types.is_large_string(f.type))]

_ATTEMPT = pa.struct([
    ("engine", pa.string()), ("method", pa.string()), ("llf", pa.float64()),
    ("converged", pa.bool_()), ("grad_max", pa.float64()), ("hessian_pd", pa.bool_()),
    ("n_evals", pa.int64()), ("seconds", pa.float64()), ("message", pa.string()),
])
FIT_SCHEMA = pa.schema([
    ("spec_name", pa.string()), ("status", pa.string()), ("converged", pa.bool_()),
    ("singular", pa.bool_()), ("llf", pa.float64()), ("aic", pa.float64()),
    ("bic", pa.float64()), ("scale", pa.float64()), ("n_obs", pa.int64()),
    ("n_dropped", pa.int64()), ("n_groups", pa.int64()), ("group_size_min", pa.int64()),
    ("group_size_mean", pa.float64()), ("group_size_max", pa.int64()), ("engine", pa.string()),
    ("method", pa.string()), ("n_attempts", pa.int64()), ("attempts", pa.list_(_ATTEMPT)),
    ("grad_max", pa.float64()), ("hessian_pd", pa.bool_()), ("theta", pa.list_(pa.float64())),
    ("warnings", pa.list_(pa.string())), ("error_type", pa.string()),
    ("error_message", pa.string()), ("fit_seconds", pa.float64()),
    ("mixedscale_version", pa.string()), ("statsmodels_version", pa.string()),
    ("numpy_version", pa.string()), ("scipy_version", pa.string()),
    ("run_id", pa.string()),  # the run that committed it: STORE/_runs/<run_id>.json
])
PARAM_SCHEMA = pa.schema([
    ("term", pa.string()), ("estimate", pa.float64()), ("std_error", pa.float64()),
    ("statistic", pa.float64()), ("p_value", pa.float64()), ("conf_low", pa.float64()),
    ("conf_high", pa.float64()),
])
VARIANCE_SCHEMA = pa.schema([
    ("group", pa.string()), ("term1", pa.string()), ("term2", pa.string()),
    ("kind", pa.string()), ("estimate", pa.float64()),
])
BODY = {"fits": FIT_SCHEMA, "params": PARAM_SCHEMA, "variance": VARIANCE_SCHEMA}


# -- fault injection for the test suite (see worker._maybe_inject) ---------------------
FAULTS_ENV = "MIXEDSCALE_TEST_FAULTS"


def fault_rules(at: str) -> list[dict[str, Any]]:
    """The injected-fault rules for one point ("fit", "task_start", "publish")."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return []
    return [r for r in json.loads(raw) if r.get("at", "fit") == at]


def claim_fault(rule: dict[str, Any]) -> bool:
    """Should this rule fire now? Not if its ``while`` file is absent, nor if it is
    ``once`` and another process (or attempt) fired it already."""
    if rule.get("while") and not os.path.exists(str(rule["while"])):
        return False
    path = rule.get("once")
    if not path:
        return True
    try:
        fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


class _FailingWriter:
    """A file wrapper that fails like a full disk after ``limit`` bytes."""

    def __init__(self, fh: Any, limit: int) -> None:
        self.fh, self.limit, self.n = fh, limit, 0
        self.closed = False

    def write(self, b: Any) -> int:
        room = self.limit - self.n
        if len(b) > room:
            self.fh.write(bytes(memoryview(b)[:max(room, 0)]))
            self.n = self.limit
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.n += len(b)
        return int(self.fh.write(b))

    def flush(self) -> None:
        self.fh.flush()

    def tell(self) -> int:
        return self.n


_SYNC_POOL: ThreadPoolExecutor | None = None
_SYNC_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """Threads that wait on disk flushes (fsync releases the GIL), one pool per process."""
    global _SYNC_POOL
    with _SYNC_LOCK:
        if _SYNC_POOL is None:
            _SYNC_POOL = ThreadPoolExecutor(3, thread_name_prefix="mixedscale-fsync")
        return _SYNC_POOL


def _forget_sync_pool() -> None:
    # A forked child has none of its parent's threads: the pool would queue forever.
    global _SYNC_POOL
    _SYNC_POOL = None


os.register_at_fork(after_in_child=_forget_sync_pool)


def _sync_close(fh: Any) -> None:
    try:
        os.fsync(fh.fileno())
    finally:
        fh.close()


def _publish_faults(table: str, name: str, at_link: bool = False) -> dict[str, Any] | None:
    """The test fault for writing (``at_link`` False) or publishing one part: a full
    disk strikes while writing it; a kill or a held commit just before it appears."""
    for rule in fault_rules("publish"):
        if rule.get("table", table) != table or not name.startswith(rule.get("task", "")):
            continue
        if (rule.get("do") in ("kill", "wait")) != at_link:
            continue
        if claim_fault(rule):
            if rule.get("do") == "kill":  # die between two parts of one commit
                os._exit(17)
            if rule.get("do") == "wait":  # hold this commit until the test opens a gate
                deadline = time.monotonic() + float(rule.get("seconds", 60))
                while not os.path.exists(str(rule["path"])) and time.monotonic() < deadline:
                    time.sleep(0.02)
                continue
            return rule
    return None


def table_schema(table: str, key_fields: Sequence[pa.Field]) -> pa.Schema:
    """fit_id, the split columns and spec_id first, then the table's own columns."""
    head = [pa.field("fit_id", pa.string()), *key_fields, pa.field("spec_id", pa.string())]
    return pa.schema(head + list(BODY[table]))


def constant(value: Any, n: int, typ: pa.DataType | None = None) -> pa.Array:
    """``pa.array([value] * n, type=typ)`` without the Python list (~50x faster at 10^4
    rows: batches fill several such columns per table)."""
    return pa.repeat(pa.scalar(value, type=typ), n)


def nan_to_null(table: pa.Table) -> pa.Table:
    """NaN in float columns as null, as every table's rows store missing values."""
    for i, f in enumerate(table.schema):
        if pa.types.is_floating(f.type):
            col = table.column(i)
            if pc.any(pc.is_nan(col)).as_py():
                table = table.set_column(i, f, pc.if_else(pc.is_nan(col), None, col))
    return table


def type_name(typ: pa.DataType) -> str:
    """Arrow's type name, with text and categorical types named as users know them."""
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    if pa.types.is_dictionary(typ):
        return f"categorical of {type_name(typ.value_type)}"
    return str(typ)


def plain_type(typ: pa.DataType) -> pa.DataType:
    """A categorical (dictionary) type as its values' type: a split key is text whether
    the data held it as pandas categories or as strings, so stores do not depend on it."""
    return typ.value_type if pa.types.is_dictionary(typ) else typ


def _decoded(t: pa.Table) -> pa.Table:
    """``t`` with dictionary columns (categorical split keys of older parts) decoded."""
    if not any(pa.types.is_dictionary(f.type) for f in t.schema):
        return t
    return t.cast(pa.schema([f.with_type(plain_type(f.type)) for f in t.schema]))


def _mergeable(a: pa.DataType, b: pa.DataType) -> bool:
    """Whether parts holding a column as ``a`` and as ``b`` can be read together: the
    readers concatenate parts with Arrow's permissive promotion (int32 and int64, text
    and large text, int and float merge; text and int, bool and int do not)."""
    try:
        pa.unify_schemas([pa.schema([("c", plain_type(a))]), pa.schema([("c", plain_type(b))])],
                         promote_options="permissive")
    except (pa.ArrowException, TypeError):
        return False
    return True


def protocols(fs: Any) -> tuple[str, ...]:
    """An fsspec filesystem's protocol names (fsspec gives a str or a tuple)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


_NULLABLE = {pa.bool_(): pd.BooleanDtype(), pa.int64(): pd.Int64Dtype(),
             pa.int32(): pd.Int32Dtype()}


def among(tab: pa.Table, wanted: pa.Array) -> tuple[pa.Table, np.ndarray]:
    """The rows whose fit_id is in ``wanted``, and each one's place there. In Arrow:
    pandas' isin on Arrow strings is 100x slower."""
    at = pc.index_in(tab.column("fit_id"), value_set=wanted)
    if at.null_count:
        keep = pc.is_valid(at)
        tab, at = tab.filter(keep), at.filter(keep)
    return tab, np.asarray(at.to_numpy(), dtype=np.int64)


def in_rank_order(tab: pa.Table, rank: np.ndarray) -> pa.Table:
    """``tab``'s rows sorted by ``rank`` (one per row), stably: a fit's rows keep their
    order. As is when they already are.

    Where each of the table's batches (a store part's rows, as read) is in order and
    they do not overlap, as with one spec on sorted data, only the batches are
    reordered: no copy (tiny's first read-back in a fresh process: median 0.56 s with
    the copy, 0.26 s with the reorder, five processes each). Otherwise the rows are
    sorted in Arrow, before the table becomes a frame: pandas' row selection over the
    frame's columns (nullable, list and text columns in blocks of their own) took
    83-97 ms for tiny's three tables, Arrow's 50-58 ms (warm)."""
    if rank.size < 2 or not bool((rank[1:] < rank[:-1]).any()):
        return tab
    batches = [b for b in tab.to_batches() if b.num_rows]
    sizes = np.asarray([b.num_rows for b in batches])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    steps_up = rank[1:] >= rank[:-1]
    steps_up[starts[1:] - 1] = True  # into the next batch: any step
    order = np.argsort(rank[starts], kind="stable")
    if bool(steps_up.all()) and not bool(  # each batch in order, and none overlap
            (rank[starts][order][1:] < rank[ends - 1][order][:-1]).any()):
        return pa.Table.from_batches([batches[i] for i in order.tolist()], schema=tab.schema)
    return tab.take(pa.array(np.argsort(rank, kind="stable")))


def to_pandas(tab: pa.Table) -> pd.DataFrame:
    """List columns stay Arrow-backed (``pd.ArrowDtype``): an element is still a Python
    list, but 10^5 rows convert in milliseconds instead of seconds. Integer and boolean
    columns are pandas' nullable types, the same whether or not a column has missing
    values (an error row's): plain types would turn into object or float columns."""
    return tab.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t)
                         else _NULLABLE.get(t), split_blocks=True)  # see source.to_frame


class Store:
    """A results store at a local path or fsspec URL."""

    def __init__(self, url: str) -> None:
        if not isinstance(url, (str, os.PathLike)):
            raise StoreError("the store must be a folder path or URL; "
                             f"got (store={url!r})")
        self.url = os.fspath(url).rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:  # unknown protocol, backend missing
            raise StoreUnusable(f"cannot open store {self.url!r}: {one_line(exc)}; check "
                                "the URL and that its fsspec backend is installed") from None
        except OSError as exc:  # the filesystem refused or failed to connect
            raise StoreError(f"cannot open store {self.url!r}: {type(exc).__name__}: "
                             f"{one_line(exc)}") from None
        self.local = "file" in protocols(self.fs)
        self._schemas: dict[str, pa.Schema] = {}  # committed fits part -> its schema

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])  # type: ignore[misc]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # Per-run names, built here and parsed by ``sweep``.
    def marker_dir(self, run_id: str, kind: str) -> str:
        """``_runs/<run_id>.<kind>``: task markers, ``started`` or ``oom``."""
        return self.path("_runs", f"{run_id}.{kind}")

    @staticmethod
    def shuffle_name(run_id: str, n: int) -> str:
        """The folder under ``_tmp`` of a run's n-th shuffle scratch."""
        return f"{_SHUFFLE}{run_id}-{n}"

    def init(self) -> None:
        try:
            for d in (*TABLES, "_runs", "_tmp"):
                self.fs.makedirs(self.path(d), exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.url!r}: {exc}") from None

    # -- commits
    def committed_parts(self) -> set[str]:
        """Names (without .parquet) of committed fits parts."""
        try:
            names = self.fs.ls(self.path("fits"), detail=False)
        except FileNotFoundError:
            return set()
        except NotADirectoryError:  # the store path, or a folder above it, is a file
            raise StoreError(f"the store must be a folder, but {self.url!r} is a file or "
                             f"lies under one; give a folder path; got (store={self.url!r})"
                             ) from None
        out = set()
        for n in names:
            base = _basename(n)
            if base.startswith("part-") and base.endswith(".parquet"):
                out.add(base[5:-8])
        return out

    def publish(self, name: str, tables: dict[str, pa.Table]) -> bool:
        """Stage and publish one task's parts; fits last. False if it was already committed."""
        final_fits = self.path("fits", f"part-{name}.parquet")
        if self.fs.exists(final_fits):
            return False
        parent, sep, _ = name.partition("-f")
        if sep and self.fs.exists(self.path("fits", f"part-{parent}.parquet")):
            # A fit split out of a task that another writer (a zombie of a killed
            # driver) has committed whole in the meantime: already there.
            return False
        mine: list[str] = []  # parts this call put under their final names
        staged: dict[str, str] = {}
        try:
            if self.local:  # written and synced together: one disk flush's wait, not three
                staged = self._stage_local(name, tables)
            for t in ("params", "variance", "fits"):
                done = self._publish_one(t, name, tables[t], staged.get(t))
                if t == "fits" and not done:
                    return False
                if done and t != "fits":
                    mine.append(t)
        except StoreError:
            self._take_back(name, mine, tables)
            raise
        finally:
            for tmp in staged.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        # Another writer of this task whose commit failed may have just taken back the
        # parts this call found in place: committed fits must keep their rows.
        for t in ("params", "variance"):
            if t not in mine and not self.fs.exists(self.path(t, f"part-{name}.parquet")):
                self._publish_one(t, name, tables[t])
        return True

    def _take_back(self, name: str, mine: list[str], tables: dict[str, pa.Table]) -> None:
        """After a failed commit (e.g. a full disk), remove the params and variance
        parts it published, so readers of the folders never see rows of fits that are
        not committed (nor a second copy after a rerun under another packing). Unless
        another writer of the task committed its fits meanwhile: those keep their rows."""
        final_fits = self.path("fits", f"part-{name}.parquet")
        if self.fs.exists(final_fits):
            return
        for t in mine:
            with contextlib.suppress(OSError):
                self.fs.rm(self.path(t, f"part-{name}.parquet"))
        if self.fs.exists(final_fits):  # committed between the check and the removal
            for t in mine:
                with contextlib.suppress(StoreError):
                    self._publish_one(t, name, tables[t])

    def _write(self, fh: Any, table: str, name: str, data: pa.Table) -> None:
        fault = _publish_faults(table, name) if os.environ.get(FAULTS_ENV) else None
        sink = fh if fault is None else _FailingWriter(fh, int(fault.get("after_bytes", 64)))
        pq.write_table(data, sink, compression=_COMPRESSION,
                       use_dictionary=_dictionary_columns(data.schema))

    def _stage_local(self, name: str, tables: dict[str, pa.Table]) -> dict[str, str]:
        """Write the parts under temporary names, each synced to disk in a thread while
        the next is encoded; return the temporary paths once all are durable."""
        staged: dict[str, str] = {}
        syncs: dict[str, Future[None]] = {}
        order: list[str] = [t for t in ("params", "variance", "fits") if t in tables]
        t = order[0]
        try:
            for t in order:
                staged[t] = tmp = self.path("_tmp", f"{t}-{name}.{uuid.uuid4().hex}.parquet")
                fh = open(tmp, "wb")  # noqa: SIM115 - closed by _sync_close
                try:
                    self._write(fh, t, name, tables[t])
                    fh.flush()
                except BaseException:
                    fh.close()
                    raise
                syncs[t] = _sync_pool().submit(_sync_close, fh)
            for t, f in syncs.items():  # noqa: B007 - t names the failed part below
                f.result()
        except OSError as exc:
            for f in syncs.values():  # every file closed before its removal
                with contextlib.suppress(OSError):
                    f.result()
            for tmp in staged.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            final = self.path(t, f"part-{name}.parquet")
            raise StoreError(f"writing {final!r} failed: {exc}") from exc
        return staged

    def _publish_one(self, table: str, name: str, data: pa.Table,
                     staged: str | None = None) -> bool:
        """Publish one part under its final name; False if that name is taken.
        ``staged``: the part already written and synced (local stores)."""
        final = self.path(table, f"part-{name}.parquet")
        if self.local:
            own = staged is None  # written here (and removed after), else by the caller
            tmp = self._stage_local(name, {table: data})[table] if own else str(staged)
            try:
                if os.environ.get(FAULTS_ENV):
                    _publish_faults(table, name, at_link=True)
                os.link(tmp, final)  # atomic, and fails rather than clobber
            except FileExistsError:
                return False
            except OSError as exc:
                raise StoreError(f"writing {final!r} failed: {exc}") from exc
            finally:
                if own:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            return True
        tmp = self.path("_tmp", f"{table}-{name}.{uuid.uuid4().hex}.parquet")
        try:
            # Object stores: no atomic no-clobber rename. Write the full object
            # under a temporary key, then copy; readers dedupe by fit_id.
            with self.fs.open(tmp, "wb") as fh:
                self._write(fh, table, name, data)
            if os.environ.get(FAULTS_ENV):
                _publish_faults(table, name, at_link=True)
            if self.fs.exists(final):
                self.fs.rm(tmp)
                return False
            self.fs.mv(tmp, final)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            raise StoreError(f"writing {final!r} failed: {exc}") from exc

    # -- manifests
    def write_manifest(self, run_id: str, manifest: dict[str, Any]) -> bool:
        """Replace a run's manifest atomically; False (and an error logged) on failure."""
        final = self.path("_runs", f"{run_id}.json")
        tmp = self.path("_tmp", f"run-{run_id}.{uuid.uuid4().hex}.json")
        blob = json.dumps(manifest, indent=2, default=str, sort_keys=True)
        try:
            with self.fs.open(tmp, "w") as fh:
                fh.write(blob)
            if self.local:
                os.replace(tmp, final)
            else:
                self.fs.mv(tmp, final)
        except OSError as exc:
            log.error("could not write run manifest %s: %s", final, exc)
            with contextlib.suppress(OSError):  # no empty leftovers (a full disk)
                self.fs.rm(tmp)
            return False
        return True

    # -- reading
    def _parts(self, table: str, tasks: set[str] | None = None) -> dict[str, str]:
        """Part name -> path; with ``tasks``, only those task keys (and their split fits)."""
        try:
            files = sorted(str(f) for f in self.fs.ls(self.path(table), detail=False)
                           if str(f).endswith(".parquet"))
        except FileNotFoundError:
            files = []
        out = {f.rsplit("/", 1)[-1][5:-8]: f for f in files}
        if tasks is not None:
            out = {n: f for n, f in out.items() if n in tasks or n.split("-f")[0] in tasks}
        return out

    def part_fit_ids(self, names: Sequence[str], unreadable: dict[str, str] | None = None
                     ) -> dict[str, pa.Array]:
        """The fit ids in each named committed part (its fit_id column only; the parts'
        schemas are remembered for ``part_schemas``). With
        ``unreadable``, a part that cannot be read is entered there (name -> why) and
        left out, instead of raising StoreError."""
        out = {}
        for name in names:
            try:
                out[name] = self._fit_id_column(name)
            except (OSError, pa.ArrowException) as exc:
                f = self.path("fits", f"part-{name}.parquet")
                if unreadable is None:
                    raise self._unreadable(f, exc) from None
                unreadable[name] = f"{f} ({one_line(exc)})"
        return out

    def _fit_id_column(self, name: str) -> pa.Array:
        f = self.path("fits", f"part-{name}.parquet")
        pf = self._part_file(f)
        if "fit_id" not in pf.schema_arrow.names:
            raise _not_ours(f)
        self._schemas[name] = pf.schema_arrow
        col = pf.read(columns=["fit_id"]).column("fit_id")
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)

    def _part_file(self, f: str) -> pq.ParquetFile:
        """A part, read whole (``read_whole``): parts are small, and one read beat the
        ranged reads of a ParquetFile over the fsspec file (0.14 against 0.16 s for a
        100,000-fit store), which also let Arrow's threads free Python buffers."""
        return pq.ParquetFile(pa.BufferReader(read_whole(self.fs, f)))

    def unreadable_parts(self, names: Sequence[str]) -> dict[str, str]:
        """The committed tasks among ``names`` with an unreadable part: name -> the
        part and why.

        Cheap enough for every resume: the fit_id column of each fits part (what
        resuming relies on) and the footers of its params and variance parts, never
        whole tables. Damage inside other columns' pages is found only by readers."""
        bad: dict[str, str] = {}
        for name in names:
            why = self._problem(name)
            if why is not None:
                bad[name] = why
        return bad

    def _problem(self, name: str) -> str | None:
        """Which part of a committed task cannot be read and why, or None."""
        try:
            self._fit_id_column(name)
        except (OSError, pa.ArrowException) as exc:
            return f"{self.path('fits', f'part-{name}.parquet')} ({one_line(exc)})"
        return self.side_problem(name)

    def side_problem(self, name: str) -> str | None:
        """Which of a committed task's params and variance parts cannot be read (its
        footer) and why, or None."""
        for t in ("params", "variance"):
            f = self.path(t, f"part-{name}.parquet")
            try:
                with self.fs.open(f, "rb") as fh:
                    pq.read_metadata(fh)
            except FileNotFoundError:
                # Every commit publishes all three parts (empty ones too), params and
                # variance first: a committed task without one lost it, e.g. to a
                # set_aside cut short after moving it.
                return f"{f} (missing)"
            except (OSError, pa.ArrowException) as exc:
                return f"{f} ({one_line(exc)})"
        return None

    def set_aside(self, name: str, why: str) -> bool:
        """Move a committed task's parts to ``_corrupt/<table>/`` because one of them is
        unreadable, so its fits count as missing (a rerun refits them) and readers no
        longer fail on it. False if nothing was moved: the parts read fine by now, or
        are gone (another run repaired them, or is doing so)."""
        if self._problem(name) is None:
            return False
        moved = self._move_task(name, CORRUPT, "is unreadable and ")
        if moved:
            log.warning("unreadable store part %s; moved its task's parts to %s/ to refit "
                        "its fits", why, self.path(CORRUPT))
        return moved

    def retire(self, name: str) -> bool:
        """Move a committed task's parts to ``_retried/<table>/``, so a rerun refits its
        fits (``RunOptions.retry_errors``). False if they were gone already."""
        return self._move_task(name, RETRIED, "")

    def _move_task(self, name: str, folder: str, why: str) -> bool:
        """Move a task's parts into ``folder``; nothing is deleted. Params and variance
        go first and fits, the commit marker, last: a move cut short leaves the task
        committed with a part missing, which ``_problem`` reports, for the next rerun
        to finish."""
        tag = uuid.uuid4().hex[:8]  # a task's parts may be moved more than once
        moved = False
        for t in ("params", "variance", "fits"):
            src = self.path(t, f"part-{name}.parquet")
            dst = self.path(folder, t, f"part-{name}.{tag}.parquet")
            try:
                if not self.fs.exists(src):
                    continue
                self.fs.makedirs(self.path(folder, t), exist_ok=True)
                if self.local:
                    os.rename(src, dst)
                else:
                    self.fs.mv(src, dst)
                moved = True
            except FileNotFoundError:  # moved by another run meanwhile
                continue
            except OSError as exc:
                raise StoreError(
                    f"store part {src!r} {why}could not be moved to {dst!r} "
                    f"({one_line(exc)}); move it out of the store by hand and rerun "
                    f"the job; got (store={self.url!r})") from None
        return moved

    def part_errors(self, names: Sequence[str]) -> dict[str, tuple[pa.Array, pa.Array]]:
        """(fit_id, error_type) of each named committed part, read alone. A part that
        cannot be read is left out: the resume that follows sets it aside (``pending``)."""
        out = {}
        for name in names:
            try:
                t = self._read_part(self.path("fits", f"part-{name}.parquet"),
                                    ["fit_id", "error_type"], explain=False)
            except StoreError:
                continue
            if "error_type" not in t.column_names:
                continue
            out[name] = (t.column("fit_id").combine_chunks(),
                         t.column("error_type").combine_chunks())
        return out

    def _unreadable(self, path: str, exc: BaseException, explain: bool = True) -> StoreError:
        """A reader's error for an unreadable part, with the repair that works for it
        (``explain``: finding it reads the task's parts again)."""
        head = f"store part {path!r} is unreadable ({one_line(exc)})"
        if not explain:
            return StoreError(head)
        head += "; "
        name = _basename(path)[5:-8]  # part-<name>.parquet
        try:
            found = self._problem(name) is not None
        except StoreError:
            found = False
        if found:  # what a rerun's resume checks: it repairs this part itself
            return StoreError(head + "rerunning the job that wrote it repairs the store: "
                              f"the rerun moves the part to {CORRUPT}/ and refits its fits")
        return StoreError(head + "move it and the parts of the same name in fits/, params/ "
                          "and variance/ out of the store, then rerun the job that wrote it "
                          "to refit its fits")

    def part_schemas(self, names: Sequence[str], unreadable: dict[str, str] | None = None
                     ) -> dict[str, pa.Schema]:
        """The schema of each named committed fits part, from its footer. Remembered: a
        committed part is never rewritten. With ``unreadable``, a part that cannot be
        read is entered there and left out, instead of raising StoreError."""
        for name in names:
            if name in self._schemas:
                continue
            f = self.path("fits", f"part-{name}.parquet")
            try:
                with self.fs.open(f, "rb") as fh:
                    self._schemas[name] = pq.ParquetFile(fh).schema_arrow
            except (OSError, pa.ArrowException) as exc:
                if unreadable is None:
                    raise StoreError(f"store part {f!r} is unreadable: {exc}") from None
                unreadable[name] = f"{f} ({one_line(exc)})"
        return {name: self._schemas[name] for name in names if name in self._schemas}

    def check_split_types(self, key_fields: Sequence[pa.Field], names: Sequence[str]) -> None:
        """Raise SpecError if a split column's type cannot be read together with its
        type in the named committed parts (earlier jobs' fits). Both jobs would run, but
        every read of the whole store would then fail; so the later job is refused."""
        seen: set[tuple[str, pa.DataType, pa.DataType]] = set()
        for name, schema in sorted(self.part_schemas(names).items()):
            for f in key_fields:
                i = schema.get_field_index(f.name)
                if i < 0 or (f.name, f.type, schema.field(i).type) in seen:
                    continue
                theirs = schema.field(i).type
                seen.add((f.name, f.type, theirs))
                if _mergeable(f.type, theirs):
                    continue
                split = [k.name for k in key_fields]
                part = self.path("fits", f"part-{name}.parquet")
                raise SpecError(
                    f"split column {f.name!r} is {type_name(f.type)} here but "
                    f"{type_name(theirs)} in the results store's earlier fits (such as "
                    f"{part!r}), and parts of both types cannot be read together; cast "
                    f"it to {type_name(theirs)} or use another store; "
                    f"got (split_by={split!r}, store={self.url!r})")

    def _read_parts(self, files: list[tuple[int, str]], columns: Sequence[str] | None = None
                    ) -> pa.Table | None:
        """The parts (``columns`` only, if given), concatenated, with ``_part``: the given
        number of each file."""
        parts: list[pa.Table] = []
        for i, f in files:
            t = self._read_part(f, columns)
            parts.append(_decoded(t).append_column("_part", pa.array(np.full(t.num_rows, i))))
        if not parts:
            return None
        try:
            return pa.concat_tables(parts, promote_options="permissive")
        except pa.ArrowException as exc:
            raise self._type_conflict([f for _, f in files], parts, exc) from None

    def _read_part(self, f: str, columns: Sequence[str] | None, explain: bool = True
                   ) -> pa.Table:
        """One part (``columns`` only, those it has, if given). ``explain``: an unreadable
        part's StoreError says how to repair it, which reads the task's parts again."""
        try:
            pf = self._part_file(f)
            names = pf.schema_arrow.names
            if "fit_id" not in names:
                raise _not_ours(f)  # a StoreError: not caught below
            return pf.read(columns=None if columns is None
                           else [c for c in columns if c in names])
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(f, exc, explain) from None

    def _type_conflict(self, files: list[str], parts: list[pa.Table], exc: Exception
                       ) -> StoreError:
        """The error for parts that cannot be read together, naming the column and its
        two types: jobs that split by one column typed differently, in a store written
        before mixedscale refused that (see ``check_split_types``)."""
        first: dict[str, tuple[pa.DataType, str]] = {}
        for f, t in zip(files, parts, strict=True):
            for fld in t.schema:
                if fld.name not in first:
                    first[fld.name] = (fld.type, f)
                    continue
                typ, where = first[fld.name]
                if not _mergeable(typ, fld.type):
                    return StoreError(
                        f"the results store's parts hold column {fld.name!r} as "
                        f"{type_name(typ)} in {where!r} but as {type_name(fld.type)} in "
                        f"{f!r} (jobs that split by it with different types), so they "
                        "cannot be read together; move the parts of one type (the fits, "
                        "params and variance files of the same name) to a store of their "
                        f"own; got (store={self.url!r})")
        return StoreError(f"the results store's parts cannot be read together: {exc}; "
                          f"got (store={self.url!r})")

    def _tables(self, names: tuple[str, ...], tasks: set[str] | None = None,
                ids: Sequence[str] | pa.Array | None = None,
                fit_columns: Sequence[str] | None = None, expect: int | None = None,
                latest: bool = False, rank: np.ndarray | None = None
                ) -> list[pd.DataFrame]:
        """Committed rows of the given tables, one copy per fit_id.

        A part counts once its fits part exists (fits are published last). The same
        fit in two parts (two jobs sharing a spec and slice, or an object store's
        race) keeps the rows of its first part only. Parts are numbered by their
        position among the committed fits parts, in every table. ``fit_columns``: the
        fits table's columns to read (fit_id always); without "fits" in ``names``,
        only its fit_id is read. ``expect``: the number of fits that must be there (a
        finished run's); fewer raise StoreError. ``latest``: see ``fits``. ``rank``:
        with ``ids``, each id's place in the job; rows come back sorted by their fit's
        (a fit's rows in the order read)."""
        committed = self._parts("fits", tasks)
        order = sorted(committed)
        cols = (None if fit_columns is None else ["fit_id", *fit_columns]) \
            if "fits" in names or latest else ["fit_id"]
        fits = self._read_parts([(i, committed[n]) for i, n in enumerate(order)], cols)
        if fits is None:
            self._check_found(0, expect)
            return [pd.DataFrame() for _ in names]
        if latest:
            fits = self._latest(fits, order)
            ids = fits.column("fit_id").to_pylist() if ids is None else ids
            if "fits" not in names:
                fits = fits.select(["fit_id", "_part"])
        wanted = None if ids is None else (
            ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string()))
        at = None  # each row's place in ``wanted``: one hash lookup filters, checks, sorts
        if wanted is not None:
            fits, at = among(fits, wanted)
        winners: pa.Table | None = None
        fit_ids = fits.column("fit_id")
        repeats = (bool(np.bincount(at).max(initial=0) > 1) if at is not None
                   else pc.count_distinct(fit_ids).as_py() < fits.num_rows)
        if repeats:
            part = fits.column("_part").to_numpy()
            first = pd.Series(part).groupby(fit_ids.to_numpy()).transform("min").to_numpy()
            fits = fits.filter(pa.array(part == first))
            at = None if at is None else at[part == first]
        if repeats or latest:  # a fit kept from one of its parts: the rows of that one
            winners = fits.select(["fit_id", "_part"]).rename_columns(["fit_id", "_win"])
        self._check_found(fits.num_rows, expect)
        out = []
        for name in names:
            tab, tab_at = fits, at
            if name != "fits":
                have = self._parts(name, tasks)
                gone = [n for n in order if n not in have]
                if gone:  # every commit publishes all three parts: a missing one is damage
                    raise self._unreadable(self.path(name, f"part-{gone[0]}.parquet"),
                                           FileNotFoundError("missing"))
                tab = self._read_parts([(i, have[n]) for i, n in enumerate(order)])
                if tab is not None and winners is not None:
                    tab = tab.join(winners, "fit_id", join_type="inner", use_threads=False)
                    tab = tab.filter(pc.equal(tab.column("_part"), tab.column("_win")))
                    tab = tab.drop_columns(["_win"]).sort_by("_part")
                if tab is not None and wanted is not None:
                    tab, tab_at = among(tab, wanted)
            if tab is None:
                out.append(pd.DataFrame())
                continue
            if rank is not None and tab_at is not None:
                tab = in_rank_order(tab, rank[tab_at])
            out.append(to_pandas(tab.drop_columns(["_part"])))
        return out

    def _check_found(self, found: int, expect: int | None) -> None:
        if expect is not None and found < expect:
            raise StoreError(
                f"the results store {self.url!r} no longer holds this run's results (found "
                f"{found} of {expect} fits): it was moved or deleted after the run; read it "
                "where it is now with mixedscale.open_store, or rerun the job; "
                f"got (store={self.url!r})")

    def _latest(self, fits: pa.Table, order: list[str]) -> pa.Table:
        """Per split key and spec, the rows of the fit committed last (by its part's
        modification time, then name). A key is the values of the split columns its
        part has: a job split by one column and a job split by another (or by none)
        never share a key, also where values are missing."""
        when = {_basename(str(e["name"]))[5:-8]: _mtime(e, 0.0) for e in self._entries("fits")}
        part = fits.column("_part").to_numpy()
        keys = [c for c in fits.column_names
                if c not in FIT_SCHEMA.names and c not in ("fit_id", "_part")]
        # The set of split columns, not their order: split_by [gene, site] and [site,
        # gene] are one split.
        own = {n: tuple(sorted(c for c in schema.names if c in keys))
               for n, schema in self.part_schemas(order).items()}
        df = fits.select(keys).to_pandas()
        df.columns = [f"k{i}" for i in range(len(keys))]  # no clash with the names below
        df["sig"] = pd.factorize(pd.Series([own[n] for n in order], dtype=object))[0][part]
        df["t"] = np.array([when.get(n, 0.0) for n in order])[part]
        df["p"] = part
        keep = df.sort_values(["t", "p"], kind="stable").drop_duplicates(
            [*df.columns[:len(keys)], "sig"], keep="last")
        mask = np.zeros(len(df), dtype=bool)
        mask[keep.index.to_numpy()] = True
        return fits.filter(pa.array(mask))

    def fits(self, latest: bool = False) -> pd.DataFrame:
        """Every committed fit. A store keeps every fit it was given: after the data
        changed (a rewritten file is new data: new fit ids) or a rerun refitted, a
        slice and spec may have several. ``latest``: only the one committed last."""
        return self._tables(("fits",), latest=latest)[0]

    def run_tables(self, tasks: set[str], ids: Sequence[str] | pa.Array | None = None,
                   names: tuple[str, ...] = TABLES, fit_columns: Sequence[str] | None = None,
                   expect: int | None = None, rank: np.ndarray | None = None
                   ) -> list[pd.DataFrame]:
        """The named tables of the given tasks (and fit ids) only: what one job wrote.
        ``fit_columns``: read only these columns of fits (and fit_id); ``expect``,
        ``rank``: see ``_tables``."""
        return self._tables(names, tasks, ids, fit_columns, expect, rank=rank)

    def params(self, latest: bool = False) -> pd.DataFrame:
        """Fixed effects of every committed fit (``latest``: see ``fits``)."""
        return self._tables(("params",), latest=latest)[0]

    def variance(self, latest: bool = False) -> pd.DataFrame:
        """Variance components of every committed fit (``latest``: see ``fits``)."""
        return self._tables(("variance",), latest=latest)[0]

    def specs(self) -> pd.DataFrame:
        """One row per model the store's runs fitted, by ``spec_id``: its ``spec_name``
        (as the newest run named it) and the fields that define it, from the run
        manifests. Join it to ``fits`` on ``spec_id`` to select fits by model (e.g.
        ML fits only, to compare their criteria)."""
        rows: dict[str, dict[str, Any]] = {}
        runs = self.runs()
        for specs in runs["specs"] if "specs" in runs.columns else []:
            for spec_id, info in (specs if isinstance(specs, dict) else {}).items():
                vc = info.get("vc_formula") or {}
                rows[spec_id] = {
                    "spec_id": spec_id, "spec_name": info.get("name"),
                    # As written, not as hashed: "y~ x" reads "y ~ x".
                    "formula": _spaced(info.get("formula")), "groups": info.get("groups"),
                    "re_formula": info.get("re_formula"),
                    "vc_formula": json.dumps(vc, sort_keys=True) if vc else None,
                    "reml": info.get("reml"), "cov_structure": info.get("cov_structure"),
                    "optimizers": "+".join(info.get("optimizers") or []),
                    "maxiter": info.get("maxiter"), "engine": info.get("engine"),
                }
        return pd.DataFrame(list(rows.values()), columns=list(_SPEC_COLUMNS))

    def runs(self) -> pd.DataFrame:
        """One row per run manifest. A driver killed outright never closes its
        manifest; a "running" one reads ``abandoned`` when its driver's pid is gone on
        this host, or when its heartbeat stopped ``SILENT_HEARTBEATS`` beats ago by this
        host's clock (a display only: ``sweep`` never compares clocks)."""
        written = {e["name"]: _mtime(e, None) for e in self._entries("_runs")
                   if str(e["name"]).endswith(".json")}
        now = time.time()
        rows = []
        for path in sorted(written):
            r = self._manifest(path)
            if r is None:
                continue
            if _abandoned(r):
                r["state"] = "abandoned"
                r["message"] = "its driver died without closing the run; rerun to resume"
            elif _silent(r, written[path], now):
                r["state"] = "abandoned"
                r["message"] = ("its driver stopped writing its heartbeat "
                                f"{(now - (written[path] or now)) / 60:.0f} min ago; "
                                "rerun to resume")
            rows.append(r)
        # Oldest first; run ids sort by second only, so ties go by start time.
        rows.sort(key=lambda r: (str(r.get("started") or ""), str(r.get("run_id") or "")))
        return pd.DataFrame(rows)

    def _manifest(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "r") as fh:
                m = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable run manifest %s: %s", path, exc)
            return None
        return m if isinstance(m, dict) else None

    # -- leftovers
    def sweep(self, stale_after: float = 86400.0, own_run: str | None = None) -> list[str]:
        """Remove what earlier runs left behind; returns the paths removed.

        Only what cannot belong to a live run:
        - the shuffle scratch and task markers of runs whose own manifest says they
          ended (their cleanup did not finish);
        - those of runs whose manifest says "running" but whose driver stopped
          rewriting it (``HEARTBEAT_SECONDS``) for ``SILENT_HEARTBEATS`` beats. Silence
          is measured against ``own_run``'s manifest, written just before: both times
          come from the store's listing, so where the store stamps them (object
          stores, local and network file systems) clocks of different hosts never
          meet; a FUSE mount that stamps the writer's clock needs clocks within ~9 min.
          Manifests without a heartbeat (older versions) are never judged silent;
        - staged files older than ``stale_after`` seconds (a stage lasts one part
          write; a day leaves room for clock skew between hosts).

        A dead pid on this host name is no proof (``runs`` calls it abandoned): it may be
        a live driver in another pid namespace, or on another machine of the same name.
        A run without a readable manifest keeps everything."""
        now = time.time()
        by_run: dict[str, list[str]] = {}
        stale: list[str] = []
        for entry in self._entries("_tmp"):
            name = _basename(entry["name"])
            if name.startswith(_SHUFFLE):  # shuffle_name: <prefix><run_id>-<n>
                run_id = name[len(_SHUFFLE):].rsplit("-", 1)[0]
                by_run.setdefault(run_id, []).append(entry["name"])
            elif (entry.get("type") == "file" and name != "_tmp"  # not an S3 folder marker
                  and now - _mtime(entry, now) > stale_after):  # unknown: kept
                stale.append(entry["name"])
        written: dict[str, float | None] = {}  # run_id -> its manifest's last write
        for entry in self._entries("_runs"):
            run_id, dot, kind = _basename(entry["name"]).rpartition(".")
            if dot and kind in _MARKERS:  # marker_dir: <run_id>.<kind>
                by_run.setdefault(run_id, []).append(entry["name"])
            elif dot and kind == "json":
                written[run_id] = _mtime(entry, None)
        store_now = written.get(own_run) if own_run else None
        for run_id, paths in by_run.items():
            if run_id == own_run:
                continue
            m = self._manifest(self.path("_runs", f"{run_id}.json"))
            if m is None:
                continue
            if m.get("state") in _ENDED or _silent(m, written.get(run_id), store_now):
                stale.extend(paths)
        removed = []
        for path in stale:
            try:
                self.fs.rm(path, recursive=True)
                removed.append(path)
            except (OSError, ValueError) as exc:  # e.g. taken by another sweep meanwhile
                log.debug("could not remove %s: %s", path, exc)
        return removed

    def _entries(self, folder: str) -> list[dict[str, Any]]:
        try:
            return list(self.fs.ls(self.path(folder), detail=True))
        except (FileNotFoundError, NotADirectoryError):
            return []


_ENDED = frozenset({"complete", "failed", "interrupted"})  # a run's own final states
# A running driver rewrites its manifest this often (executor); after this many missed
# beats its run counts as dead, and the next run sweeps its scratch and markers.
HEARTBEAT_SECONDS = 60.0
SILENT_HEARTBEATS = 10
_MARKERS = frozenset({"started", "oom"})
_SHUFFLE = "shuffle-"


def read_whole(fs: Any, path: str) -> pa.Buffer:
    """A file's bytes in memory Arrow owns, for Arrow's threads to decode.

    Not Arrow over the fsspec file, nor over Python bytes: either reads into buffers that
    hold Python objects, and a threaded read (Parquet decoding, IPC decompression) frees
    its readers, with those buffers, on Arrow's thread pool, at times after the read
    returned. One freed there while the interpreter exits takes the GIL and aborts the
    process ("terminate called without an active exception", apache/arrow#34314: seen
    in CI after `mixedscale show`)."""
    with fs.open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        buf = pa.allocate_buffer(size)
        view, got = memoryview(buf), 0
        while got < size and (n := fh.readinto(view[got:])):
            got += n
        view.release()
    return buf.slice(0, got)


def _not_ours(path: str) -> StoreError:
    return StoreError(f"{path!r} is not a mixedscale part (it has no fit_id column); "
                      "move files other than mixedscale's out of the store")


def _basename(name: str) -> str:
    """The last part of an fsspec listing name (folders may end with '/')."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def _abandoned(manifest: dict[str, Any]) -> bool:
    """A "running" manifest whose driver, on this host, is gone."""
    pid = manifest.get("pid")
    return (manifest.get("state") == "running" and manifest.get("host") == socket.gethostname()
            and isinstance(pid, int) and not psutil.pid_exists(pid))


def _silent(manifest: dict[str, Any], written: float | None, store_now: float | None) -> bool:
    """A "running" manifest with a heartbeat, last written long before ``store_now``."""
    beat = manifest.get("heartbeat_seconds")
    if (manifest.get("state") != "running" or written is None or store_now is None
            or isinstance(beat, bool) or not isinstance(beat, (int, float)) or beat <= 0):
        return False
    return store_now - written > SILENT_HEARTBEATS * float(beat)


@overload
def _mtime(entry: dict[str, Any], default: float) -> float: ...
@overload
def _mtime(entry: dict[str, Any], default: None) -> float | None: ...
def _mtime(entry: dict[str, Any], default: float | None) -> float | None:
    """An fsspec listing entry's modification time (local, s3, gcs and abfs spellings)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = entry.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return default


def check_writable(url: str) -> None:
    """Raise SpecError if a local store folder cannot be created and written, so a job
    fails before any cluster work (object stores report at their first write)."""
    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError):
        return  # Store() words a bad URL
    if "file" not in protocols(fs):
        return
    at = Path(root)
    if at.is_dir():
        # A folder of other files (say, the job's own) would get fits/ and params/ mixed
        # in among them, and nobody would find the results again.
        entries = {p.name for p in at.iterdir() if not p.name.startswith(".")}
        if entries and not entries & {"fits", "params", "variance", "_runs", "_tmp"}:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise SpecError(f"the store folder {str(at)!r} holds other files ({shown}) and "
                            "no results store; give a new or empty folder, e.g. "
                            f"{str(at / 'results')!r}; got (store={url!r})")
    while not at.exists() and at.parent != at:
        at = at.parent
    if not at.is_dir():
        raise SpecError(f"the store must be a folder, but {str(at)!r} is a file; give a "
                        f"folder path; got (store={url!r})")
    try:  # a probe that leaves nothing behind, not even the store's own folder
        os.rmdir(tempfile.mkdtemp(prefix=".mixedscale-probe-", dir=at))
    except OSError as exc:
        raise SpecError(f"cannot create the store under {str(at)!r} ({exc.strerror}); "
                        f"choose a folder you can write to; got (store={url!r})") from None


def _spaced(formula: Any) -> Any:
    return " ~ ".join(p.strip() for p in formula.split("~", 1)) if isinstance(
        formula, str) else formula


_SPEC_COLUMNS = ("spec_id", "spec_name", "formula", "groups", "re_formula", "vc_formula",
                 "reml", "cov_structure", "optimizers", "maxiter", "engine")


def open_store(path: str) -> Store:
    """Open an existing results store for reading."""
    st = Store(str(path))
    if not st.fs.exists(st.path("fits")):
        raise StoreError(f"no results store at {path!r} (no fits/ folder); "
                         "check the path or run a job with --store first")
    return st
