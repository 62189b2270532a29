"""The command line: one Typer function per command, the options declared once, progress and summaries.
Thin: it builds a RunConfig, runs it through the library and turns errors into one line and an exit code."""
