"""Assay: BPF LSM runtime security monitor for CI workloads."""
__version__ = "0.1.0"
