"""Lets `python -m dkd_tune` run the command-line interface."""

from dkd_tune.cli import main

main()
