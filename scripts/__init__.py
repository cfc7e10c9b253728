"""Maintenance scripts (the starter dataset's builder), run from the repository root as modules:
``python -m scripts.build_starter``. The top floor beside bench/: they may import every package, nothing
imports them (tests/test_layers.py)."""
