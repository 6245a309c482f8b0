"""laion-dagster's benchmarks, each run from the repository's root as `python -m bench.NAME`."""
