"""What runs on a worker: load a unit of data, fit a task's items, commit its parts.

Nothing here knows about Dask scheduling; the executor submits these functions.
Per-fit timeouts run the fits on a helper thread that is abandoned when a fit
overruns, so a hung fit becomes an error row instead of a hung run; the
executor then restarts that worker to reclaim the thread.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from dask.sizeof import sizeof

from ._blas import one_blas_thread
from ._malloc import heap_for_temporaries
from .batch import MIN_BATCH, batchable, fit_slices
from .errors import DataError, MixedscaleError, StoreError
from .plan import FitItem, Items, Task, _norm_column
from .single import FitResult, fit_shared
from .source import CorruptFile, RowGroup, Source
from .spec import ModelSpec
from .store import (
    FAULTS_ENV,
    HEARTBEAT_SECONDS,
    SILENT_HEARTBEATS,
    Store,
    claim_fault,
    constant,
    fault_rules,
    nan_to_null,
    read_whole,
    table_schema,
)

T = TypeVar("T")

__all__ = ["LoadFailed", "Packed", "TaskOutcome", "TaskPayload", "forget_shuffled",
           "load_shuffled", "load_unit", "partition", "partition_to_store", "piece",
           "run_task", "settle_worker_process"]

log = logging.getLogger(__name__)


@dataclass
class TaskPayload:
    task: Task
    keys: SliceKeys  # slice index -> split key
    specs: dict[int, ModelSpec]
    split_by: list[str]
    key_fields: list[pa.Field]
    run_id: str
    timeout: float | None = None
    engine: str | None = None  # run-wide engine override


@dataclass
class TaskOutcome:
    key: str
    n_fits: int
    by_status: dict[str, int]
    fit_seconds: float
    wall_seconds: float
    committed: bool
    timed_out: int = 0
    worker: str | None = None
    tables: dict[str, pa.Table] | None = None  # only for in-memory runs
    loads: dict[str, int] = field(default_factory=dict)  # load token -> bytes read
    # Seconds of the task's wall by phase: "data" (load or merge, row positions),
    # "fits" (fitting, fit seconds included), "tables" (result rows), "write" (commit).
    phases: dict[str, float] = field(default_factory=dict)
    # The task's data could not be read: nothing was fitted or committed.
    corrupt: CorruptFile | None = None


@dataclass(frozen=True)
class LoadFailed:
    """A read that met a corrupt input file, returned as a value: a Dask task that
    raises is logged by its worker at ERROR with a traceback (on the CLI's stderr for
    the embedded cluster), and the executor handles this expected case on its own."""

    error: CorruptFile


def stable_order(codes: np.ndarray) -> np.ndarray:
    """``np.argsort(codes, kind="stable")`` for non-negative integer codes, as one or two
    16-bit radix passes where they fit (4-8x faster than the 64-bit sort at 10^6)."""
    top = int(codes.max(initial=0))
    if codes.size < 2 or top >= 2**32 or int(codes.min(initial=0)) < 0:
        return np.argsort(codes, kind="stable")
    if top < 2**16:
        return np.argsort(codes.astype(np.uint16), kind="stable")
    low = np.argsort((codes & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((codes[low] >> 16).astype(np.uint16), kind="stable")]


def _sorted_runs(col: pd.Series) -> np.ndarray | None:
    """Where each key's rows start, but the first's, if ``col`` holds its keys in
    strictly ascending runs (sorted input, the usual case); else None. Only for integer
    columns and Arrow-backed text without missing values, whose order here (numbers;
    UTF-8 bytes, that is code points) is the planner's. A check of neighbours costs a
    fifth of the hashing group-by it spares (120,000 text keys: ~2 ms against ~9)."""
    if len(col) < 2 or col.hasnans:
        return None
    v: np.ndarray | None = None
    if col.dtype.kind in "iu" and isinstance(col.dtype, np.dtype):
        v = col.to_numpy()
        a: pa.Array | pa.ChunkedArray = pa.array(v)  # no copy
    elif isinstance(col.dtype, pd.StringDtype) and col.dtype.storage == "pyarrow":
        a = pa.array(col.array)  # the column's own Arrow data (chunked as read), no copy
    else:
        return None
    # Unsorted rows are turned away by a sample first: the full check of 240,000
    # unsorted text keys took 8.5 ms, a third of the group-by that follows it.
    if not _ascending(a.take(pa.array(np.linspace(0, len(a) - 1, 65).astype(np.int64))),
                      strict=False):
        return None
    # Neighbours in numpy where it has them: 1,000,000 ints ~3 ms faster than in Arrow.
    new = (v[1:] != v[:-1] if v is not None
           else pc.not_equal(a[1:], a[:-1]).to_numpy(zero_copy_only=False))
    starts = np.flatnonzero(new) + 1
    return starts if _ascending(a.take(pa.array(np.r_[0, starts])), strict=True) else None


def _ascending(a: pa.Array | pa.ChunkedArray, strict: bool) -> bool:
    """Whether each value of ``a`` is above (``strict``) or at least its predecessor."""
    cmp = pc.less if strict else pc.less_equal
    return len(a) < 2 or bool(pc.all(cmp(a[:-1], a[1:])).as_py())


class Positions:
    """Row positions per split key (normalized as the plan's keys): one stable sort of
    the unit's rows, then a view per key, ascending like ``groupby().indices``.

    Keys are looked up by their code (their place in key order). One integer or text
    column with no missing value (the usual split) is looked up by a pandas Index,
    vectorized; other keys by a dict of normalized key tuples. The dict is built only
    if asked for: 10^5 tuples were most of a shuffle step's time on tiny."""

    def __init__(self, df: pd.DataFrame, split_by: Sequence[str]) -> None:
        self._index: dict[tuple[Any, ...], int] | None = None
        self._vindex: pd.Index | None = None
        if not split_by or df.empty:
            self.order = np.arange(len(df))
            self.starts = np.array([0, len(df)])
            self._index = {(): 0}
            return
        # Codes in key order, as the planner sorts slices (``plan._key_codes``):
        # regrouped rows (``Loaded``) then hold a task's consecutive slices as one run.
        starts = _sorted_runs(df[split_by[0]]) if len(split_by) == 1 else None
        if starts is not None:  # rows already in key order: no hashing, no sort
            self.order = np.arange(len(df))
            self.starts = np.r_[0, starts, len(df)]
        else:
            codes = df.groupby(list(split_by), sort=True, dropna=False,
                               observed=True).ngroup().to_numpy()
            self.order = stable_order(codes)
            self.starts = np.r_[0, np.cumsum(np.bincount(codes))]
        self._firsts = [df[c].iloc[self.order[self.starts[:-1]]] for c in split_by]
        col = self._firsts[0]
        if len(split_by) == 1 and not col.hasnans and (
                col.dtype.kind in "iu" or isinstance(col.dtype, pd.StringDtype)):
            self._vindex = pd.Index(col.to_numpy())

    @property
    def index(self) -> dict[tuple[Any, ...], int]:
        """Each key's code, by its normalized key tuple."""
        if self._index is None:
            cols = [_norm_column(c) for c in self._firsts]
            self._index = {k: i for i, k in enumerate(zip(*cols, strict=True))}
        return self._index

    def codes(self, keys: Sequence[tuple[Any, ...]] | np.ndarray) -> np.ndarray:
        """Each key's code, -1 for a key with no rows. ``keys``: key tuples, or one
        column's values as an array (see ``key_units``)."""
        vx = self._vindex
        if isinstance(keys, np.ndarray):
            if vx is not None:
                return np.asarray(vx.get_indexer(pd.Index(keys)), dtype=np.int64)
            keys = [(v,) for v in keys.tolist()]
        if vx is not None:
            vals = [k[0] for k in keys]
            # A missing key (None) has no rows here, but would turn the lookup's ints
            # into floats: such lists take the dict.
            if None not in vals:
                return np.asarray(vx.get_indexer(pd.Index(vals)), dtype=np.int64)
        idx = self.index
        return np.fromiter((idx.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    @overload
    def get(self, key: tuple[Any, ...]) -> np.ndarray | None: ...

    @overload
    def get(self, key: tuple[Any, ...], default: np.ndarray) -> np.ndarray: ...

    def get(self, key: tuple[Any, ...], default: np.ndarray | None = None
            ) -> np.ndarray | None:
        i = -1
        if self._vindex is not None and self._index is None and key[0] is not None:
            # One key: a hash lookup, not get_indexer's array round trip. A miss asks
            # the dict, which also matches keys of another type (True for 1).
            with contextlib.suppress(KeyError, TypeError):
                i = int(cast(int, self._vindex.get_loc(key[0])))  # unique: a position
        if i < 0:
            i = self.index.get(key, -1)
        if i < 0:
            return default
        return self.order[self.starts[i]:self.starts[i + 1]]

    def take(self, keys: Sequence[tuple[Any, ...]] | np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``keys``, concatenated in that order, and each key's row count
        (0 for a key with no rows)."""
        return self.take_codes(self.codes(keys))

    def take_codes(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``take`` by the keys' codes (-1: a key with no rows)."""
        found = codes >= 0
        safe = np.where(found, codes, 0)
        first, sizes = self.starts[safe], np.where(found, np.diff(self.starts)[safe], 0)
        offsets = np.cumsum(sizes) - sizes
        at = np.arange(int(sizes.sum())) - np.repeat(offsets - first, sizes)
        return self.order[at], sizes

    def covered_by(self, keys: Sequence[tuple[Any, ...]] | np.ndarray) -> bool:
        """Whether ``keys`` include every key the rows hold."""
        codes = self.codes(keys)
        seen = np.zeros(len(self), dtype=bool)
        seen[codes[codes >= 0]] = True
        return bool(seen.all())

    def __len__(self) -> int:
        return len(self.starts) - 1


@dataclass
class Loaded:
    frame: pd.DataFrame
    nbytes: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    parts: dict[str, int] | None = None  # tokens of the pieces a shuffled unit came from
    _positions: Positions | None = None

    def grouped(self, split_by: Sequence[str]) -> tuple[pd.DataFrame, Positions]:
        """The rows and their positions per split key, computed once per loaded unit
        and worker. Use the frame returned, not an earlier ``frame``:

        rows not grouped by key (unsorted input) are regrouped here, once. Each task's
        rows are then one run, taken as a view, instead of a copy per task and spec
        (~1 ms per 50,000 rows per text column)."""
        if self._positions is None:
            self.frame, self._positions = _grouped(self.frame, Positions(self.frame, split_by))
        return self.frame, self._positions

    def __getstate__(self) -> dict[str, Any]:
        # Positions are recomputed on a receiving worker (~65 ms per 1M rows): pickling
        # one small array per slice made a 1M-row transfer take seconds under the GIL.
        return {**self.__dict__, "_positions": None}


def _grouped(df: pd.DataFrame, pos: Positions) -> tuple[pd.DataFrame, Positions]:
    """``df`` with its rows in ``pos``'s order (a copy only when they are not already),
    and ``pos`` for it."""
    if len(pos.order) > 1 and not (np.diff(pos.order) == 1).all():
        df = df.take(pos.order)
        pos.order = np.arange(len(pos.order))
    return df, pos


@sizeof.register(Loaded)
def _sizeof_loaded(obj: Loaded) -> int:
    """What a loaded unit really holds, so Dask can account for it and spill it."""
    return int(sizeof(obj.frame)) + 64


class Packed(Generic[T]):
    """A task argument pickled once by the driver and unpickled only where the task
    runs. The scheduler otherwise unpickles and re-pickles every argument it relays:
    0.1 s of the driver process's CPU per 10^5 fit items. Dask also walks lists, tuples
    and dicts element by element looking for futures: 0.5 s per 10^5 split keys."""

    __slots__ = ("blob",)

    def __init__(self, value: T) -> None:
        self.blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def unpack(self) -> T:
        return cast(T, pickle.loads(self.blob))

    def __reduce__(self) -> tuple[Any, ...]:
        return _packed, (self.blob,)


def _packed(blob: bytes) -> Packed[Any]:
    p: Packed[Any] = Packed.__new__(Packed)
    p.blob = blob
    return p


def load_unit(src: Source, rgs: Sequence[RowGroup], columns: Sequence[str],
              split_by: Sequence[str], keys: Packed[Keys]) -> Loaded | LoadFailed:
    """Read a unit's row groups (needed columns only) and keep the unit's slices."""
    settle_worker_process()  # before unpickling the unit's keys: see there
    return _load(src, rgs, columns, split_by, keys.unpack())


@dataclass(frozen=True)
class UnitRead:
    """A load unit that its only task reads itself (see ``_merge``): no load task, no
    wait for the scheduler to hear it finished and send the fit task, and no copy of
    the rows kept in the worker's memory after the task."""

    src: Source
    row_groups: Sequence[RowGroup]
    columns: Sequence[str]
    split_by: Sequence[str]
    keys: Keys  # see key_column


def _load(src: Source, rgs: Sequence[RowGroup], columns: Sequence[str],
          split_by: Sequence[str], wanted: Keys) -> Loaded | LoadFailed:
    try:
        df, nbytes = src.read(columns, rgs, split_by)
    except CorruptFile as exc:
        return LoadFailed(exc)
    if split_by and not df.empty:
        # The positions index every key the rows hold; when the unit wants them all
        # (sorted data, usually) it serves as is, without matching rows to keys.
        pos = Positions(df, split_by)
        if len(pos) <= len(wanted) and pos.covered_by(wanted):
            df, pos = _grouped(df, pos)
            return Loaded(df, nbytes, _positions=pos)
    return Loaded(_restrict(df, split_by, wanted), nbytes)


def _restrict(df: pd.DataFrame, split_by: Sequence[str], keys: Keys) -> pd.DataFrame:
    if not split_by or df.empty:
        return df
    if len(split_by) > 1:  # a MultiIndex matches missing values (codes -1) to None
        idx = pd.MultiIndex.from_frame(df[list(split_by)])
        return df.loc[np.asarray(idx.isin(pd.MultiIndex.from_tuples(list(keys))))]
    # One column: isin does not match a None key to NaN or pd.NA (nor, beside other
    # values, to None), so the missing key (None, see _norm_key) is matched by isna.
    col = df[split_by[0]]
    present = keys if isinstance(keys, np.ndarray) else [k[0] for k in keys
                                                         if k[0] is not None]
    mask = np.asarray(pd.Index(col).isin(pd.Index(present)), dtype=bool)
    if len(present) < len(keys):
        mask |= np.asarray(col.isna(), dtype=bool)
    return df if mask.all() else df.loc[mask]  # sorted data: usually every row, no copy


Keys = Sequence[tuple[Any, ...]] | np.ndarray  # key tuples, or one int column's values
KeyUnits = tuple[Keys, np.ndarray]


def key_column(keys: Sequence[tuple[Any, ...]]) -> Keys:
    """Keys to send to a worker. Keys of one int column travel as an int64 array: 10^5
    key tuples took 0.03-0.07 s to unpickle, and 5*10^4 took 17 ms to look up."""
    try:
        vals = [k for (k,) in keys]  # unpacked in C: half the time of a check per key
    except ValueError:  # keys of several columns
        return list(keys)
    if set(map(type, vals)) <= {int}:  # exactly int: not bool
        with contextlib.suppress(OverflowError):  # beyond int64: as tuples
            return np.array(vals, dtype=np.int64)
    return list(keys)


def keys_at(every: Keys, slices: np.ndarray | Sequence[int]) -> Keys:
    """The keys of ``slices`` from ``every``: all slices' keys, in slice order, as
    ``key_column`` gives them (a run's, built once)."""
    at = np.asarray(slices, dtype=np.int64)
    return every[at] if isinstance(every, np.ndarray) else [every[i] for i in at.tolist()]


class SliceKeys(Mapping[int, tuple[Any, ...]]):
    """A task's split keys by slice index, held column-wise: the slice indices
    (ascending) and their keys as ``key_column`` sends them. A dict of 16,667 key
    tuples took 3.7 ms to unpickle in each of tiny's first tasks, and looking the
    keys' rows up by tuple 3 ms more."""

    __slots__ = ("by_slice", "slices")

    def __init__(self, slices: Sequence[int] | np.ndarray, keys: Keys) -> None:
        """``keys``: each slice's, as key tuples or as ``key_column`` gives them."""
        self.slices = np.asarray(slices, dtype=np.int32)  # as plan.Items holds them
        if len(self.slices) != len(keys) or (np.diff(self.slices) <= 0).any():
            raise ValueError("slices must ascend, one key each")
        self.by_slice = keys if isinstance(keys, np.ndarray) else key_column(keys)

    @classmethod
    def of(cls, slices: np.ndarray, every: Keys) -> SliceKeys:
        """The keys of ``slices`` (ascending) from ``every`` (see ``keys_at``)."""
        return cls(slices, keys_at(every, slices))

    def __getitem__(self, s: int) -> tuple[Any, ...]:
        i = int(np.searchsorted(self.slices, s))
        if i == len(self.slices) or self.slices[i] != s:
            raise KeyError(s)
        k = self.by_slice
        return (int(k[i]),) if isinstance(k, np.ndarray) else k[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self.slices.tolist())

    def __len__(self) -> int:
        return len(self.slices)

    def column(self, slices: np.ndarray) -> Keys:
        """The keys of ``slices`` (each one of these), in that order."""
        at = np.searchsorted(self.slices, slices)
        if at.size and (not len(self) or not np.array_equal(
                self.slices[np.minimum(at, len(self) - 1)], slices)):
            raise KeyError("a slice of another task")
        return keys_at(self.by_slice, at)


def key_units(keys: Sequence[tuple[Any, ...]], units: Sequence[int]) -> KeyUnits:
    """The shuffle's map of split keys to load units, as two columns (``key_column``)."""
    return key_column(keys), np.asarray(units, dtype=np.int64)


def partition(src: Source, rgs: Sequence[RowGroup], columns: Sequence[str],
              split_by: Sequence[str], key_unit: Packed[KeyUnits]
              ) -> dict[int, Loaded] | LoadFailed:
    """Shuffle step for data not sorted by the split key: one read, rows bucketed by unit."""
    settle_worker_process()
    try:
        df, nbytes = src.read(columns, rgs, split_by)
    except CorruptFile as exc:
        return LoadFailed(exc)
    if df.empty:
        return {}
    # Rows ordered by unit, then key, then as read, cut per unit: no Python step per
    # key (a dict of 10^5 index arrays took most of a step on tiny).
    pos = Positions(df, split_by)
    keys, unit_of = key_unit.unpack()
    found = pos.codes(keys)
    code_unit = np.full(len(pos), -1, dtype=np.int64)
    code_unit[found[found >= 0]] = unit_of[found >= 0]
    codes = stable_order(code_unit + 1)  # keys of no unit (-1) first, then dropped
    codes = codes[code_unit[codes] >= 0]
    if not codes.size:
        return {}
    rows, sizes = pos.take_codes(codes)
    units = code_unit[codes]
    first = np.r_[0, np.flatnonzero(np.diff(units)) + 1]  # each unit's first key
    cuts = np.cumsum(sizes)[first[1:] - 1]
    share = nbytes / max(len(df), 1)
    return {int(u): Loaded(df.iloc[r], int(share * len(r)))
            for u, r in zip(units[first], np.split(rows, cuts), strict=True)}


def piece(parts: dict[int, Loaded] | LoadFailed, unit: int) -> Loaded | LoadFailed | None:
    return parts if isinstance(parts, LoadFailed) else parts.get(unit)


_SCRATCH_CODEC = "lz4" if pa.Codec.is_available("lz4") else None


def partition_to_store(src: Source, rgs: Sequence[RowGroup], columns: Sequence[str],
                       split_by: Sequence[str], key_unit: Packed[KeyUnits],
                       store: Store, folder: str, index: int
                       ) -> dict[int, tuple[str, int]] | LoadFailed:
    """The shuffle step, spilled: rows bucketed by unit are written to scratch files in
    the store, so no worker holds more than one batch of row groups, whatever the
    data's size. Returns unit -> (scratch file, its share of the input bytes).

    Scratch is Arrow IPC with LZ4, not Parquet: it is read back once, by mixedscale,
    and a unit gathers one piece per partition (~90 on 5 GB), where Parquet's encoding
    cost 4x more to write and to read at the same size."""
    out: dict[int, tuple[str, int]] = {}
    options = pa.ipc.IpcWriteOptions(compression=_SCRATCH_CODEC)
    parts = partition(src, rgs, columns, split_by, key_unit)
    if isinstance(parts, LoadFailed):
        return parts
    for u, loaded in parts.items():
        path = store.path("_tmp", folder, f"u{u}", f"p{index}.arrow")
        table = pa.Table.from_pandas(loaded.frame, preserve_index=False)
        tmp = f"{path}.{uuid.uuid4().hex}"
        try:
            store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with store.fs.open(tmp, "wb") as fh, \
                    pa.ipc.new_file(fh, table.schema, options=options) as writer:
                writer.write_table(table)
            # Whole files only: a recomputed partition (its worker died) rewrites the
            # file while fit tasks may be reading the first copy.
            if store.local:
                os.replace(tmp, path)
            else:
                store.fs.mv(tmp, path)
        except OSError as exc:
            raise StoreError(f"writing shuffle scratch {path!r} failed: {exc}") from exc
        out[u] = (path, loaded.nbytes)
    return out


class ScratchGone(StoreError):
    """A run's shuffle scratch folder no longer exists: retrying cannot help."""


def load_shuffled(store: Store, parts: Sequence[dict[int, tuple[str, int]]], unit: int
                  ) -> Loaded:
    """A unit's rows from the scratch files of every shuffle partition."""
    settle_worker_process()
    tables, nbytes = [], {}
    for part in parts:
        if unit in part:
            path, nb = part[unit]
            try:
                tables.append(pa.ipc.open_file(read_whole(store.fs, path)).read_all())
            except (OSError, pa.ArrowException) as exc:
                folder = path.rsplit("/", 2)[0]  # <scratch>/u<unit>/p<n>.arrow
                if isinstance(exc, FileNotFoundError) and not store.fs.exists(folder):
                    silent = SILENT_HEARTBEATS * HEARTBEAT_SECONDS / 60
                    raise ScratchGone(
                        f"this run's shuffle scratch {folder!r} is gone: another run on "
                        "this store took this run for dead (its manifest's heartbeat had "
                        f"stopped for {silent:.0f} minutes) and removed it, or it was "
                        "deleted by hand; rerun the job to resume (committed fits are "
                        "kept)") from exc
                raise StoreError(f"reading shuffle scratch {path!r} failed: {exc}") from exc
            nbytes[path] = nb
    # One conversion for all pieces: per-piece to_pandas and concat was twice the time.
    frame = (pa.concat_tables(tables, promote_options="permissive").to_pandas() if tables
             else pd.DataFrame())
    loaded = Loaded(frame, 0)
    loaded.parts = nbytes
    return loaded


# The last shuffled unit this worker process read, by its scratch files: a unit's tasks
# run one after another on its home worker (plan order, ``executor._Run.home_units``),
# and each re-reading the unit cost ~0.1 s/1M rows.
_SHUFFLED: dict[tuple[Any, ...], Loaded] = {}
_SHUFFLED_LOCK = threading.Lock()


def forget_shuffled() -> None:
    """Drop this process's cached shuffled unit (at the end of a run)."""
    with _SHUFFLED_LOCK:
        _SHUFFLED.clear()


def _merge(data: Loaded | LoadFailed | pd.DataFrame | dict[str, Any] | Packed[UnitRead]
           | Sequence[Loaded | LoadFailed | None], store: Store | None = None) -> Loaded:
    """A task's data: a loaded unit, a unit to read here (``UnitRead``), in-memory
    shuffle pieces, or {"unit", "scratch"}: a unit read from shuffle scratch files
    inside the fit task itself. (A separate load task per unit would become runnable
    for every unit at once when the shuffle ends, and Dask would run them all, holding
    every unit in memory.) Raises CorruptFile if a read it depends on met one."""
    if isinstance(data, Packed):
        r = data.unpack()
        data = _load(r.src, r.row_groups, r.columns, r.split_by, r.keys)
    if isinstance(data, Loaded):
        return data
    if isinstance(data, LoadFailed):
        raise data.error
    pieces = data["scratch"] if isinstance(data, dict) else \
        [] if isinstance(data, pd.DataFrame) else data
    for d in pieces:  # a shuffle step's read that met a corrupt file
        if isinstance(d, LoadFailed):
            raise d.error
    if isinstance(data, dict):
        if store is None:
            raise StoreError("a shuffled unit needs the store that holds its scratch files")
        unit = int(data["unit"])
        key = tuple(p[unit] for p in data["scratch"] if unit in p)
        with _SHUFFLED_LOCK:
            hit = _SHUFFLED.get(key)
            if hit is None:
                _SHUFFLED.clear()  # one unit at a time: drop the last before reading
                hit = _SHUFFLED[key] = load_shuffled(store, data["scratch"], unit)
        return hit
    if isinstance(data, pd.DataFrame):
        return Loaded(data, 0)
    got = [d for d in data if isinstance(d, Loaded)]
    if not got:
        return Loaded(pd.DataFrame(), 0, "")
    merged = Loaded(pd.concat([d.frame for d in got], ignore_index=True), 0)
    merged.parts = {d.token: d.nbytes for d in got}
    return merged


def _run_with_timeout(n: int, fn: Callable[[int], Any], budgets: Sequence[float] | None,
                      on_timeout: Callable[[int], Any]) -> tuple[list[Any], int]:
    """Run fn(0..n-1) in order; a call that overruns its budget (seconds) is abandoned."""
    if budgets is None:
        return [fn(i) for i in range(n)], 0
    results: list[Any] = [None] * n
    state = {"gen": 0, "i": 0, "t": time.monotonic()}
    lock = threading.Lock()
    done = threading.Event()

    def loop(gen: int, start: int) -> None:
        for i in range(start, n):
            with lock:
                if state["gen"] != gen:
                    return
                state["i"], state["t"] = i, time.monotonic()
            r = fn(i)
            with lock:
                if state["gen"] != gen:
                    return
                results[i] = r
        done.set()

    threading.Thread(target=loop, args=(0, 0), daemon=True).start()
    timed_out = 0
    # Sleep until the running call's deadline, but at most 1/20 of the smallest budget (a
    # later call may have a smaller one): each wake takes the GIL from the fits, and a
    # 0.5 s poll made genes' fits ~5 % slower under a 120 s timeout.
    cap = max(min(budgets, default=1.0) / 20, 0.01)
    wait = cap
    while not done.wait(wait):
        with lock:
            i = int(state["i"])
            left = state["t"] + budgets[i] - time.monotonic()
            if left >= 0:
                wait = min(max(left, 0.01), cap)
                continue
            wait = cap
            state["gen"] += 1
            results[i] = on_timeout(i)
            timed_out += 1
            if i + 1 >= n:
                done.set()
                break
            state["i"], state["t"] = i + 1, time.monotonic()
            gen = int(state["gen"])
        threading.Thread(target=loop, args=(gen, i + 1), daemon=True).start()
    return results, timed_out


def _error_result(spec: ModelSpec, etype: str, msg: str) -> FitResult:
    from .single import PARAM_COLUMNS, VARIANCE_COLUMNS, _empty_record

    rec = _empty_record(spec)
    # No design was built (a timeout, a crash, unreadable input): counts unknown, not 0.
    rec.update(status="error", error_type=etype, error_message=msg, n_obs=None,
               n_dropped=None, n_groups=None)
    return FitResult(rec, pd.DataFrame(columns=PARAM_COLUMNS),
                     pd.DataFrame(columns=VARIANCE_COLUMNS))


def _work_units(task: Task, specs: dict[int, ModelSpec]) -> list[tuple[str, list[int]]]:
    """Items grouped into batches (many slices of one spec) and single fits."""
    col = task.columns.specs
    units: list[tuple[str, list[int]]] = []
    for spec_idx in dict.fromkeys(col.tolist()):  # in order of first appearance
        idxs = np.flatnonzero(col == spec_idx).tolist()
        if len(idxs) >= MIN_BATCH and batchable(specs[spec_idx]):
            units.append(("batch", idxs))
        else:
            units.extend(("one", [i]) for i in idxs)
    return units


class _TaskKeys:
    """The task's fit ids (per item) and split columns (per slice) as Arrow arrays,
    built once per task: batches take their rows' keys from them, in C, instead of
    converting Python strings and keys per batch and table (~3 % of a tiny fit)."""

    def __init__(self, payload: TaskPayload, cols: Items) -> None:
        self.items = cols
        self.fit_ids = pa.array(cols.fit_ids, type=pa.string())
        self.slices = payload.keys.slices
        self.split = [_key_array(payload.keys.by_slice, j, f.type)
                      for j, f in enumerate(payload.key_fields)]
        self.names = [f.name for f in payload.key_fields]

    def keyed(self, table: pa.Table, items: np.ndarray, spec: ModelSpec) -> pa.Table:
        """Batch output rows (by ``_slice``, a position in ``items``, the batch's item
        indices) with fit_id, split columns and spec_id in front."""
        it = items[table.column("_slice").to_numpy()]
        at = np.searchsorted(self.slices, self.items.slices[it])
        cols: dict[str, Any] = {"fit_id": self.fit_ids.take(it)}
        for name, col in zip(self.names, self.split, strict=True):
            cols[name] = col.take(at)
        cols["spec_id"] = constant(spec.spec_id, table.num_rows, pa.string())
        for name in table.column_names:
            if name != "_slice":
                cols[name] = table.column(name)
        return pa.table(cols)


def _key_array(keys: Keys, j: int, typ: pa.DataType) -> pa.Array:
    """Split column ``j`` of ``keys`` as an Arrow array of the data's type."""
    if isinstance(keys, np.ndarray):  # one int column
        with contextlib.suppress(pa.ArrowException):
            return pa.array(keys, type=typ)
        return pa.array(keys.tolist(), type=typ)
    return pa.array([k[j] for k in keys], type=typ, from_pandas=True)


def build_tables(payload: TaskPayload, items: Sequence[FitItem], results: Sequence[FitResult],
                 extra: dict[str, list[pa.Table]] | None = None) -> dict[str, pa.Table]:
    """The task's three tables; ``extra`` holds params/variance already keyed by fit_id."""
    fits_rows: list[dict[str, Any]] = []
    kf = payload.key_fields
    schemas = {name: table_schema(name, kf) for name in ("fits", "params", "variance")}
    out: dict[str, list[pa.Table]] = {t: list((extra or {}).get(t, []))
                                      for t in ("fits", "params", "variance")}
    # Tidy rows gathered column by column and converted once per task: a table per fit
    # (pandas assign, then Arrow) was ~3.6 ms per fit, more than many fits themselves.
    tidy: dict[str, dict[str, list[Any]]] = {"params": {}, "variance": {}}
    for item, r in zip(items, results, strict=True):
        key = payload.keys[item.slice]
        # The planned spec's id, as the fit id has it: a run-wide engine override
        # fits a copy of the spec (engine is in its id), but the rows are the user's.
        head = {"fit_id": item.fit_id, **dict(zip(payload.split_by, key, strict=True)),
                "spec_id": payload.specs[item.spec].spec_id}
        fits_rows.append({**r.fit, **head})
        for name, frame in (("params", r.params), ("variance", r.variance)):
            n = len(frame)
            if n:
                cols = tidy[name]
                for f in schemas[name]:
                    vals = ([head[f.name]] * n if f.name in head
                            else frame[f.name].tolist() if f.name in frame.columns
                            else [None] * n)
                    cols.setdefault(f.name, []).extend(vals)
    for name, cols in tidy.items():
        if cols:  # from_pandas: NaN as null (pandas' missing value)
            out[name].append(pa.table({f.name: pa.array(cols[f.name], type=f.type,
                                                         from_pandas=True)
                                       for f in schemas[name]}))
    if fits_rows:  # NaN as null, as in the tidy rows (batched rows hold no NaN)
        out["fits"].insert(0, nan_to_null(pa.Table.from_pylist(
            fits_rows, schema=schemas["fits"])))
    tables = {}
    for name, parts in out.items():
        schema = schemas[name]
        tables[name] = (pa.concat_tables([_as_schema(t, schema) for t in parts])
                        if parts else schema.empty_table())
    fits = tables["fits"]
    i = fits.schema.get_field_index("run_id")
    tables["fits"] = fits.set_column(i, fits.schema.field(i),
                                     constant(payload.run_id, fits.num_rows, pa.string()))
    return tables


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns in ``schema``'s order and types. Batched rows usually have
    them already: a cast of 40 columns to their own types took ~0.2 ms a table."""
    table = table.select(schema.names)
    return table if table.schema.equals(schema) else table.cast(schema)


def failure_tables(payload: TaskPayload, etype: str, msg: str) -> dict[str, pa.Table]:
    """Error rows for every item of a task that could not run (crash, memory, corrupt input)."""
    items = payload.task.items
    res = [_error_result(payload.specs[it.spec], etype, msg) for it in items]
    return build_tables(payload, items, res)


_SETTLED = threading.Event()


def settle_worker_process() -> None:
    """Once per Dask worker process, at the start of its first task (of any kind: a
    load, a shuffle step or a fit task):
    - move the heap as it is then (modules, Dask's own state) out of the cyclic
      collector's full passes. It lives as long as the process, and re-scanning it cost
      each worker 0.1-0.2 s per 10^5 fits, and 0.1 s of unpickling the 50,000 split
      keys of a tiny load unit (6 ms frozen);
    - let glibc serve large temporaries from the heap again where Dask's default trim
      threshold stopped it (``_malloc``: fits took up to twice as long).
    Only in a process of its own (started by a nanny): a threaded worker shares the
    caller's process, whose heap is not ours to freeze or tune."""
    if _SETTLED.is_set():
        return
    try:
        from distributed import get_worker

        own_process = get_worker().nanny is not None
    except (ImportError, ValueError, AttributeError):
        own_process = False
    if own_process:
        _SETTLED.set()
        gc.freeze()
        heap_for_temporaries()


def run_task(payload: TaskPayload, data: Any, store: Store | None) -> TaskOutcome:
    """Fit every item of a task and commit its parts (or return them for in-memory runs)."""
    with one_blas_thread():
        return _run_task(payload, data, store)


def _run_task(payload: TaskPayload, data: Any, store: Store | None) -> TaskOutcome:
    t0 = time.perf_counter()
    settle_worker_process()
    task = payload.task
    columns = task.columns
    faults = bool(os.environ.get(_FAULTS_ENV))
    _maybe_inject(payload)
    try:
        loaded = _merge(data, store)
    except CorruptFile as exc:  # returned, not raised: see LoadFailed
        return TaskOutcome(key=task.key, n_fits=0, by_status={}, fit_seconds=0.0,
                           wall_seconds=time.perf_counter() - t0, committed=False,
                           worker=_worker_address(), corrupt=exc)
    df, pos = loaded.grouped(payload.split_by)
    t_data = time.perf_counter()
    monitor = _MemoryMonitor(store, payload) if store is not None else None
    specs = {k: (v.replace(engine=payload.engine) if payload.engine and v.engine != payload.engine
                 else v) for k, v in payload.specs.items()}

    slice_frames: dict[tuple[Any, ...], pd.DataFrame] = {}

    def one(i: int) -> FitResult:
        item = task.items[i]
        spec = specs[item.spec]
        key = payload.keys[item.slice]
        if key not in slice_frames:  # one frame per slice: its specs share design matrices
            rows = pos.get(key)
            if len(slice_frames) >= 64:
                slice_frames.clear()
            slice_frames[key] = df.iloc[rows] if rows is not None else df.iloc[0:0]
        sub = slice_frames[key]
        _maybe_inject(payload, key)
        try:
            return fit_shared(sub, spec, sub)
        except MixedscaleError as exc:  # e.g. a column typed differently in this slice
            return _error_result(spec, type(exc).__name__, str(exc))

    Chunk = tuple[list[tuple[int, FitResult]], dict[str, list[pa.Table]]]
    subsets: dict[bytes, tuple[pd.DataFrame, np.ndarray]] = {}
    designs: dict[tuple[Any, ...], Any] = {}  # fit_slices' cache for the rows in ``subsets``
    task_keys: _TaskKeys | None = None  # built at the first batch that keeps fits

    def batch(idxs: list[int]) -> Chunk:
        """Slices of one spec fitted together; the ones not verified there go to fit().

        Rows are returned, not shared: an abandoned (timed-out) run must not leak any."""
        nonlocal task_keys
        spec = specs[int(columns.specs[idxs[0]])]
        sl_idx = columns.slices[idxs]
        keys = payload.keys.column(sl_idx)
        if faults:
            for k in sl_idx.tolist():
                _maybe_inject(payload, payload.keys[k])
        tk = sl_idx.tobytes()
        if tk not in subsets:  # specs of a task usually share its slices: take rows once
            rows, sizes = pos.take(keys)
            sl = np.repeat(np.arange(len(keys)), sizes)
            subsets.clear()
            designs.clear()
            # Sorted data: a task's slices are one run of rows, taken as a view, not a copy.
            run = rows.size and rows[-1] - rows[0] + 1 == rows.size and bool(
                (np.diff(rows) == 1).all())
            subsets[tk] = (df.iloc[rows[0]:rows[-1] + 1] if run else df.iloc[rows], sl)
        frame, sl = subsets[tk]
        try:
            out = fit_slices(frame, sl, spec, len(keys), cache=designs)
        except MixedscaleError:
            out = None
        if out is None:
            return [(i, one(i)) for i in idxs], {}
        frames: dict[str, list[pa.Table]] = {}
        if task_keys is None:
            task_keys = _TaskKeys(payload, columns)
        items = np.asarray(idxs, dtype=np.int64)
        planned = payload.specs[int(columns.specs[idxs[0]])]  # the user's spec, for its id
        for name in ("fits", "params", "variance"):
            table = getattr(out, name)
            if table.num_rows:
                frames[name] = [task_keys.keyed(table, items, planned)]
        return [(idxs[j], one(idxs[j])) for j in out.fallback], frames

    def timeout_rows(idxs: list[int]) -> Chunk:
        out = []
        for i in idxs:
            r = _error_result(specs[task.items[i].spec], "FitTimeout",
                              f"fit exceeded the per-fit timeout of {payload.timeout:g} s")
            r.fit["fit_seconds"] = payload.timeout  # at least: so "slowest fits" lists it
            out.append((i, r))
        return out, {}

    def run_all(units: list[tuple[str, list[int]]]) -> tuple[list[Chunk | None], int]:
        def run_unit(u: int) -> Chunk:
            kind, idxs = units[u]
            return batch(idxs) if kind == "batch" else ([(idxs[0], one(idxs[0]))], {})

        def timed_out(u: int) -> Chunk | None:
            # A batch over its budget is retried fit by fit, so only the slow one fails.
            return None if units[u][0] == "batch" else timeout_rows(units[u][1])

        budgets = None if payload.timeout is None else [payload.timeout * len(i)
                                                        for _, i in units]
        return _run_with_timeout(len(units), run_unit, budgets, timed_out)

    units = _work_units(task, specs)
    try:
        chunks, n_timeout = run_all(units)
        retry = [i for u, c in zip(units, chunks, strict=True) if c is None for i in u[1]]
        if retry:
            again, n2 = run_all([("one", [i]) for i in retry])
            chunks, n_timeout = chunks + again, n_timeout + n2
    finally:
        if monitor is not None:
            monitor.stop()
    t_fits = time.perf_counter()
    by_item: dict[int, FitResult] = {}  # fits made one by one; batched ones are in ``extra``
    extra: dict[str, list[pa.Table]] = {"fits": [], "params": [], "variance": []}
    for c in chunks:
        if c is None:
            continue
        by_item.update(c[0])
        for name, frames in c[1].items():
            extra[name].extend(frames)
    singles = sorted(by_item)
    results = [by_item[i] for i in singles]
    tables = build_tables(payload, [task.items[i] for i in singles], results, extra)
    n_batched = sum(t.num_rows for t in extra["fits"])
    if n_batched + len(results) != len(task.items):  # an internal invariant, not user input
        raise RuntimeError(f"task {task.key}: {len(task.items)} items but "
                           f"{n_batched + len(results)} fit rows")
    by_status: dict[str, int] = {"ok": n_batched} if n_batched else {}
    for r in results:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    fit_seconds = float(sum(r.fit["fit_seconds"] or 0.0 for r in results)) + sum(
        float(pc.sum(t.column("fit_seconds")).as_py() or 0.0) for t in extra["fits"])
    committed = False
    t_tables = time.perf_counter()
    if store is not None:
        committed = store.publish(task.key, tables)
    t_end = time.perf_counter()
    return TaskOutcome(
        key=task.key, n_fits=len(task.items), by_status=by_status, fit_seconds=fit_seconds,
        wall_seconds=t_end - t0, committed=committed,
        timed_out=n_timeout, worker=_worker_address(),
        tables=None if store is not None else tables,
        loads=loaded.parts or {loaded.token: loaded.nbytes},
        phases={"data": t_data - t0, "fits": t_fits - t_data, "tables": t_tables - t_fits,
                "write": t_end - t_tables},
    )


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


# The monitor looks again before memory growing this fast could pass its mark, and at
# least once a second: each wake takes the GIL from the fit thread, and a fixed 50 ms
# poll made genes' fits 4-11 % slower on 2 workers (each fitting all 6,000, monitor on
# and off alternating, 4 experiments). The fault suite's memory hog grows 0.9-2.6 GiB/s.
_GROWTH_BYTES_PER_S = 4 * 2**30
_POLL_MIN_S, _POLL_MAX_S = 0.05, 1.0
_MARK = 0.8  # of the memory limit; Dask's nanny restarts the worker at 0.95


def next_poll(headroom: float) -> float:
    """Seconds until the memory monitor's next look, ``headroom`` bytes below its mark."""
    return min(_POLL_MAX_S, max(_POLL_MIN_S, headroom / _GROWTH_BYTES_PER_S))


class _MemoryMonitor:
    """Leaves a marker in the store when the worker nears its memory limit, so a
    task killed by the nanny can be reported as a memory failure, not a crash."""

    def __init__(self, store: Store, payload: TaskPayload) -> None:
        self._stop = threading.Event()
        self.limit = 0
        try:
            from distributed import get_worker

            self.limit = int(get_worker().memory_manager.memory_limit or 0)
        except (ImportError, ValueError, AttributeError):
            return
        if not self.limit:
            return
        self.marker = "/".join([store.marker_dir(payload.run_id, "oom"), payload.task.key])
        self.store = store
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        import psutil

        proc = psutil.Process()
        mark = _MARK * self.limit
        while True:
            rss = proc.memory_info().rss
            if rss > mark:
                break
            if self._stop.wait(next_poll(mark - rss)):
                return
        try:
            self.store.fs.makedirs(self.marker.rsplit("/", 1)[0], exist_ok=True)
            with self.store.fs.open(self.marker, "w") as fh:
                fh.write(str(rss))
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()


# -- fault injection for the test suite ------------------------------------------------
# MIXEDSCALE_TEST_FAULTS holds a JSON list of rules; unset in production: one lookup.
#   {"key": ["g007"], "do": "kill"}          at the fit of slice g007 ("at": "fit")
#   {"at": "task_start", "do": "sleep", "seconds": 0.2}   when any task starts
#   {"at": "publish", "table": "fits", "do": "enospc"}    see Store._publish_one
# "do": kill | hang | oom | raise | sleep (+ "seconds"); "once": PATH makes a rule fire
# in the first process that creates PATH (its pid is written there), never again;
# "while": PATH makes it fire only while PATH exists.
_FAULTS_ENV = FAULTS_ENV


def _maybe_inject(payload: TaskPayload, key: tuple[Any, ...] | None = None) -> None:
    if not os.environ.get(_FAULTS_ENV):
        return
    for rule in fault_rules("task_start" if key is None else "fit"):
        if key is not None and [str(k) for k in key] != [str(k) for k in rule.get("key", [])]:
            continue
        if not claim_fault(rule):
            continue
        act = rule.get("do")
        if act == "kill":
            os._exit(17)
        elif act == "hang":
            time.sleep(float(rule.get("seconds", 3600)))
        elif act == "oom":
            _hog_memory()
        elif act == "raise":
            raise DataError(str(rule.get("message", "injected failure")))
        elif act == "sleep":
            time.sleep(float(rule.get("seconds", 1)))


def _hog_memory() -> None:
    """Grow resident memory steadily (so memory monitors see it coming) until killed."""
    hog = []
    for _ in range(512):  # at most 8 GiB, then give up
        hog.append(np.ones(2 * 2**20))  # 16 MiB, touched
        time.sleep(0.002)
    raise MemoryError("injected memory hog was not stopped")
