"""Benchmark-only pieces (the peer model of scripts/benchmark.py); nothing here is used in training."""
