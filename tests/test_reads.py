"""Parquet reads never leave Arrow's threads a Python object to free.

A read decoded on Arrow's thread pool over a Python file object (every fsspec file)
can free buffers of Python bytes on a pool thread after the read returned; one freed
while the interpreter exits aborts the process ("terminate called without an active
exception": `mixedscale show` on a store with an unreadable part, 2 in 142 runs under
load before the fix). So a threaded read must be over memory Arrow owns.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mixedscale as ms
from mixedscale.api import prepare
from mixedscale.executor import RunOptions, _Run, pending
from mixedscale.source import open_source, read_split_keys
from mixedscale.store import Store, open_store
from mixedscale.worker import Loaded, run_task

from .conftest import make_genes

RI = ms.ModelSpec("y ~ time", groups="subject", name="ri")


def _spy(calls: list[tuple[bool, bool]]) -> type[pq.ParquetFile]:
    """A ParquetFile that records each read: (over a Python file object, threaded)."""

    base = pq.ParquetFile  # before the test patches it with the spy

    def recording(name: str) -> Any:
        def read(self: Any, *args: Any, use_threads: bool = True, **kwargs: Any) -> Any:
            calls.append((self.python, use_threads))
            return getattr(base, name)(self, *args, use_threads=use_threads, **kwargs)
        return read

    class Spy(base):  # type: ignore[misc,valid-type]
        def __init__(self, source: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(source, *args, **kwargs)
            native = isinstance(source, pa.NativeFile) and not isinstance(
                source, pa.PythonFile)
            self.python = not (native or isinstance(source, (str, Path)))

        read = recording("read")
        read_row_group = recording("read_row_group")
        read_row_groups = recording("read_row_groups")

    return Spy


def test_no_threaded_read_over_a_python_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data.parquet"
    make_genes(n_genes=3).sample(frac=1.0, random_state=0).to_parquet(
        data, index=False, row_group_size=40)  # unsorted, several row groups
    store = Store(str(tmp_path / "store"))
    store.init()
    src, plan = prepare(str(data), [RI], "gene")
    run = _Run(plan, src, store, None, RunOptions())
    for t in plan.tasks:
        assert run_task(run.payload(t), Loaded(src.read(plan.columns)[0], 0), store).committed

    calls: list[tuple[bool, bool]] = []
    monkeypatch.setattr(pq, "ParquetFile", _spy(calls))
    src = open_source(str(data))
    assert len(src.row_groups) > 1, "precondition: a scan over several row groups"
    read_split_keys(src, ["gene"])
    src.read(plan.columns, src.row_groups[:2], ["gene"])
    st = open_store(store.url)
    names = sorted(st.committed_parts())
    for table in ("fits", "params", "variance"):
        assert len(getattr(st, table)()), table
    assert len(st.part_fit_ids(names)) == len(names)
    assert len(st.part_errors(names)) == len(names)
    assert not st.unreadable_parts(names)
    assert not pending(plan, st).todo

    assert calls, "precondition: the spy saw the reads"
    assert not [c for c in calls if c == (True, True)], calls


def test_an_unreadable_part_is_skipped_by_part_errors_without_a_second_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data.parquet"
    make_genes(n_genes=8).to_parquet(data, index=False)
    store = Store(str(tmp_path / "store"))
    store.init()
    for spec in (RI, RI.replace(reml=False, name="ri_ml")):  # two jobs: two parts
        src, plan = prepare(str(data), [spec], "gene")
        run = _Run(plan, src, store, None, RunOptions())
        loaded = Loaded(src.read(plan.columns)[0], 0)
        for t in plan.tasks:
            assert run_task(run.payload(t), loaded, store).committed
    names = sorted(store.committed_parts())
    assert len(names) > 1, "precondition: a healthy part beside the broken one"
    bad = Path(store.path("fits", f"part-{names[0]}.parquet"))
    bad.write_bytes(bad.read_bytes()[:-100])

    reads: list[str] = []
    real = Store._part_file

    def counting(self: Store, f: str) -> pq.ParquetFile:
        reads.append(f)
        return real(self, f)

    monkeypatch.setattr(Store, "_part_file", counting)
    st = open_store(store.url)
    got = st.part_errors(names)
    assert sorted(got) == names[1:]  # the broken part left out, for the resume to set aside
    assert reads.count(str(bad)) == 1  # no second read to word a message nobody sees


# Each case: the ranks of each batch's rows (a store part's rows, as read).
@pytest.mark.parametrize("parts", [
    [[0, 1, 1], [2, 3], [4]],  # already in order
    [[4, 5], [0, 0, 1], [2, 3]],  # parts out of order, each in order: reordered
    [[3, 3], [0, 1], [1, 2], [5]],  # a fit's rows across two batches
    [[2, 2], [2, 3], [0, 1]],  # ...and one part out of place
    [[1, 0], [2, 3]],  # rows out of order in a part: sorted
    [[0, 2], [1, 3]],  # parts interleave: sorted
    [[], [1, 0], [], [2]],  # empty batches
])
def test_rows_come_back_in_rank_order_as_a_stable_sort_gives_them(
        parts: list[list[int]]) -> None:
    from mixedscale.store import in_rank_order

    rank = np.asarray([r for p in parts for r in p], dtype=np.int64)
    schema = pa.schema([("row", pa.int64()), ("rank", pa.int64())])
    batches, at = [], 0
    for p in parts:
        batches.append(pa.record_batch([pa.array(range(at, at + len(p)), pa.int64()),
                                        pa.array(p, pa.int64())], schema=schema))
        at += len(p)
    tab = pa.Table.from_batches(batches, schema=schema)
    got = in_rank_order(tab, rank)
    assert got.equals(tab.take(pa.array(np.argsort(rank, kind="stable"))))
    copied = {c.buffers()[1].address for c in got.column("row").chunks}
    original = {b.column(0).buffers()[1].address for b in batches}
    sorted_parts = all(p == sorted(p) for p in parts)
    ranges = sorted((p[0], p[-1]) for p in parts if p)
    apart = all(b[0] >= a[1] for a, b in itertools.pairwise(ranges))
    assert (copied <= original) == (sorted_parts and apart)  # reordered without a copy
