"""workermon benchmarks: ``python -m bench`` (see BENCHMARKS.md)."""
