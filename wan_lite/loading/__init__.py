"""Checkpoint discovery, tensor sources (memory-mapped) and filling meta-built modules."""
