"""The frozen pydantic models of every file stacklock reads or writes, and TOML in and out.

Nothing here touches the world: text in, models out, and back (``parse_*`` / ``render_*``)."""
