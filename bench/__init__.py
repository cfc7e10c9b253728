"""Speed benchmarks (ratios measured side by side in one run), run from the repository root as modules:
``python -m bench.judge_prefix``. The top floor beside scripts/: they may import every package, nothing imports
them (tests/test_layers.py)."""
