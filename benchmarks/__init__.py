"""Benchmarks of the DiffewS pipeline: run each as a module from the repository root, e.g. `python -m benchmarks.speed`."""
