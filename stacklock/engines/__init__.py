"""Engines: the adapter Protocol and its data, plugin loading, the child-process runner, one module per adapter."""
