"""Registries: registry files, the bundled registry, fetching and caching, queries, export and share."""
