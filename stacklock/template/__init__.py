"""Chat templates: the sandboxed renderer, and dialect and feature detection."""
