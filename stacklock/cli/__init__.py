"""The command line: a thin typer layer over the library, with the progress display."""
