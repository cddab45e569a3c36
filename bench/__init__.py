"""Benchmarks: ratios against baselines, measured side by side in one run.

Run each as `python -m bench.<name>`; results go to bench/RESULTS.md.
"""
