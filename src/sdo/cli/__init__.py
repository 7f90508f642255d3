"""The ``sdo`` command: the parser and its dispatch (:mod:`~sdo.cli.app`), one module per group of commands."""

from .app import main

__all__ = ["main"]
