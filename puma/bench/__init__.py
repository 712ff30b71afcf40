"""Benchmark library: accuracy and cost measurements behind ``scripts/`` and ``puma bench``."""
