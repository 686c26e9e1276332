"""Experiments the product does not use, kept runnable with their findings in
docs/performance.md: `python -m bench.experiments.attention16`."""
