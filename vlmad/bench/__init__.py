"""Micro-benchmarks of the methods (CPU/GPU timing against a bare CLIP image pass)."""
