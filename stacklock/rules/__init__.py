"""Rules: predicates over a lock's facts, version and build ranges, and ``check``."""
