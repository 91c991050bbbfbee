"""Benchmarks for mixedscale against plain statsmodels, a process pool, naive Dask and lme4.

Run ``python -m benchmarks run --suite genes,sites,multiverse,tiny`` (see README.md).
"""
