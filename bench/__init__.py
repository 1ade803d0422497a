"""Tessera's benchmarks. Run them all with ``python -m bench`` (or ``make bench``).

Machines here are noisy, so every figure is printed as a ratio against a baseline measured in the
same run, on the same machine, with the same data.
"""
