"""Shared fixtures: example data, and a real multi-process LocalCluster on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFDATA = Path(os.environ.get("MIXEDSCALE_REFDATA", ROOT.parent / "shared" / "refdata"))


def make_genes(n_genes: int = 20, n_subjects: int = 12, n_times: int = 4, seed: int = 0,
               shuffle: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subjects), n_times)
    time = np.tile(np.arange(n_times, dtype=float), n_subjects)
    frames = []
    for g in range(n_genes):
        b0 = rng.normal(0, 1.0, n_subjects)[subj]
        b1 = rng.normal(0, 0.3, n_subjects)[subj]
        y = 2 + 0.5 * time + b0 + b1 * time + rng.normal(0, 1.0, len(time))
        frames.append(pd.DataFrame({"gene": f"g{g:03d}", "subject": subj, "time": time,
                                    "y": y}))
    df = pd.concat(frames, ignore_index=True)
    if shuffle:
        df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return df


@pytest.fixture(scope="session")
def cluster_client() -> Iterator[object]:
    """Two single-threaded worker processes with nannies, like the embedded default."""
    from distributed import Client

    from mixedscale.executor import local_cluster

    cluster = local_cluster(2)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def genes_parquet(tmp_path: Path) -> Path:
    df = make_genes()
    path = tmp_path / "genes"
    path.mkdir()
    df.iloc[: len(df) // 2].to_parquet(path / "part-0.parquet", index=False)
    df.iloc[len(df) // 2:].to_parquet(path / "part-1.parquet", index=False)
    return path
