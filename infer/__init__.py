"""Benchmark and comparison scripts, run from the repository root as modules
(`python -m infer.bench_decode ...`) so that they import each other as `infer.*`."""
