"""Isolated worker processes: kept importable here; the code lives in ``pipeline.isolation``."""

from pipeline.isolation import Outcome, isolated_map

__all__ = ["Outcome", "isolated_map"]
