"""The `reco` command: a thin layer that parses options and calls the Python API.

One module per group of commands: `memory_commands.py` (migrate, ingest, doctor, info, search, copy, backup, restore,
dedup), `train_command.py` (train), `predict_commands.py` (predict, eval, demo); `base.py` holds what they share.
"""
# ruff: noqa: I001  (the command modules are imported in the workflow's order, which `reco --help` lists them in)

from __future__ import annotations

from .base import _hint, app, cli_errors, main
from . import memory_commands, train_command, predict_commands  # noqa: F401 - each registers its commands

__all__ = ["app", "main", "cli_errors", "_hint"]
