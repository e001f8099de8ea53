"""Command-line tools; run them as modules from the repository root: ``python -m tools.sweep --help``."""
