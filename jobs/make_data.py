"""Regenerate the example data shipped in jobs/data (deterministic)."""

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent / "data"


def nba() -> pd.DataFrame:
    return pd.DataFrame({
        "Points": [10, 25, 35, 30, 22, 14, 24, 28, 32, 27],
        "Minutes": [35, 40, 30, 38, 33, 32, 34, 39, 41, 36],
        "Team": ["TeamG", "TeamG", "TeamR", "TeamR", "TeamG", "TeamG", "TeamR", "TeamR",
                 "TeamG", "TeamR"],
    })


def genes(n_genes: int = 300, n_subjects: int = 30, n_times: int = 4, seed: int = 0
          ) -> pd.DataFrame:
    """Long-format expression: one slice per gene, a random intercept and slope per subject."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subjects), n_times)
    time = np.tile(np.arange(n_times, dtype=float), n_subjects)
    group = np.where(subj % 2 == 0, "control", "treated")
    frames = []
    for g in range(n_genes):
        b0 = rng.normal(0, 1.0, n_subjects)[subj]
        b1 = rng.normal(0, 0.3, n_subjects)[subj]
        y = 5 + 0.5 * time + 0.8 * (group == "treated") + b0 + b1 * time
        y += rng.normal(0, 1.0, len(time))
        frames.append(pd.DataFrame({"gene": f"g{g:04d}", "subject": [f"s{s:02d}" for s in subj],
                                    "group": group, "time": time, "expression": y}))
    # Shuffled, so the example also exercises input not sorted by the split key.
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=seed)


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    nba().to_parquet(HERE / "nba.parquet", index=False)
    genes().to_parquet(HERE / "genes.parquet", index=False, row_group_size=8000)
