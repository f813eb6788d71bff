"""Locking: loading the inputs of a manifest, resolving them into a lock, and freshness (``lock --check``)."""
