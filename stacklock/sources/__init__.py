"""Sources: where a link's file comes from (a local path, ``hf://``)."""
