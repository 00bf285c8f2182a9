"""Benchmark sections for `python -m experiments.bench_attention`.

A section is a module here with `run(ctx) -> list[dict]` (one row per
measurement; keys at least `section`, `name`, `impl`, `time_ms`, `mem_mb`)
and optionally `plot(rows) -> list[(figure, filename)]`. `ctx` carries
`quick`, `dtype`, `log(msg)`, `time_fn`, `peak_memory_bytes`, `fwd_bwd`,
`repeats` and the parsed `flags`.
"""
