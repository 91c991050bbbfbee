"""Input datasets: a DataFrame, or Parquet (file, folder, glob, hive tree, fsspec URL).

At plan time only Parquet footers and the split columns are read; every file's
schema is checked against every spec, and corrupt files are named. Workers
later read only the row groups and columns their slices need.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from .errors import DataError, SpecError, missing_column_error, one_line
from .spec import ModelSpec
from .store import TABLES, constant, protocols, type_name

__all__ = ["FILTER_OPS", "CorruptFile", "RowGroup", "Source", "open_source"]

log = logging.getLogger(__name__)

FILTER_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not in")
Filter = Sequence[Sequence[Any]]


class CorruptFile(DataError):
    """An input file that cannot be read at fit time; ``file`` names it.

    It crosses process boundaries (Dask pickles a task's exception), so the file
    travels in the pickle too: the executor fails only the fits that need it.
    """

    def __init__(self, file: str, message: str) -> None:
        super().__init__(message)
        self.file = file

    def __reduce__(self) -> tuple[Any, ...]:
        return (CorruptFile, (self.file, str(self)))


@dataclass(frozen=True)
class RowGroup:
    """One readable unit of input: a Parquet row group (or the whole DataFrame)."""

    file: str
    index: int
    num_rows: int
    nbytes: int  # compressed bytes of the needed columns
    fingerprint: str
    partition: tuple[tuple[str, Any], ...] = ()


@dataclass
class Source:
    """A resolved dataset. ``frame`` is set for in-memory input."""

    path: str | None
    frame: pd.DataFrame | None
    fs: Any
    files: list[str]
    schema: pa.Schema
    partition_cols: list[str]
    filter: list[tuple[str, str, Any]] | None = None
    row_groups: list[RowGroup] = field(default_factory=list)
    bad_files: dict[str, str] = field(default_factory=dict)
    # DataFrame columns Arrow cannot type (mixed values) -> why; an error only if used.
    untyped: dict[str, str] = field(default_factory=dict)
    # A DataFrame's named index levels (dropped: rows are matched by position), for hints.
    index_levels: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    # -- checks
    def check_specs(self, specs: Sequence[ModelSpec], split_by: Sequence[str]) -> None:
        """Every spec's columns exist and have usable types; raise SpecError/DataError."""
        cols = self.columns
        for c in [*split_by, *(c for spec in specs for c in spec.columns)]:
            if c not in cols and c in self.index_levels:
                raise SpecError(f"{c!r} is an index level of the DataFrame, not a column; "
                                f"make it one with df.reset_index(); "
                                f"got (index={list(self.index_levels)})")
        for s in split_by:
            if s not in cols:
                raise missing_column_error(s, cols, "(from split_by)")
        _check_split_names(split_by)
        for spec in specs:
            try:
                spec.check_columns(cols)
            except SpecError as exc:
                raise SpecError(f"model {spec.shown!r}: {exc}") from None
            _check_split_use(spec, split_by)
            for c in spec.columns:
                _check_term_type(spec, c, self.schema.field(c).type)
        for c in self.needed_columns(specs, split_by):
            if c in self.untyped:
                raise DataError(
                    f"column {c!r} mixes value types ({self.untyped[c]}); convert it to one "
                    f"type, e.g. df[{c!r}].astype(str) or pd.to_numeric(df[{c!r}]); "
                    f"got ({c}={self.frame[c].dtype if self.frame is not None else '?'})")
        for spec in specs:
            resp = self.schema.field(spec.response).type
            if not (pa.types.is_integer(resp) or pa.types.is_floating(resp)
                    or pa.types.is_decimal(resp)):
                raise DataError(
                    f"model {spec.shown!r}: the response must be numeric; "
                    f"got ({spec.response}={type_name(resp)})"
                )
        for col, op, val in self.filter or []:
            if col not in cols:
                raise missing_column_error(col, cols, "(from filter)")
            _check_filter_value(col, op, val, self.schema.field(col).type)

    def needed_columns(self, specs: Sequence[ModelSpec], split_by: Sequence[str]) -> list[str]:
        cols: list[str] = list(split_by)
        for spec in specs:
            cols.extend(c for c in spec.columns if c not in cols)
        if self.filter:
            cols.extend(c for c, _, _ in self.filter if c not in cols)
        return cols

    def expression(self) -> pds.Expression | None:
        if not self.filter:
            return None
        return pq.filters_to_expression([list(f) for f in self.filter])

    # -- reading
    def decimals(self, columns: Sequence[str]) -> list[str]:
        """The decimal columns among ``columns``: ``read`` gives them as float64."""
        return [c for c in columns if pa.types.is_decimal(self.schema.field(c).type)]

    def read(self, columns: Sequence[str], row_groups: Sequence[RowGroup] | None = None,
             split_by: Sequence[str] = ()) -> tuple[pd.DataFrame, int]:
        """Read columns of the given row groups (all if None), filtered, the split
        columns as ``to_frame`` gives them. Returns (frame, bytes)."""
        if self.frame is not None:
            df = self.frame.loc[:, list(dict.fromkeys(columns))]
            dec = [c for c in self.decimals(list(df.columns)) if c not in split_by]
            if dec:  # Python Decimal objects, which the formula would read as a factor
                df = df.astype(dict.fromkeys(dec, "float64"))
            return _apply_filter_frame(df, self.filter), 0
        rgs = list(self.row_groups) if row_groups is None else list(row_groups)
        by_file: dict[str, list[RowGroup]] = {}
        for rg in rgs:
            by_file.setdefault(rg.file, []).append(rg)
        tables: list[pa.Table] = []
        nbytes = 0
        for f, groups in by_file.items():
            tables.append(self._read_file(f, groups, columns))
            nbytes += sum(g.nbytes for g in groups)
        if not tables:
            return pd.DataFrame(columns=list(columns)), 0
        table = pa.concat_tables(tables, promote_options="permissive")
        expr = self.expression()
        if expr is not None:
            table = table.filter(expr)
        return to_frame(_floats_for_decimals(table, split_by), split_by), nbytes

    def _read_file(self, f: str, groups: list[RowGroup], columns: Sequence[str]) -> pa.Table:
        part = dict(groups[0].partition)
        file_cols = [c for c in dict.fromkeys(columns) if c not in part]
        try:
            with self.fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                # One thread: Arrow's threads, decoding over a Python (fsspec) file,
                # can free its buffers of Python bytes after the read returned, which
                # aborts a process exiting then (see Store._part_file).
                t = pf.read_row_groups([g.index for g in groups], columns=file_cols,
                                       use_threads=False)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptFile(f, f"cannot read Parquet file {f!r}: {one_line(exc)}") from None
        for k, v in part.items():
            if k in columns:
                t = t.append_column(k, _partition_column(k, v, t.num_rows, self.schema))
        t = t.select([c for c in dict.fromkeys(columns) if c in t.column_names])
        return _decode_mixed_dictionaries(t, self.schema)


def _decode_mixed_dictionaries(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Dictionary (categorical) columns the dataset's schema holds as plain values
    (because other files store them plain) are decoded, so files concatenate."""
    for i, f in enumerate(t.schema):
        if pa.types.is_dictionary(f.type) and f.name in schema.names:
            want = schema.field(f.name).type
            if not pa.types.is_dictionary(want):
                t = t.set_column(i, pa.field(f.name, f.type.value_type),
                                 t.column(i).cast(f.type.value_type))
    return t


def _check_filter_value(col: str, op: str, val: Any, typ: pa.DataType) -> None:
    """Raise SpecError unless ``col op val`` can be evaluated on a column of ``typ``: a
    value of another type would otherwise fail every read (or, with pandas' ``==``,
    silently match nothing). Checked by evaluating the filter on an empty column."""
    # Each value of a list on its own: Arrow would cast ["1"] to [1] for an integer
    # column, where pandas (for a DataFrame) would silently match nothing.
    if val is None or (op in ("in", "not in") and any(v is None for v in val)):
        raise SpecError("a filter value cannot be None: a comparison with a missing value "
                        "matches no row; filter missing values out of the data first, or "
                        "split by the column (missing keys are a slice of their own); "
                        f"got (filter=[{col!r}, {op!r}, {val!r}])")
    tests = [[col, "==", v] for v in val] if op in ("in", "not in") else [[col, op, val]]
    try:
        empty = pa.table({col: pa.array([], type=typ)})
        for t in tests:
            empty.filter(pq.filters_to_expression([t]))
    except (pa.ArrowException, TypeError, ValueError):
        pass
    else:
        return
    vals = list(val) if op in ("in", "not in") else [val]
    shown = ", ".join(f"{v!r} ({type(v).__name__})" for v in vals[:3])
    hint = ""
    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
    if numeric and any(isinstance(v, str) and _parses(float, v) for v in vals):
        hint = "; write numbers unquoted (in YAML: 1, not '1')"
    elif (pa.types.is_string(typ) or pa.types.is_large_string(typ)) and not any(
            isinstance(v, str) for v in vals):
        hint = "; quote text values (in YAML: '1', not 1)"
    raise SpecError(f"filter value {shown} does not match column {col!r} of type "
                    f"{type_name(typ)}"
                    f"{hint}; got (filter=[{col!r}, {op!r}, {val!r}])")


def _check_split_names(split_by: Sequence[str]) -> None:
    """Every results table carries the split keys beside its own columns."""
    from .store import BODY

    own = {"fit_id", "spec_id"}.union(*(schema.names for schema in BODY.values()))
    lower = {n.lower() for n in own}
    for s in split_by:
        if s.startswith("_"):
            raise SpecError(
                f"split column {s!r} starts with '_', which marks mixedscale's internal "
                f"columns (a part's number, a row group...); rename it, e.g. "
                f"df.rename(columns={{{s!r}: {s.lstrip('_') or 'key'!r}}}); "
                f"got (split_by={list(split_by)!r})")
        if s.lower() in lower:  # DuckDB and Spark match column names case-insensitively
            raise SpecError(
                f"split column {s!r} has the name of a results column (the fits, params and "
                f"variance tables carry the split keys beside their own columns); rename it, "
                f"e.g. df.rename(columns={{{s!r}: {s + '_key'!r}}}); "
                f"got (split_by={list(split_by)!r})")


def _check_split_use(spec: ModelSpec, split_by: Sequence[str]) -> None:
    """A split column takes one value per slice: as the model's groups, response or
    covariate, every slice's fit would fail (one group, a constant, a collinear term)."""
    for s in split_by:
        if s not in spec.columns:
            continue
        role = ("its groups column" if s == spec.groups else
                "its response" if s == spec.response else "a column of its formulas")
        raise SpecError(
            f"model {spec.shown!r}: split column {s!r} is also {role}, and it takes a single "
            f"value within each slice, so no slice could be fitted; split by another column "
            f"or drop it from the model; got (split_by={list(split_by)!r}, "
            f"groups={spec.groups!r}, formula={spec.formula!r})")


def _check_term_type(spec: ModelSpec, col: str, typ: pa.DataType) -> None:
    """Dates and times in a formula would be read as a factor with one level per value.
    (Decimals are read as float64, see ``_floats_for_decimals``.)"""
    if col == spec.groups or not (pa.types.is_temporal(typ)):
        return
    for pf in spec.parsed.values():
        if col not in pf.names:
            continue
        ref = "{" + str(pf.names.index(col)) + "}"
        if pf.template.count(ref) == pf.template.count(f"C({ref}"):
            continue  # only inside C(): the user asked for a factor
        raise SpecError(
            f"model {spec.shown!r}: column {col!r} is a {type_name(typ)} column, which a "
            f"formula cannot use as a number; convert it to one (e.g. days since the start: "
            f"(df[{col!r}] - df[{col!r}].min()).dt.days) or write C({col}) for a factor; "
            f"got ({col}={type_name(typ)})")


_NULLABLE_INTS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
                  pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(),
                  pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                  pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}


def to_frame(table: pa.Table, keys: Sequence[str] = ()) -> pd.DataFrame:
    """``table.to_pandas()``, with the integer ``keys`` columns that hold a missing
    value as nullable integers: as float64 (pandas' default) keys above 2**53 round,
    so two slices could become one, and every key would read as a float.

    Consolidated blocks (not ``split_blocks``, as the store's read-back uses): the
    copy costs a load 10-60 ms per 10^6 rows, but the fit path's row selections on
    one block per dtype are cheaper for every task after (genes' fits were ~10 %
    slower on split blocks)."""
    df = table.to_pandas()
    for c in keys:
        if c in df.columns and table.column(c).null_count \
                and table.schema.field(c).type in _NULLABLE_INTS:
            df[c] = table.column(c).to_pandas(types_mapper=_NULLABLE_INTS.get)
    return df


def _floats_for_decimals(table: pa.Table, keep: Sequence[str] = ()) -> pa.Table:
    """Decimal columns as float64: pandas would hold them as Python objects, which the
    formula reads as a factor. Split columns (``keep``) stay exact: slices are matched
    to the plan's keys by equality, and Decimal('1.10') != 1.1."""
    for i, f in enumerate(table.schema):
        if pa.types.is_decimal(f.type) and f.name not in keep:
            table = table.set_column(i, pa.field(f.name, pa.float64()),
                                     table.column(i).cast(pa.float64()))
    return table


def _parses(conv: Callable[[str], Any], text: str) -> bool:
    try:
        conv(text)
    except ValueError:
        return False
    return True


def _apply_filter_frame(df: pd.DataFrame, flt: list[tuple[str, str, Any]] | None
                        ) -> pd.DataFrame:
    if not flt:
        return df
    mask = np.ones(len(df), dtype=bool)
    for col, op, val in flt:
        s = df[col]
        if op == "in":
            m = s.isin(list(val))
        elif op == "not in":
            m = ~s.isin(list(val))
        else:  # a missing value passes no comparison, as in Arrow's (Parquet) filter
            m = {"==": s == val, "!=": (s != val) & s.notna(), "<": s < val, "<=": s <= val,
                 ">": s > val, ">=": s >= val}[op]
        mask &= np.asarray(m, dtype=bool)
    return df.loc[mask]


def normalize_filter(flt: Any) -> list[tuple[str, str, Any]] | None:
    """Validate a filter in pyarrow's DNF-conjunction form: [[col, op, value], ...]."""
    if flt is None or flt == []:
        return None
    if not isinstance(flt, (list, tuple)) or (flt and isinstance(flt[0], str)):
        raise SpecError(
            f"filter must be a list of [column, op, value] triples; got (filter={flt!r})"
        )
    out = []
    for item in flt:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise SpecError(f"each filter must be [column, op, value]; got (filter={item!r})")
        col, op, val = item
        if op not in FILTER_OPS:
            raise SpecError(f"filter op must be one of {list(FILTER_OPS)}; got (op={op!r})")
        if op in ("in", "not in") and not isinstance(val, (list, tuple, set, frozenset)):
            raise SpecError(f"filter op {op!r} needs a list of values; "
                            f"got (filter=[{col!r}, {op!r}, {val!r}])")
        if isinstance(val, (set, frozenset)):
            val = list(val)
        out.append((str(col), str(op), val))
    return out


def open_source(data: Any, *, filter: Any = None, columns_hint: Sequence[str] = ()) -> Source:
    """Resolve ``data`` to a Source, reading only footers. Raises DataError naming the file."""
    flt = normalize_filter(filter)
    if isinstance(data, pd.DataFrame):
        df = data.copy(deep=False)
        levels = tuple(str(n) for n in df.index.names if n is not None)
        df.columns = [str(c) for c in df.columns]
        df.index = pd.RangeIndex(len(df))  # row labels play no part; repeats broke lookups
        dups = sorted(set(df.columns[df.columns.duplicated()]))
        if dups:
            raise DataError(f"column names repeat in the DataFrame: {dups}; rename them so "
                            f"each is unique; got (columns={list(df.columns)})")
        untyped: dict[str, str] = {}
        try:
            schema = pa.Schema.from_pandas(df, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError):
            # Type column by column: a column no spec uses may mix types harmlessly.
            fields_ = []
            for c in df.columns:
                try:
                    fields_.append(pa.Schema.from_pandas(df[[c]], preserve_index=False)[0])
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    untyped[c] = str(exc)
                    fields_.append(pa.field(c, pa.null()))
            schema = pa.schema(fields_)
        return Source(path=None, frame=df, fs=None, files=[], schema=schema, partition_cols=[],
                      filter=flt, untyped=untyped, index_levels=levels)
    if not isinstance(data, (str, bytes)) and not hasattr(data, "__fspath__"):
        raise SpecError(
            f"data must be a path, URL or DataFrame; got (data={type(data).__name__})"
        )
    path = str(data if not isinstance(data, bytes) else data.decode())
    try:
        fs, root = fsspec.core.url_to_fs(path)
        files = _list_files(fs, root, path)
    except (ImportError, ValueError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot open {path!r}: {type(exc).__name__}: {one_line(exc)}; "
                        "check the URL and that its fsspec backend is installed") from None
    part_schema = _discover_partitions(files, _base_dir(fs, root))
    part_cols = [f.name for f in part_schema]
    src = Source(path=path, frame=None, fs=fs, files=files, schema=pa.schema([]),
                 partition_cols=part_cols, filter=flt)
    _scan_footers(src, fs, files, part_schema, _base_dir(fs, root), set(columns_hint))
    return src


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # pyarrow's, Spark's and Hive's missing value


def _hive_segments(f: str, base: str) -> list[tuple[str, str | None]]:
    """A file's ``key=value`` folders, values URL-decoded (as pyarrow, DuckDB and Spark
    write and read them: ``north%20site`` is "north site"), the null marker as None."""
    out: list[tuple[str, str | None]] = []
    for seg in f[len(base):].strip("/").split("/")[:-1]:
        if "=" in seg:
            k, v = seg.split("=", 1)
            out.append((urllib.parse.unquote(k),
                        None if v == HIVE_NULL else urllib.parse.unquote(v)))
    return out


def _discover_partitions(files: list[str], base: str) -> pa.Schema:
    """Hive ``key=value`` folders below ``base``; ints, then floats, else strings."""
    values: dict[str, list[str]] = {}
    for f in files:
        for k, v in _hive_segments(f, base):
            values.setdefault(k, [])
            if v is not None:
                values[k].append(v)
    fields_ = []
    for k, vs in values.items():
        typ = pa.string()
        for cand, conv in ((pa.int64(), _int64), (pa.float64(), float)):
            try:
                nums = {v: conv(v) for v in vs}
            except ValueError:
                continue
            # Numbers only when that loses nothing: "007" beside "7", or "1.10" beside
            # "1.1", would merge two folders' slices into one; zero-padded codes, "+7",
            # "1_000" or "inf" are text someone chose, not numbers.
            if len(set(nums.values())) == len(nums) and not any(
                    _NOT_NUMBER_TEXT.search(v) for v in nums) and all(
                    math.isfinite(x) for x in nums.values()):
                typ = cand
            break
        if typ == pa.float64() and any(_parses(int, v) and not _parses(_int64, v)
                                       for v in vs):
            typ = pa.string()  # an integer beyond int64: kept exact, as text
        fields_.append(pa.field(k, typ if vs else pa.string()))
    return pa.schema(fields_)


_NOT_NUMBER_TEXT = re.compile(r"^[+-]?0\d|^\+|_|\s")


def _int64(text: str) -> int:
    v = int(text)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{text} is beyond int64")
    return v


def _base_dir(fs: Any, root: str) -> str:
    """The folder hive partitions are relative to: the root, or the part before a glob."""
    if any(ch in root for ch in "*?["):
        parts = root.split("/")
        k = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        return "/".join(parts[:k])
    return root if fs.isdir(root) else root.rsplit("/", 1)[0]


def _list_files(fs: Any, root: str, shown: str) -> list[str]:
    if any(ch in root for ch in "*?["):
        base = _base_dir(fs, root)  # no fs call for a glob
        found = fs.glob(root, detail=True)
        # as for a folder: files only, none under (or named) '.' or '_' entries
        files = sorted(p for p, info in found.items() if info.get("type") != "directory"
                       and not _hidden(p[len(base):]))
    elif fs.isdir(root):
        files = sorted(p for p in fs.find(root) if not _hidden(p[len(root):]))
    elif fs.exists(root):
        files = [root]
    else:
        raise DataError(f"no such file or folder: {shown!r}; check the path or URL")
    files = [f for f in files if f.endswith((".parquet", ".parq", ".pq")) or "." not in
             f.rsplit("/", 1)[-1]]
    if not files:
        if fs.isfile(root):
            raise DataError(f"{shown!r} is not a Parquet file (its name should end in "
                            ".parquet, .parq or .pq); give the data's file or folder")
        raise DataError(f"no Parquet files under {shown!r} (looked for *.parquet)")
    return files


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.strip("/").split("/"))


def lists_under(data: str, path: str) -> bool:
    """Whether reading the folder (or glob) ``data`` would take files under ``path`` as
    input: same filesystem, inside the folder, and not in a '.' or '_' folder there."""
    try:
        dfs, droot = fsspec.core.url_to_fs(data)
        pfs, proot = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError):
        return False  # the source and the store report their own bad URLs
    if protocols(dfs) != protocols(pfs):
        return False
    droot, proot = droot.rstrip("/"), proot.rstrip("/")
    if any(ch in droot for ch in "*?["):  # a glob: would it match the store's parts?
        from fsspec.utils import glob_translate

        pattern = re.compile(glob_translate(droot))
        return any(pattern.match(f"{proot}/{t}/part-0.parquet") for t in TABLES)
    if not dfs.isdir(droot):
        return False  # a single file
    return proot == droot or (proot.startswith(droot + "/") and not _hidden(proot[len(droot):]))


def _partition_values(f: str, part_schema: pa.Schema, root: str) -> tuple[tuple[str, Any], ...]:
    vals: list[tuple[str, Any]] = []
    names = set(part_schema.names)
    for k, v in _hive_segments(f, root):
        if k in names:
            typ = part_schema.field(k).type
            try:
                vals.append((k, None if v is None else pa.scalar(v).cast(typ).as_py()))
            except (pa.ArrowException, ValueError):
                vals.append((k, v))
    return tuple(vals)


def _partition_column(name: str, value: Any, n: int, schema: pa.Schema) -> pa.Array:
    """A hive partition's value as a column of its rows, typed as the dataset has it."""
    typ = schema.field(name).type if name in schema.names else None
    return constant(value, n, typ)


def _scan_footers(src: Source, fs: Any, files: list[str], part_schema: pa.Schema, root: str,
                  needed: set[str]) -> None:
    """Read every footer: a unified schema, per-row-group sizes and fingerprints.

    A file whose footer cannot be read is recorded in ``bad_files`` and left out;
    a column whose type differs between files rejects the dataset, naming both files.
    """
    unified: dict[str, tuple[pa.DataType, str]] = {}
    base = root
    for f in files:
        try:
            info = fs.info(f)
            with fs.open(f, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
        except (OSError, pa.ArrowException, ValueError) as exc:
            # Warned of once, by whoever plans the run (api.prepare), for every entry point.
            src.bad_files[f] = f"{type(exc).__name__}: {one_line(exc)}"
            continue
        schema = md.schema.to_arrow_schema()
        clash = [n for n in part_schema.names if n in schema.names]
        if clash:
            raise DataError(
                f"column {clash[0]!r} is both a hive partition folder ({clash[0]}=...) and a "
                f"column inside {f!r}; rename one of them, or point at files of one "
                "partition")
        for name in schema.names:
            typ = schema.field(name).type
            typ = pa.string() if pa.types.is_large_string(typ) else typ
            if name in unified and unified[name][0] != typ:
                prev = unified[name][0]
                wide = _widest(prev, typ)
                if wide is None:
                    raise DataError(
                        f"column {name!r} has type {typ} in {f!r} but {prev} in "
                        f"{unified[name][1]!r}; rewrite the files with one schema"
                    )
                # Categorical in some files, plain in others: read as plain values (Arrow
                # cannot concatenate the two; see Source._read_file). Numbers: the widest
                # type, so keys and values of every file fit the store's column.
                unified[name] = (wide, unified[name][1])
            unified.setdefault(name, (typ, f))
        stamp = f"{f}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or ''}"
        stamp += f"|{info.get('ETag') or info.get('etag') or ''}"
        part = _partition_values(f, part_schema, base)
        col_idx = {schema.names[i]: i for i in range(len(schema.names))}
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            nbytes = 0
            h = hashlib.sha256(stamp.encode())
            for name, j in col_idx.items():
                if name in needed or not needed:
                    cc = rg.column(j)
                    nbytes += cc.total_compressed_size
                    h.update(f"{name}:{cc.total_compressed_size}:{cc.file_offset}".encode())
            h.update(f"{i}:{rg.num_rows}".encode())
            src.row_groups.append(RowGroup(f, i, rg.num_rows, nbytes, h.hexdigest()[:16], part))
    if not unified:
        bad = "; ".join(f"{k}: {v}" for k, v in list(src.bad_files.items())[:3])
        raise DataError(f"no readable Parquet file in {src.path!r} ({bad})")
    fields_ = [pa.field(n, t) for n, (t, _) in unified.items()]
    fields_ += [part_schema.field(n) for n in part_schema.names if n not in unified]
    src.schema = pa.schema(fields_)
    # A column missing from some file cannot be read consistently.
    if needed:
        for f in files:
            if f in src.bad_files:
                continue
            with fs.open(f, "rb") as fh:
                names = set(pq.ParquetFile(fh).schema_arrow.names) | set(part_schema.names)
            miss = sorted((needed & set(src.schema.names)) - names)
            if miss:
                raise DataError(f"column {miss[0]!r} is missing from {f!r} but present in "
                                f"other files; rewrite the files with one schema")


def _plain(t: pa.DataType) -> pa.DataType:
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.string() if pa.types.is_large_string(t) else t


def _widest(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type a column typed ``a`` in one file and ``b`` in another is read as; None
    where no type holds both exactly (different kinds; uint64 beside a signed int)."""
    if a == b:
        return a
    if pa.types.is_dictionary(a) and pa.types.is_dictionary(b):
        return a if _plain(a) == _plain(b) else None
    pa_, pb = _plain(a), _plain(b)
    if pa.types.is_null(pa_) or pa.types.is_null(pb):  # a column all null in some file
        return pb if pa.types.is_null(pa_) else pa_
    if pa.types.is_timestamp(pa_) and pa.types.is_timestamp(pb) and pa_.tz == pb.tz:
        units = ["s", "ms", "us", "ns"]  # pandas writes ns, Spark us: the finer holds both
        return max((pa_, pb), key=lambda t: units.index(t.unit))
    if pa.types.is_integer(pa_) and pa.types.is_integer(pb):
        signed = [t for t in (pa_, pb) if pa.types.is_signed_integer(t)]
        unsigned = [t for t in (pa_, pb) if pa.types.is_unsigned_integer(t)]
        if not unsigned or not signed:
            return max((pa_, pb), key=lambda t: t.bit_width)
        if max(t.bit_width for t in unsigned) >= 64:
            return None
        return pa.int64()
    if pa.types.is_floating(pa_) and pa.types.is_floating(pb):
        return max((pa_, pb), key=lambda t: t.bit_width)
    return pa_ if pa_ == pb else None


def read_split_keys(src: Source, split_by: Sequence[str], extra: Sequence[str] = ()
                    ) -> tuple[pd.DataFrame, int]:
    """Per row group, the split keys it holds and their row counts (after the filter).

    Returns a frame with columns: the split columns, ``_rg`` (row-group index in
    ``src.row_groups``) and ``_rows``; and the bytes read to get it.
    """
    cols = list(dict.fromkeys([*split_by, *(c for c, _, _ in (src.filter or [])), *extra]))
    if src.frame is not None:
        df = _apply_filter_frame(src.frame.loc[:, cols], src.filter)
        g = df.groupby(list(split_by), sort=True, dropna=False, observed=True).size() \
            if split_by else pd.Series([len(df)])
        out = g.rename("_rows").reset_index() if split_by else pd.DataFrame({"_rows": [len(df)]})
        out["_rg"] = 0
        return out, 0
    parts: list[pa.Table] = []
    nbytes = 0
    expr = src.expression()
    for k, rg in enumerate(src.row_groups):
        part = dict(rg.partition)
        file_cols = [c for c in cols if c not in part]
        try:
            with src.fs.open(rg.file, "rb") as fh:
                pf = pq.ParquetFile(fh)
                # One thread, as in Source._read_file; no slower for this scan.
                t = pf.read_row_group(rg.index, columns=file_cols, use_threads=False)
                md = pf.metadata.row_group(rg.index)
                names = pf.schema_arrow.names
                nbytes += sum(md.column(names.index(c)).total_compressed_size
                              for c in file_cols if c in names)
        except (OSError, pa.ArrowException, ValueError) as exc:
            src.bad_files[rg.file] = f"{type(exc).__name__}: {one_line(exc)}"
            continue
        for c, v in part.items():
            if c in cols:
                t = t.append_column(c, _partition_column(c, v, t.num_rows, src.schema))
        t = _decode_mixed_dictionaries(t, src.schema)
        if expr is not None:
            t = t.filter(expr)
        agg = _key_counts(t.select(list(split_by))) if split_by else \
            pa.table({"_rows": pa.array([t.num_rows], pa.int64())})
        parts.append(agg.append_column("_rg", constant(k, agg.num_rows, pa.int64())))
    # A file with one unreadable row group is left out whole: its readable ones would
    # make slices of part of their rows, fitted and stored as if complete.
    rgs = src.row_groups
    parts = [t for t in parts if not t.num_rows
             or rgs[t.column("_rg")[0].as_py()].file not in src.bad_files]
    if not parts:
        return pd.DataFrame(columns=[*split_by, "_rows", "_rg"]), nbytes
    if all(t.schema == parts[0].schema for t in parts) and \
            not any(pa.types.is_dictionary(f.type) for f in parts[0].schema):
        # One conversion, not one per row group (10^3+ each paid pandas' fixed cost).
        return to_frame(pa.concat_tables(parts), split_by), nbytes
    # Files typing a key differently (int32 and int64) or categorical keys: pandas'
    # concat finds the type (text for categories that differ between files, which
    # orders the slices by text, as the workers do).
    return pd.concat([to_frame(t, split_by) for t in parts], ignore_index=True), nbytes


def _key_counts(keys: pa.Table) -> pa.Table:
    """Each distinct key of a row group and its row count (``_rows``), in any order.

    One integer column with no missing value (the common split: an id) is counted by a
    sort, ~5x faster than Arrow's hash group-by at 10^5 rows (numpy 2's ``unique``
    hashes and is slower still); anything else goes to Arrow."""
    col = keys.column(0)
    if keys.num_columns == 1 and pa.types.is_integer(col.type) and not col.null_count:
        v = np.sort(col.to_numpy())
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]]) if len(v) else np.zeros(0, int)
        counts = np.diff(np.r_[starts, len(v)]).astype(np.int64)
        return pa.table([pa.array(v[starts], type=col.type), pa.array(counts)],
                        names=[keys.column_names[0], "_rows"])
    agg = keys.group_by(keys.column_names, use_threads=False).aggregate([([], "count_all")])
    return agg.rename_columns(["_rows" if c == "count_all" else c for c in agg.column_names])




