"""Benchmarks and evaluation harnesses (LoCoMo)."""
