"""Shared by the core tests: the smallest model sizes that still build and run both architectures."""

SMALL = dict(hidden=32, intermediate=64, layers=2, heads=2, vision_hidden=32, vision_intermediate=48, vision_heads=2)
