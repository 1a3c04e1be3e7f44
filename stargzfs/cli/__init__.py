"""Command-line interface: argument parsing and output only; one module per command group."""
