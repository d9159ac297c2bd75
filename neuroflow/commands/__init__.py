"""Subcommands of the ``neuroflow`` console command (see ``neuroflow/cli.py``)."""
