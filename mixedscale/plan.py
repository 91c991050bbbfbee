"""The planner: slices x specs -> load units and fit tasks, with no fitting and no cluster.

Packing is deterministic and independent of the cluster's size, so a rerun,
a concurrent duplicate submission or a zombie writer from a killed driver
always produces the same task keys, and the store's no-clobber commit by task
key keeps every fit exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, NamedTuple, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError, SpecError
from .source import Source, read_split_keys
from .spec import ModelSpec, unique_specs
from .store import plain_type

__all__ = ["FitItem", "Items", "LoadUnit", "Plan", "Task", "make_plan"]

# Cost model, in estimated milliseconds of fitting: fixed overhead per fit, plus
# rows x (1 + q^2) where q is the random-effect dimension.
_COST_FIXED_MS = 1.5
_COST_PER_ROW_MS = 0.0015
_SM_FACTOR = 12.0  # the statsmodels engine is roughly this much slower
# The batched fast engine (fitted to genes, sites and tiny): a per-slice share of the
# Newton steps, growing with the covariance parameters, plus rows x (1 + q^2).
_BATCH_FIXED_MS = 0.1
_BATCH_PER_ROW_MS = 0.0003
TASK_TARGET_MS = 2000.0  # big enough to amortize scheduling and batching, small to balance
# Small jobs are split into at least this many tasks, for parallelism and balance.
# Fewer, larger tasks are cheaper per fit (the batched engine amortizes its per-step
# cost over more slices): 8 beat 16 by 10-15 % on genes with 2 workers, and 4 beat 8
# by 6 % (genes, tiny) to 14 % (multiverse) of wall. Parallelism on more workers comes
# from the tail (TAIL_SHARE), which cuts smaller tasks as the work left shrinks. Packing
# stays independent of the cluster, so a job's task names do not change with its size.
TASK_MIN_TASKS = 4
TASK_MIN_MS = 50.0  # ...but not below this: a task's fixed cost is ~10-20 ms
UNIT_MAX_ROWS = 1_000_000  # rows loaded at once by one task: its fit peaks near 0.5 GB
# Small data is still cut into a few units, at row-group boundaries, so several workers
# load in parallel instead of waiting for one load and a transfer.
UNIT_MIN_UNITS = 2
TAIL_SHARE = 4.0  # near the end, a task holds at most this fraction of the work left
TAIL_UNITS = 2  # the plan's last units, whose tails are cut together (see _tasks)
SHUFFLE_RATIO = 1.3  # direct reads above this x one pass switch to a shuffle


# Named tuples, not dataclasses: a plan holds one per slice and per fit (10^5+), and
# they are built, pickled into task payloads and unpickled several times faster.
class SliceInfo(NamedTuple):
    key: tuple[Any, ...]
    rows: int
    row_groups: tuple[int, ...]
    fingerprint: str


class FitItem(NamedTuple):
    fit_id: str
    slice: int
    spec: int


class Items(Sequence[FitItem]):
    """A task's fit items held column-wise: fit ids, slice and spec indices. A plan
    holds 10^5+ items; building (and unpickling, in every payload) a tuple per item cost
    ~1 us each, more than a tiny fit's share of its task. Indexing gives a FitItem."""

    __slots__ = ("fit_ids", "slices", "specs")

    def __init__(self, fit_ids: Sequence[str], slices: Sequence[int] | np.ndarray,
                 specs: Sequence[int] | np.ndarray) -> None:
        self.fit_ids = list(fit_ids)
        # int32: payloads travel through the scheduler; 2**31 slices is beyond any plan.
        self.slices = np.asarray(slices, dtype=np.int32)
        self.specs = np.asarray(specs, dtype=np.int32)
        if not len(self.fit_ids) == len(self.slices) == len(self.specs):
            raise ValueError("fit_ids, slices and specs differ in length")

    @classmethod
    def of(cls, items: Sequence[FitItem]) -> Items:
        if isinstance(items, Items):
            return items
        cols = tuple(map(list, zip(*items, strict=True))) if items else ([], [], [])
        return cls(*cols)

    def __len__(self) -> int:
        return len(self.fit_ids)

    @overload
    def __getitem__(self, i: int) -> FitItem: ...

    @overload
    def __getitem__(self, i: slice) -> Items: ...

    def __getitem__(self, i: int | slice) -> FitItem | Items:
        if isinstance(i, slice):
            return Items(self.fit_ids[i], self.slices[i], self.specs[i])
        return FitItem(self.fit_ids[i], int(self.slices[i]), int(self.specs[i]))

    def __iter__(self) -> Iterator[FitItem]:
        return map(FitItem, self.fit_ids, self.slices.tolist(), self.specs.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Items):
            return (self.fit_ids == other.fit_ids and np.array_equal(self.slices, other.slices)
                    and np.array_equal(self.specs, other.specs))
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other,
                                                                       strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self.fit_ids))

    def __repr__(self) -> str:
        return f"Items({len(self)} fits)"

    def __reduce__(self) -> tuple[Any, ...]:
        return Items, (self.fit_ids, self.slices, self.specs)


@dataclass(frozen=True)
class Task:
    key: str
    unit: int
    items: Sequence[FitItem]  # an Items, or any sequence of FitItem
    cost_ms: float
    isolated: bool = False  # a single fit split out of a failed task

    def single(self, item: FitItem) -> Task:
        return Task(key=f"{self.key}-f{item.fit_id[:12]}", unit=self.unit, items=(item,),
                    cost_ms=self.cost_ms / max(1, len(self.items)), isolated=True)

    @property
    def columns(self) -> Items:
        """The items column-wise."""
        return Items.of(self.items)

    def __reduce__(self) -> tuple[Any, ...]:
        # Items travel column-wise in every task payload: a list and two arrays.
        return _task, (self.key, self.unit, self.columns, self.cost_ms, self.isolated)


def _task(key: str, unit: int, items: Items, cost_ms: float, isolated: bool) -> Task:
    return Task(key, unit, items, cost_ms, isolated)


@dataclass(frozen=True)
class LoadUnit:
    index: int
    slices: tuple[int, ...]
    row_groups: tuple[int, ...]
    rows: int
    nbytes: int


@dataclass
class Plan:
    specs: list[ModelSpec]
    split_by: list[str]
    columns: list[str]
    slices: list[SliceInfo]
    units: list[LoadUnit]
    tasks: list[Task]
    shuffle: bool
    bytes_scan: int  # bytes read at plan time (split columns)
    bytes_one_pass: int  # one pass over the needed columns
    plan_seconds: float = 0.0
    skipped_files: dict[str, str] = field(default_factory=dict)
    # The split columns as the source types them: the type each store part holds them as.
    key_fields: list[pa.Field] = field(default_factory=list)

    @property
    def n_fits(self) -> int:
        return sum(len(t.items) for t in self.tasks)

    @property
    def bytes_planned(self) -> int:
        """Bytes the fit stage will read from the input (one pass when shuffling)."""
        if self.shuffle:
            return self.bytes_one_pass
        return sum(u.nbytes for u in self.units)

    def fit_ids(self) -> list[str]:
        return [f for t in self.tasks for f in t.columns.fit_ids]

    def describe(self) -> dict[str, Any]:
        return {"n_slices": len(self.slices), "n_specs": len(self.specs), "n_fits": self.n_fits,
                "n_tasks": len(self.tasks), "n_units": len(self.units), "shuffle": self.shuffle,
                "bytes_scan": self.bytes_scan, "bytes_planned": self.bytes_planned,
                "bytes_one_pass": self.bytes_one_pass, "plan_seconds": self.plan_seconds,
                "columns": self.columns, "skipped_files": self.skipped_files}


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def spec_cost_ms(spec: ModelSpec, rows: int) -> float:
    q = 0
    if spec.has_re:
        pf = spec.parsed["re"]
        q = 1 + len(pf.names) + pf.template.count("*")
    q += len(spec.vc_formula or {})
    cost = _COST_FIXED_MS + rows * _COST_PER_ROW_MS * (1 + q * q)
    if spec.engine == "statsmodels":
        return cost * _SM_FACTOR
    from .batch import batchable

    if batchable(spec):
        return _BATCH_FIXED_MS * (1 + q * q) ** 2 / 4 + rows * _BATCH_PER_ROW_MS * (1 + q * q)
    return cost


def _frame_fingerprints(src: Source, split_by: Sequence[str], columns: Sequence[str]
                        ) -> dict[tuple[Any, ...], str]:
    """Content hash per slice of an in-memory DataFrame (order-insensitive within a slice)."""
    from .source import _apply_filter_frame

    assert src.frame is not None
    df = _apply_filter_frame(src.frame.loc[:, list(columns)], src.filter)
    rowh = pd.util.hash_pandas_object(df, index=False).to_numpy()
    if not split_by:
        return {(): f"{int(rowh.sum(dtype=np.uint64))}:{len(df)}"}
    keys = df[list(split_by)]
    codes = keys.groupby(list(split_by), sort=True, dropna=False, observed=True).ngroup()
    sums = pd.Series(rowh).groupby(codes.to_numpy()).agg(["sum", "size"])
    first = keys.groupby(codes.to_numpy()).head(1)
    first_codes = codes.loc[first.index].to_numpy()
    out: dict[tuple[Any, ...], str] = {}
    for code, row in zip(first_codes, first.itertuples(index=False, name=None), strict=True):
        total, size = sums.at[code, "sum"], sums.at[code, "size"]
        out[_norm_key(row)] = f"{total!s}:{size!s}"
    return out


def _json_list(values: Sequence[Any]) -> str:
    """``json.dumps(list(values), default=str)``, byte for byte (fit ids depend on it),
    without the encoder's per-call cost for the usual str and int keys."""
    out = []
    for v in values:
        t = type(v)
        if t is str:
            out.append(encode_basestring_ascii(v))
        elif t is int:
            out.append(int.__repr__(v))
        else:
            return json.dumps(list(values), default=str)
    return "[" + ", ".join(out) + "]"


def _plain(text: str) -> bool:
    """JSON encodes ``text`` as itself in quotes (no escapes)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _tails(infos: Sequence[SliceInfo]) -> list[str]:
    """``f"{_json_list(key)}, {json.dumps(fingerprint)}]"`` per slice, byte for byte (the
    end of its fit id's JSON), without a function call per slice for one-column int or
    plain-text keys."""
    keys = [s.key for s in infos]
    fps = [s.fingerprint for s in infos]
    # _plain holds for a join iff it holds for each part (it tests characters): one
    # call, not one per fingerprint (86,000 distinct in tiny unsorted) or text key.
    if _plain("".join(fps)) and all(len(k) == 1 for k in keys):
        vals = [k[0] for k in keys]
        types = set(map(type, vals))
        if types == {int}:  # exactly int: bool is an int json spells true/false
            return [f'[{v}], "{f}"]' for v, f in zip(vals, fps, strict=True)]
        if types == {str} and _plain("".join(vals)):
            return [f'["{v}"], "{f}"]' for v, f in zip(vals, fps, strict=True)]
    return [f"{_json_list(s.key)}, {_json_list((s.fingerprint,))[1:]}" for s in infos]


def _norm_column(col: pd.Series) -> list[Any]:
    """A key column's values as ``_norm_key`` gives them: Python scalars, missing as None."""
    vals = col.tolist()
    # Nullable Int64/boolean (kind "i"/"b" too) and string columns give pd.NA for missing.
    if (col.dtype.kind in "iub" or isinstance(col.dtype, pd.StringDtype)) and not col.hasnans:
        return vals  # already Python scalars with no missing values
    return [_norm_key((v,))[0] for v in vals]


def _norm_key(row: Sequence[Any]) -> tuple[Any, ...]:
    """A split key as plain Python scalars, a missing value (NaN, pd.NA, NaT) as None:
    the form fit ids are computed from and rows are matched to their slice by."""
    out = []
    for v in row:
        if isinstance(v, np.generic):
            v = v.item()
        if (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT:
            v = None
        out.append(v)
    return tuple(out)


def make_plan(src: Source, specs: Sequence[ModelSpec], split_by: Sequence[str] = (),
              engine: str | None = None) -> Plan:
    """Check the schema against every spec, find the slices, and pack tasks.

    ``engine``: a run-wide engine override; it changes the cost model (and so the
    packing), not the fits' identities. A store resumes by fit id
    (``executor.pending``), so a different packing never refits committed fits."""
    t0 = time.perf_counter()
    specs = unique_specs(specs)
    if not specs:
        raise SpecError("no models to fit; give at least one spec; got (specs=[])")
    split_by = list(split_by)
    if len(set(split_by)) != len(split_by):
        raise SpecError(f"split_by names a column twice; got (split_by={split_by!r})")
    src.check_specs(specs, split_by)
    columns = src.needed_columns(specs, split_by)
    keys, bytes_scan = read_split_keys(src, split_by)
    if keys.empty or int(keys["_rows"].sum()) == 0:
        raise DataError("no rows to fit: the data is empty or the filter removes every row; "
                        f"got (filter={src.filter!r})")
    with _collector_paused():
        slices, rg_lists = _slices(src, keys, split_by, columns)
        rg_bytes = [rg.nbytes for rg in src.row_groups] or [0]
        one_pass = int(sum(rg_bytes)) if src.frame is None else 0
        units = _units(slices, rg_bytes, rg_lists)
        shuffle = src.frame is None and \
            sum(u.nbytes for u in units) > SHUFFLE_RATIO * max(one_pass, 1)
        tasks = _tasks(slices, units, specs, engine)
    return Plan(specs=specs, split_by=split_by, columns=columns, slices=slices, units=units,
                tasks=tasks, shuffle=shuffle, bytes_scan=bytes_scan, bytes_one_pass=one_pass,
                plan_seconds=time.perf_counter() - t0, skipped_files=dict(src.bad_files),
                key_fields=[(f := src.schema.field(c)).with_type(plain_type(f.type))
                            for c in split_by])


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Planning allocates a few tuples per slice and per fit, none of them in a cycle;
    the cyclic collector's passes over them were a quarter of planning 10^6 slices.
    (A host that disabled the collector keeps it disabled.)"""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _slices(src: Source, keys: pd.DataFrame, split_by: list[str], columns: list[str]
            ) -> tuple[list[SliceInfo], tuple[np.ndarray, np.ndarray]]:
    """One SliceInfo per split key (sorted), vectorized: 10^5+ slices plan in seconds.
    Also their row groups as arrays: the count per slice, and all of them in a row."""
    fps = _frame_fingerprints(src, split_by, columns) if src.frame is not None else None
    flt = json.dumps(src.filter, default=str)
    keys = keys.loc[keys["_rows"].to_numpy() > 0]
    if split_by:
        codes, uniq = _key_codes(keys, split_by)
        key_rows: list[tuple[Any, ...]] = list(zip(*[_norm_column(uniq[c]) for c in split_by],
                                                   strict=True))
    else:
        codes = np.zeros(len(keys), dtype=np.intp)
        key_rows = [()]
    n = len(key_rows)
    rows = np.bincount(codes, weights=keys["_rows"].to_numpy(dtype=float), minlength=n)
    # Distinct row groups per slice: sort (slice, rg) pairs, drop repeats, split.
    rg = keys["_rg"].to_numpy(dtype=np.int64)
    pairs = np.sort(codes.astype(np.int64) * (int(rg.max(initial=0)) + 1) + rg)
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
    p_slice, p_rg = np.divmod(pairs, int(rg.max(initial=0)) + 1)
    cuts = np.searchsorted(p_slice, np.arange(n + 1)).tolist()
    p_rgs = p_rg.tolist()
    # Comprehensions, not one loop with appends: 10^6 slices plan ~2x faster.
    rg_sets = [tuple(p_rgs[a:b]) for a, b in itertools.pairwise(cuts)]
    if fps is not None:
        fp_list = [fps.get(k, "") for k in key_rows]
    else:
        fp_list = _set_fingerprints(src, flt, rg_sets, np.asarray(cuts, dtype=np.int64), p_rg)
    sizes = np.rint(rows).astype(np.int64).tolist()
    return (list(map(SliceInfo._make, zip(key_rows, sizes, rg_sets, fp_list, strict=True))),
            (np.diff(np.asarray(cuts, dtype=np.int64)), p_rg.astype(np.int64)))


def _set_fingerprints(src: Source, flt: str, rg_sets: list[tuple[int, ...]],
                      cuts: np.ndarray, p_rg: np.ndarray) -> list[str]:
    """Each slice's fingerprint: ``_h([its row groups' fingerprints], flt)[:16]``,
    spelled out, hashed once per distinct set of row groups (shared by the slices
    reading it). Slice ``i``'s row groups are ``p_rg[cuts[i]:cuts[i + 1]]``, as
    ``rg_sets[i]``. The sets' JSON is joined by Arrow: a Python join per set took
    ~0.18 s of tiny unsorted's ~1.2 s plan (86,000 sets of ~13 row groups)."""
    if not rg_sets:
        return []
    first: dict[tuple[int, ...], int] = {}
    ids = [first.setdefault(t, len(first)) for t in rg_sets]
    rep = np.empty(len(first), dtype=np.int64)  # the first slice reading each set
    rep[np.asarray(ids, dtype=np.int64)[::-1]] = np.arange(len(ids) - 1, -1, -1)
    lo, lens = cuts[rep], cuts[rep + 1] - cuts[rep]
    offsets = np.r_[0, np.cumsum(lens)]
    flat = p_rg[np.repeat(lo - offsets[:-1], lens) + np.arange(offsets[-1])]
    rg_json = pa.array([encode_basestring_ascii(rg.fingerprint).encode()
                        for rg in src.row_groups], type=pa.binary())
    joined = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()),
                                                          rg_json.take(pa.array(flat))),
                            pa.scalar(b", ", pa.binary()))
    sha, start = hashlib.sha256, b"[["
    end = f"], {encode_basestring_ascii(flt)}]".encode()
    fp_set = [sha(start + m + end).hexdigest()[:16] for m in joined.to_pylist()]
    return [fp_set[i] for i in ids]


def _key_codes(keys: pd.DataFrame, split_by: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Codes of each row's split key into the sorted distinct keys (missing keys last)."""
    if len(split_by) == 1 and keys[split_by[0]].dtype != object:
        # pandas' factorize gives the group-by's codes (tests hold them equal), ~3x as
        # fast on 10^6 rows; any row of a code holds its key, so no first() pass.
        fcodes = pd.factorize(keys[split_by[0]], sort=True,
                              use_na_sentinel=False)[0].astype(np.intp)
        rep = np.empty(int(fcodes.max(initial=-1)) + 1, dtype=np.intp)
        rep[fcodes] = np.arange(len(fcodes))
        return fcodes, keys.loc[:, split_by].iloc[rep].reset_index(drop=True)
    grouped = keys.groupby(split_by, sort=True, dropna=False, observed=True)
    codes = grouped.ngroup().to_numpy()
    first = pd.Series(np.arange(len(keys))).groupby(codes).first().to_numpy()
    uniq = keys.loc[:, split_by].iloc[first].reset_index(drop=True)
    return codes.astype(np.intp), uniq


def _units(slices: list[SliceInfo], rg_bytes: list[int],
           rg_lists: tuple[np.ndarray, np.ndarray] | None = None) -> list[LoadUnit]:
    """Group consecutive slices (by first row group) into loads of bounded rows.

    Above ``UNIT_MAX_ROWS`` a unit always ends; above 1/``UNIT_MIN_UNITS`` of all rows it
    ends only where the next slice starts a new row group, so no row group is read twice.
    Vectorized: a loop over 10^5 slices with a set of row groups each was 0.1 s of tiny's
    plan; here the work per slice is array operations and only units loop.

    ``rg_lists``: the slices' row groups as ``_slices`` gives them (else read from
    ``slices``): the count per slice, and all of them in a row.
    """
    n = len(slices)
    if n == 0:
        return []
    if rg_lists is None:
        lens = np.fromiter(map(len, (s.row_groups for s in slices)), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(s.row_groups for s in slices),
                           dtype=np.int64, count=int(lens.sum()))
    else:
        lens, flat = rg_lists
    rows = np.fromiter((s.rows for s in slices), dtype=np.int64, count=n)
    first = np.full(n, -1, dtype=np.int64)  # no row group sorts first, as () does
    starts = np.cumsum(lens) - lens
    has = lens > 0
    first[has] = flat[starts[has]]
    order = np.argsort(first, kind="stable")  # by first row group, then slice index
    # The row groups in unit order, and each one's place in ``order`` (no sort needed).
    at = np.r_[0, np.cumsum(lens[order])]
    by_pos = flat[np.repeat(starts[order] - at[:-1], lens[order]) + np.arange(len(flat))]
    pos_of = np.repeat(np.arange(n), lens[order])
    # prev[i]: the last place before i where any of slice order[i]'s row groups occurs,
    # so slice order[i] shares no row group with the unit begun at a iff prev[i] < a.
    # A stable sort by row group keeps places ascending within each (radix for < 2^16).
    small = np.int16 if len(rg_bytes) < 2**15 else np.int64
    by_rg = np.argsort(by_pos.astype(small), kind="stable")
    rg_s, pos_s = by_pos[by_rg], pos_of[by_rg]
    before = np.full(len(flat), -1, dtype=np.int64)
    same = np.flatnonzero(rg_s[1:] == rg_s[:-1]) + 1
    before[same] = pos_s[same - 1]
    prev = np.full(n, -1, dtype=np.int64)
    np.maximum.at(prev, pos_s, before)
    cum = np.r_[0, np.cumsum(rows[order])]
    soft = min(UNIT_MAX_ROWS, -(-int(cum[-1]) // UNIT_MIN_UNITS))
    sizes = np.asarray(rg_bytes, dtype=np.int64)
    units: list[LoadUnit] = []
    a = 0
    while a < n:
        # the first slice past a that would take the unit over UNIT_MAX_ROWS...
        hard = max(int(np.searchsorted(cum, cum[a] + UNIT_MAX_ROWS, side="right")) - 1, a + 1)
        hard = min(hard, n)
        # ...or, once it holds ``soft`` rows, the first that starts new row groups
        lo = max(int(np.searchsorted(cum, cum[a] + soft, side="left")), a + 1)
        fresh = np.flatnonzero(prev[lo:hard] < a) if lo < hard else np.zeros(0, np.int64)
        b = lo + int(fresh[0]) if fresh.size else hard
        rgs = np.flatnonzero(np.bincount(by_pos[at[a]:at[b]], minlength=len(sizes)))
        units.append(LoadUnit(len(units), tuple(np.sort(order[a:b]).tolist()),
                              tuple(rgs.tolist()), int(cum[b] - cum[a]),
                              int(sizes[rgs].sum())))
        a = b
    return units


def _tasks(slices: list[SliceInfo], units: list[LoadUnit], specs: list[ModelSpec],
           engine: str | None = None) -> list[Task]:
    costed = [sp.replace(engine=engine) if engine and sp.engine != engine else sp
              for sp in specs]
    # fit_id = _h(spec_id, key, fingerprint)[:20], with each slice's JSON built once.
    # Items are kept column-wise (10^5+ of them): ids, slice, spec, unit, cost.
    heads = [f"[{json.dumps(sp.spec_id)}, " for sp in specs]
    costs: dict[tuple[int, int], float] = {}
    fids: list[str] = []
    sis: list[int] = []
    pis: list[int] = []
    units_of: list[int] = []
    item_costs: list[float] = []
    # Spec-major within a load unit: a task then holds many slices of one spec, which
    # the batched engine fits together (bigger batches amortize its per-step cost).
    # Costliest spec first, so a unit (and the run) ends on its cheapest fits.
    for u in units:
        tails = _tails([slices[si] for si in u.slices])
        rows_u = [slices[si].rows for si in u.slices]
        mean_rows = max(1, round(u.rows / max(1, len(u.slices))))
        for pi in sorted(range(len(specs)),
                         key=lambda i: (-spec_cost_ms(costed[i], mean_rows), i)):
            for r in set(rows_u):
                if (pi, r) not in costs:
                    costs[(pi, r)] = spec_cost_ms(costed[pi], r)
            head = heads[pi]
            fids.extend([hashlib.sha256((head + t).encode()).hexdigest()[:20] for t in tails])
            item_costs.extend([costs[(pi, r)] for r in rows_u])
            sis.extend(u.slices)
            pis.extend([pi] * len(u.slices))
            units_of.extend([u.index] * len(u.slices))
    total = sum(item_costs)
    target = min(TASK_TARGET_MS, max(total / TASK_MIN_TASKS, TASK_MIN_MS))

    # Within a unit, tasks are of equal size, cut where an item's midpoint crosses a
    # boundary (no sliver at the unit's end). Toward the end of the plan they shrink
    # (guided self-scheduling), so the last ones finish close together instead of one
    # worker idling through a full task.
    item_unit = np.asarray(units_of, dtype=np.int64)
    item_cost = np.asarray(item_costs, dtype=float)
    # bincount adds each unit's costs in item order, as a loop would, to the same floats
    per_unit = np.bincount(item_unit, weights=item_cost).tolist()
    unit_cost = {u.index: per_unit[u.index] for u in units}
    # 0.01: float noise
    even = {ui: uc / max(1, int(np.ceil(uc / target - 0.01))) for ui, uc in unit_cost.items()}
    left = dict(unit_cost)
    sizes: dict[int, list[float]] = {ui: [] for ui in unit_cost}
    turns: dict[int, list[int]] = {ui: [] for ui in unit_cost}  # each chunk's cut, in order
    remaining = total
    n_cut = 0

    def cut(ui: int) -> None:
        nonlocal remaining, n_cut
        size = min(even[ui], max(TASK_MIN_MS, remaining / TAIL_SHARE), left[ui])
        if left[ui] - size < TASK_MIN_MS / 2:  # absorb a sliver
            size = left[ui]
        sizes[ui].append(size)
        turns[ui].append(n_cut)
        n_cut += 1
        left[ui] -= size
        remaining -= size

    # Units are cut one after another, except the last ones: they run side by side,
    # each on the worker that loaded it (Dask sends a task to its data), so they are
    # cut as if consumed together, each time from the unit with the most work left:
    # each ends on small tasks, not only the very last. (Cut one after another, the
    # first of two units kept full-size tasks to its end: a worker idled up to 3.7 s of
    # sites' 12 s.) The plan lists their tasks in the order cut, which is the run's
    # priority order: a small task stolen by the other unit's worker then waits behind
    # that worker's big ones. A shuffle's tasks hold no data, but the executor gives each
    # unit a worker all the same (``executor._Run.home_units``).
    order = list(unit_cost)
    for lanes in [*([ui] for ui in order[:-TAIL_UNITS]), order[-TAIL_UNITS:]]:
        while lanes:
            ui = max(lanes, key=left.__getitem__)
            cut(ui)
            if left[ui] <= 1e-9:
                lanes.remove(ui)
    bounds = {ui: np.cumsum(s)[:-1] for ui, s in sizes.items()}
    # Each item's task within its unit: the chunk holding the item's cost midpoint.
    n = len(item_costs)
    starts = np.flatnonzero(np.r_[True, item_unit[1:] != item_unit[:-1]])
    done = np.cumsum(item_cost) - item_cost / 2
    done -= np.repeat(done[starts] - item_cost[starts] / 2, np.diff(np.r_[starts, n]))
    chunk = np.empty(n, dtype=np.int64)
    for a, b in zip(starts, np.r_[starts[1:], n], strict=True):
        chunk[a:b] = np.searchsorted(bounds[int(item_unit[a])], done[a:b], side="right")
    first = np.r_[True, (item_unit[1:] != item_unit[:-1]) | (chunk[1:] != chunk[:-1])]
    cuts = [*np.flatnonzero(first).tolist(), n]
    tasks: list[Task] = []
    sis_a, pis_a = np.asarray(sis, dtype=np.int32), np.asarray(pis, dtype=np.int32)
    turn: list[int] = []
    for lo, hi in itertools.pairwise(cuts):
        ids = fids[lo:hi]
        tasks.append(Task(key=task_key(ids), unit=units_of[lo],
                          items=Items(ids, sis_a[lo:hi], pis_a[lo:hi]),
                          cost_ms=sum(item_costs[lo:hi])))
        turn.append(turns[units_of[lo]][int(chunk[lo])])
    return [tasks[i] for i in np.argsort(turn, kind="stable")]


def task_key(fit_ids: Sequence[str]) -> str:
    """A task's name in the store: a hash of the fit ids it holds, in any order."""
    return _h(sorted(fit_ids))[:24]
