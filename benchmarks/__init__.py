"""Benchmarks of ldmrt against peers (`python -m benchmarks --help`); not part of the installed package."""
