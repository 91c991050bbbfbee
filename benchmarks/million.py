"""The scaling model's ``tiny x10`` row, run:
``python -m benchmarks.million [--slices N] [--tables] [--data DIR]``.

One ``fit_many`` of the ``tiny`` suite's spec over 1,000,000 slices of 20 rows (one
sorted file, written once under benchmarks/data/tiny-1000000) on a 2-worker LocalCluster.
Prints planning time, the time to return without reading the result tables back (as
``mixedscale run``) and after reading them, and the driver's peak RSS at each step
(benchmarks/README.md: "Checked at 10^6 slices").
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    from distributed import Client

    import mixedscale as ms
    from mixedscale.api import prepare
    from mixedscale.executor import RunOptions, local_cluster

    from .data import _tiny
    from .suites import get_suite

    ap = argparse.ArgumentParser(prog="python -m benchmarks.million")
    ap.add_argument("--slices", type=int, default=1_000_000)
    ap.add_argument("--tables", action="store_true", help="also read the result tables")
    ap.add_argument("--data", default=str(HERE / "data"), help="generated Parquet folder")
    args = ap.parse_args()
    suite = replace(get_suite("tiny"), n_slices=args.slices)
    path = Path(args.data) / f"tiny-{args.slices}" / "sorted.parquet"
    if not path.exists():  # written in a separate step: its memory is not the driver's
        path.parent.mkdir(parents=True, exist_ok=True)
        df = _tiny(suite, np.random.default_rng(20261126))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path,
                       row_group_size=100_000, compression="snappy")
        print(f"wrote {path}; run again to measure (a clean driver)")
        return
    out: dict[str, object] = {"slices": args.slices}
    t = time.perf_counter()
    _, plan = prepare(str(path), list(suite.specs), suite.key)
    out.update(prepare_s=round(time.perf_counter() - t, 2), tasks=len(plan.tasks),
               peak_mb_after_plan=round(_peak_mb()))
    del plan
    with local_cluster(2) as cluster, Client(cluster) as client:
        store = tempfile.mkdtemp(dir=path.parent)
        try:
            t = time.perf_counter()
            res = ms.fit_many(str(path), list(suite.specs), split_by=suite.key,
                              store=store, client=client, progress=False,
                              options=RunOptions(read_back=False))  # as `mixedscale run`
            out.update(returned_s=round(time.perf_counter() - t, 2))
            out.update(by_status=res.status_counts(),
                       with_status_s=round(time.perf_counter() - t, 2),
                       plan_s=round(res.run.plan_seconds, 2),
                       exec_s=round(res.run.wall_seconds, 2),
                       fit_s=round(res.run.fit_seconds, 2),
                       peak_mb_without_tables=round(_peak_mb()))
            if args.tables:
                _ = res.fits, res.params, res.variance
                out.update(with_tables_s=round(time.perf_counter() - t, 2),
                           peak_mb_with_tables=round(_peak_mb()))
        finally:
            shutil.rmtree(store, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
