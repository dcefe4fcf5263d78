"""Data preparation stages: sources, ingest, filter, precompute, and storage helpers."""

from ldm import offline

offline.apply()
