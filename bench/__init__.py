"""Benchmarks of the fine-tuning suite: `python -m bench SUITE` (bench/README.md)."""
