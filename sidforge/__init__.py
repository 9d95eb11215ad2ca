"""sidforge: behavior-aligned semantic IDs for recommender items, on Ray."""

__version__ = "0.1.0"
