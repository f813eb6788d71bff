"""File primitives shared by every layer: atomic writes, content digests and the hash cache."""
