"""A plugin whose module fails to import, as one with a missing dependency does: an unavailable engine."""

raise ImportError("stacklock_broken_engine needs libbroken, which is not installed")
