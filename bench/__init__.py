"""Throughput, latency and memory benchmarks of the ESM-2 8M service.

`python -m bench` (or `make bench ARGS=...`) measures, on one corpus and in one run,
fair-esm's reference forward, Hugging Face's `EsmModel`, our engine in-process and
the whole service end to end, then writes `bench/results/latest.{json,md}`.
"""
