"""The ``vtl`` command-line interface."""
