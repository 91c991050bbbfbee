"""Synthetic data with known true parameters, written as Parquet sorted and not sorted
by the split key. Small suites are generated in memory (the unsorted layout is a row
permutation of the sorted one); ``big`` is generated chunk by chunk, never whole."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .suites import Suite

SEED = 20240611
LAYOUTS = ("sorted", "unsorted")
_VERSION = 2  # bump to regenerate cached data


def suite_dir(root: Path, suite: Suite, quick: bool) -> Path:
    return root / (suite.name + ("-quick" if quick else ""))


def layout_path(root: Path, suite: Suite, quick: bool, layout: str) -> Path:
    """A file for single-file suites, a folder of files for multi-file ones."""
    d = suite_dir(root, suite, quick) / layout
    return d if suite.files > 1 else d / "part-000.parquet"


def _labels(prefix: str, n: int, width: int) -> np.ndarray:
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _genes(suite: Suite, rng: np.random.Generator) -> pd.DataFrame:
    s_n, n_subj, n_time = suite.n_slices, 30, 4
    per = n_subj * n_time
    sl = np.repeat(np.arange(s_n), per)
    subj = np.tile(np.repeat(np.arange(n_subj), n_time), s_n)
    t = np.tile(np.tile(np.arange(n_time, dtype=float), n_subj), s_n)
    treated = (subj % 2 == 1).astype(float)
    b0 = rng.normal(0, 1.0, (s_n, n_subj))[sl, subj]
    b1 = rng.normal(0, 0.3, (s_n, n_subj))[sl, subj]
    y = 5 + 0.5 * t + 0.8 * treated + 0.2 * t * treated + b0 + b1 * t
    y += rng.normal(0, 1.0, len(y))
    return pd.DataFrame({
        "gene": _labels("g", s_n, 5)[sl], "subject": _labels("s", n_subj, 2)[subj],
        "group": np.where(treated == 1, "treated", "control").astype(object), "time": t,
        "expression": y})


def _grouped(s_n: int, n_groups: int, per_group: int) -> tuple[np.ndarray, np.ndarray]:
    per = n_groups * per_group
    sl = np.repeat(np.arange(s_n), per)
    g = np.tile(np.repeat(np.arange(n_groups), per_group), s_n)
    return sl, g


def _sites(suite: Suite, rng: np.random.Generator) -> pd.DataFrame:
    n_groups = 200 if suite.rows_per_slice >= 2000 else 40
    sl, g = _grouped(suite.n_slices, n_groups, suite.rows_per_slice // n_groups)
    x = rng.normal(0, 1, len(sl))
    b0 = rng.normal(0, 1.0, (suite.n_slices, n_groups))[sl, g]
    b1 = rng.normal(0, 0.5, (suite.n_slices, n_groups))[sl, g]
    y = 1 + 0.5 * x + b0 + b1 * x + rng.normal(0, 1.0, len(sl))
    return pd.DataFrame({"site": _labels("site", suite.n_slices, 3)[sl], "g": g, "x": x, "y": y})


def _multiverse(suite: Suite, rng: np.random.Generator) -> pd.DataFrame:
    n_groups = 2000 if suite.rows_per_slice >= 100_000 else 40
    sl, g = _grouped(suite.n_slices, n_groups, suite.rows_per_slice // n_groups)
    n = len(sl)
    x, z, w = rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    b0 = rng.normal(0, 1.0, (suite.n_slices, n_groups))[sl, g]
    b1 = rng.normal(0, 0.5, (suite.n_slices, n_groups))[sl, g]
    y = 1 + 0.5 * x - 0.3 * z + 0.2 * w + 0.1 * x * z + b0 + b1 * x + rng.normal(0, 1.0, n)
    return pd.DataFrame({"study": _labels("study", suite.n_slices, 1)[sl], "g": g, "x": x,
                         "z": z, "w": w, "y": y})


def _tiny(suite: Suite, rng: np.random.Generator) -> pd.DataFrame:
    sl, g = _grouped(suite.n_slices, 5, suite.rows_per_slice // 5)
    x = rng.normal(0, 1, len(sl))
    b0 = rng.normal(0, 1.0, (suite.n_slices, 5))[sl, g]
    y = 1 + 0.5 * x + b0 + rng.normal(0, 1.0, len(sl))
    return pd.DataFrame({"unit": sl.astype(np.int64), "g": g.astype(np.int64), "x": x, "y": y})


_GEN = {"genes": _genes, "sites": _sites, "multiverse": _multiverse, "tiny": _tiny}


def _write(df: pd.DataFrame, path: Path, row_group_rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path,
                   row_group_size=row_group_rows, compression="snappy")


# -- big: chunked --------------------------------------------------------------------------
_BIG_GROUPS_FULL = 1000


def _big_groups(suite: Suite) -> int:
    return _BIG_GROUPS_FULL if suite.rows_per_slice >= 250_000 else 50


_BIG_SCHEMA = pa.schema([("site", pa.int32()), ("g", pa.int32()), ("x", pa.float64()),
                         ("z", pa.float64()), ("y", pa.float64())])


def _big_rows(suite: Suite, b0: np.ndarray, slices: np.ndarray, offset: int, k: int,
              rng: np.random.Generator) -> pa.Table:
    """``k`` rows for each of ``slices``, rows ``offset .. offset+k`` of each slice."""
    n_groups = b0.shape[1]
    sl = np.repeat(slices, k)
    g = np.tile((np.arange(offset, offset + k) % n_groups), len(slices))
    n = len(sl)
    x, z = rng.normal(0, 1, n), rng.normal(0, 1, n)
    y = 1 + 0.5 * x - 0.3 * z + b0[sl, g] + rng.normal(0, 1.0, n)
    return pa.table({"site": sl.astype(np.int32), "g": g.astype(np.int32), "x": x, "z": z,
                     "y": y}, schema=_BIG_SCHEMA)


def _write_big(suite: Suite, root: Path) -> None:
    """Sorted: files of consecutive sites. Unsorted: each chunk holds an equal share of
    every site's rows, shuffled, so every row group mixes all sites. Only one chunk
    (``suite.chunk_rows`` rows) is in memory at a time."""
    rng0 = np.random.default_rng(SEED)
    b0 = rng0.normal(0, 1.0, (suite.n_slices, _big_groups(suite)))
    per = suite.rows_per_slice
    # sorted
    slices_per_file = -(-suite.n_slices // suite.files)
    slices_per_chunk = max(1, suite.chunk_rows // per)
    for f in range(suite.files):
        lo, hi = f * slices_per_file, min(suite.n_slices, (f + 1) * slices_per_file)
        path = root / "sorted" / f"part-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, _BIG_SCHEMA, compression="snappy") as w:
            for s0 in range(lo, hi, slices_per_chunk):
                sl = np.arange(s0, min(hi, s0 + slices_per_chunk))
                rng = np.random.default_rng([SEED, 1, s0])
                w.write_table(_big_rows(suite, b0, sl, 0, per, rng),
                              row_group_size=suite.row_group_rows)
    # unsorted
    n_chunks = max(1, suite.n_rows // suite.chunk_rows)
    while per % n_chunks:
        n_chunks += 1
    k = per // n_chunks
    all_slices = np.arange(suite.n_slices)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for c in range(n_chunks):
            f = c * suite.files // n_chunks
            if f not in writers:
                for old in list(writers):
                    writers.pop(old).close()
                path = root / "unsorted" / f"part-{f:03d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[f] = pq.ParquetWriter(path, _BIG_SCHEMA, compression="snappy")
            rng = np.random.default_rng([SEED, 2, c])
            t = _big_rows(suite, b0, all_slices, c * k, k, rng)
            t = t.take(pa.array(rng.permutation(t.num_rows)))
            writers[f].write_table(t, row_group_size=suite.row_group_rows)
    finally:
        for w in writers.values():
            w.close()


def generate(suite: Suite, root: Path, quick: bool, log: bool = True) -> dict[str, Path]:
    """Write both layouts (cached: regenerated only when the sizes change)."""
    d = suite_dir(root, suite, quick)
    meta: dict[str, Any] = {"version": _VERSION, "seed": SEED, "n_slices": suite.n_slices,
            "rows_per_slice": suite.rows_per_slice, "row_group_rows": suite.row_group_rows,
            "files": suite.files, "truth": suite.truth}
    meta_path = d / "meta.json"
    paths = {lay: layout_path(root, suite, quick, lay) for lay in LAYOUTS}
    if meta_path.exists() and all(p.exists() for p in paths.values()):
        old = json.loads(meta_path.read_text())
        old.pop("bytes", None)
        if old == meta:
            return paths
    if d.exists():
        shutil.rmtree(d)
    t0 = time.perf_counter()
    if suite.name == "big":
        _write_big(suite, d)
    else:
        df = _GEN[suite.name](suite, np.random.default_rng(SEED))
        _write(df, paths["sorted"], suite.row_group_rows)
        shuffled = df.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
        _write(shuffled, paths["unsorted"], suite.row_group_rows)
    meta["bytes"] = {lay: dir_bytes(p) for lay, p in paths.items()}
    meta_path.write_text(json.dumps(meta, indent=1))
    if log:
        print(f"[data] {suite.name}: {suite.n_slices} slices x {suite.rows_per_slice} rows, "
              f"{meta['bytes']['sorted'] / 1e6:.1f} MB per layout "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return paths


def dir_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*.parquet"))


def slice_keys(path: Path, key: str) -> list:
    """Sorted distinct split keys of a dataset (reads the key column only)."""
    t = pq.read_table(path, columns=[key])
    return sorted(pd.unique(t.column(key).to_numpy()).tolist())


def subsample(keys: list, n: int | None) -> list:
    """A deterministic, evenly spread subsample of ``n`` keys (all when n is None)."""
    if n is None or n >= len(keys):
        return list(keys)
    idx = np.linspace(0, len(keys) - 1, n).round().astype(int)
    return [keys[i] for i in sorted(set(idx.tolist()))]
